#!/usr/bin/env bash
# The test command of the README: runs every test, doctests included.
#
# The integration tests start a real Prometheus server, a real Prometheus Pushgateway, a real OTLP collector (rotel) and
# haproxy on free loopback ports. When they are missing and this runs as root with apt-get, they
# are installed first (scripts/install-components.sh); otherwise the tests that need them say so
# loudly and skip — except under CI=true, where a missing component fails the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case ":${PATH}:" in
  *:/usr/local/bin:*) ;;
  *) export PATH="/usr/local/bin:${PATH}" ;;
esac

missing=()
for bin in prometheus prometheus-pushgateway rotel-agent haproxy systemd-socket-activate h2load; do
  command -v "$bin" >/dev/null || missing+=("$bin")
done
if ((${#missing[@]})); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "== installing test components (missing: ${missing[*]}) =="
    bash scripts/install-components.sh
  else
    echo "!! missing test components: ${missing[*]}" >&2
    echo "!! run scripts/install-components.sh as root to install them; their tests will skip" >&2
  fi
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast
  cargo test --doc --all-features
else
  cargo test --workspace --all-features --no-fail-fast
fi
