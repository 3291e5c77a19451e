#!/usr/bin/env bash
# Installs the real components finale's integration tests and benches talk to: the Prometheus
# Pushgateway, haproxy, the wrk and h2load load generators and systemd-socket-activate (Debian
# packages), the rotel OTLP collector and the websockets client library (PyPI, pinned). Needs root and apt-get; safe to re-run
# (skips what is already in place).
set -euo pipefail

ROTEL_VERSION="${ROTEL_VERSION:-0.0.1a15}"
WEBSOCKETS_VERSION="${WEBSOCKETS_VERSION:-15.0.1}"
export DEBIAN_FRONTEND=noninteractive
export PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
case ":${PATH}:" in
  *:/usr/local/bin:*) ;;
  *) export PATH="/usr/local/bin:${PATH}" ;;
esac

step() { echo; echo "== $1 =="; }

APT_UPDATED=0
apt_install() {
  if [[ "$APT_UPDATED" == 0 ]]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "$@"
}

step "install prometheus, prometheus-pushgateway, haproxy, wrk, h2load, curl (apt)"
if command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null && command -v haproxy >/dev/null && command -v wrk >/dev/null \
  && command -v h2load >/dev/null && command -v curl >/dev/null; then
  echo "already installed, skipping apt"
else
  apt_install prometheus prometheus-pushgateway haproxy wrk nghttp2-client curl ca-certificates
fi

step "install systemd-socket-activate (apt: systemd)"
# Only the binary is used: it hands a listening socket to the systemd tests' example. Nothing is
# started as a service.
if command -v systemd-socket-activate >/dev/null; then
  echo "already installed, skipping apt"
else
  apt_install systemd
fi

step "install rotel ${ROTEL_VERSION} (pip)"
if ! command -v python3 >/dev/null; then
  apt_install python3 python3-pip
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  apt_install python3-pip
fi

# Where the installed wheel keeps its self-contained binary (the wheel puts it
# inside the package, not on PATH), or nothing if the pinned version is not
# installed.
rotel_wheel_binary() {
  python3 - "$ROTEL_VERSION" <<'EOF'
import importlib.metadata as md, importlib.util as iu, os, sys
try:
    if md.version("rotel") != sys.argv[1]:
        sys.exit(0)
except md.PackageNotFoundError:
    sys.exit(0)
spec = iu.find_spec("rotel")
if spec and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], "rotel-agent")
    if os.access(path, os.X_OK):
        print(path)
EOF
}

ROTEL_BIN="$(rotel_wheel_binary)"
if [[ -n "$ROTEL_BIN" ]] && command -v rotel-agent >/dev/null \
  && [[ "$(readlink -f "$(command -v rotel-agent)")" == "$(readlink -f "$ROTEL_BIN")" ]]; then
  echo "rotel ${ROTEL_VERSION} already installed, skipping pip"
else
  pip_args=(install --root-user-action=ignore --pre "rotel==${ROTEL_VERSION}")
  # Debian's own Python refuses system-wide installs (PEP 668).
  if python3 -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    pip_args+=(--break-system-packages)
  fi
  python3 -m pip "${pip_args[@]}"
  ROTEL_BIN="$(rotel_wheel_binary)"
  if [[ -z "$ROTEL_BIN" ]]; then
    echo "rotel ${ROTEL_VERSION} installed but its rotel-agent binary was not found" >&2
    exit 1
  fi
  ln -sf "$ROTEL_BIN" /usr/local/bin/rotel-agent
  hash -r
fi
if [[ "$(readlink -f "$(command -v rotel-agent)")" != "$(readlink -f "$ROTEL_BIN")" ]]; then
  echo "rotel-agent on PATH is not the pinned rotel ${ROTEL_VERSION}" >&2
  exit 1
fi


step "install websockets ${WEBSOCKETS_VERSION} (pip): the WebSocket client of the drain tests"
if [[ "$(python3 -c 'import websockets; print(websockets.__version__)' 2>/dev/null)" == "${WEBSOCKETS_VERSION}" ]]; then
  echo "websockets ${WEBSOCKETS_VERSION} already installed, skipping pip"
else
  pip_args=(install --root-user-action=ignore "websockets==${WEBSOCKETS_VERSION}")
  if python3 -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    pip_args+=(--break-system-packages)
  fi
  python3 -m pip "${pip_args[@]}"
fi
