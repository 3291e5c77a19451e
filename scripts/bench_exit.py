#!/usr/bin/env python3
"""Whole-process figures: from SIGTERM to process exit, over several runs (median, min-max).

Usage:
  python3 scripts/bench_exit.py [--runs N] [--example NAME] [--features F] [--backends]

Builds the example in release mode, starts it, waits until it logs that it is ready, sends
SIGTERM and measures until the process has exited. Loopback only; every process it starts is
stopped by PID.

  --example quickstart            an idle service, drain delay 0, no backends (default)
  --example full_service --features axum,pushgateway,otlp,tracing-appender --backends
                                  the full example with a real Pushgateway and a real OTLP
                                  collector (rotel) started on free loopback ports
                                  over OTLP/HTTP (http/protobuf, the example's default, as the
                                  OpenTelemetry specification's default)
  --example full_service --features ... --backends --protocol grpc
                                  the same over OTLP/gRPC (rotel's gRPC receiver)
  --example full_service --features ... --backends --protocol grpc --collector-nodelay
                                  the same, with TCP_NODELAY set on the collector's accepted
                                  connections (rotel sets none), through an LD_PRELOAD shim
                                  built with cc: shows what the collector's Nagle costs
  --example full_service --features ... --hung
                                  the same, but both "backends" accept connections and never
                                  answer; prints the exit time against the total budget
"""
import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

READY = {"quickstart": "started: ready", "full_service": "started: ready"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} did not open")


# accept()/accept4() that set TCP_NODELAY on the accepted socket (for --collector-nodelay).
NODELAY_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
static int nodelay(int fd) {
  int one = 1;
  if (fd >= 0) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}
int accept4(int s, struct sockaddr *a, socklen_t *l, int f) {
  static int (*real)(int, struct sockaddr *, socklen_t *, int);
  if (!real) real = dlsym(RTLD_NEXT, "accept4");
  return nodelay(real(s, a, l, f));
}
int accept(int s, struct sockaddr *a, socklen_t *l) {
  static int (*real)(int, struct sockaddr *, socklen_t *);
  if (!real) real = dlsym(RTLD_NEXT, "accept");
  return nodelay(real(s, a, l));
}
"""


def nodelay_shim(tmp: str) -> str:
    src, lib = os.path.join(tmp, "nodelay.c"), os.path.join(tmp, "nodelay.so")
    with open(src, "w") as f:
        f.write(NODELAY_SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", lib, src, "-ldl"], check=True)
    return lib


def start_backends(tmp: str, protocol: str = "http",
                   collector_nodelay: bool = False) -> tuple[list[subprocess.Popen], dict[str, str]]:
    procs = []
    pg = free_port()
    procs.append(subprocess.Popen(
        ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{pg}", "--persistence.file=",
         "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    grpc, http = free_port(), free_port()
    collector_env = dict(os.environ)
    if collector_nodelay:
        collector_env["LD_PRELOAD"] = nodelay_shim(tmp)
    procs.append(subprocess.Popen(
        ["rotel-agent", "start", "--otlp-grpc-endpoint", f"127.0.0.1:{grpc}",
         "--otlp-http-endpoint", f"127.0.0.1:{http}", "--exporter", "blackhole",
         "--pid-file", os.path.join(tmp, "rotel.pid"), "--log-file", os.path.join(tmp, "rotel.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=collector_env))
    wait_port(pg)
    wait_port(grpc)
    wait_port(http)
    env = {
        "PUSHGATEWAY_URL": f"http://127.0.0.1:{pg}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{grpc if protocol == 'grpc' else http}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc" if protocol == "grpc" else "http/protobuf",
    }
    return procs, env


def start_blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that accepts every connection and never answers (kept open until stopped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return listener, held


def one_run(binary: str, env: dict[str, str], ready: str, expect: int = 0) -> float:
    proc = subprocess.Popen([binary], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            if ready in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(20):
        proc.kill()
        raise RuntimeError("the service did not become ready")
    # A blocking wait: `Popen.wait(timeout=...)` polls with sleeps that double up to 50 ms, which
    # would round every exit up to 0.5 + 1 + 2 + ... ms (15.5, 31.5, 63.5, 113.5 ms). The timer
    # only kills a process that never exits.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    start = time.perf_counter()
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait()
    elapsed = time.perf_counter() - start
    watchdog.cancel()
    if code != expect:
        raise RuntimeError(f"exit code {code}, expected {expect}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--example", default="quickstart")
    ap.add_argument("--features", default="")
    ap.add_argument("--backends", action="store_true")
    ap.add_argument("--hung", action="store_true")
    ap.add_argument("--protocol", choices=["grpc", "http"], default="http",
                    help="OTLP transport to the collector with --backends")
    ap.add_argument("--collector-nodelay", action="store_true",
                    help="with --backends: TCP_NODELAY on the collector's connections")
    ap.add_argument("--total", default="6s", help="FINALE_TOTAL_BUDGET for --hung")
    args = ap.parse_args()

    # full_service lives in the integration package (it needs the OTLP exporter crates).
    package = "finale-integration" if args.example == "full_service" else "finale"
    cmd = ["cargo", "build", "--release", "--quiet", "-p", package, "--example", args.example]
    if args.features and package == "finale":
        cmd += ["--features", args.features]
    subprocess.run(cmd, check=True)
    binary = os.path.join("target", "release", "examples", args.example)

    env = dict(os.environ, RUST_LOG="info", NO_COLOR="1", FINALE_DRAIN_DELAY="0s")
    for k in ("KUBERNETES_SERVICE_HOST", "ECS_CONTAINER_METADATA_URI_V4", "ECS_CONTAINER_METADATA_URI"):
        env.pop(k, None)
    procs, tmp = [], tempfile.mkdtemp(prefix="finale-bench-")
    env["FULL_SERVICE_ADDR"] = "127.0.0.1:0"
    env["FULL_SERVICE_LOG"] = os.path.join(tmp, "service.log")
    expect = 0
    holes = []
    try:
        if args.hung:
            for _ in range(2):
                holes.append(start_blackhole())
            env["PUSHGATEWAY_URL"] = f"http://127.0.0.1:{holes[0][0].getsockname()[1]}"
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{holes[1][0].getsockname()[1]}"
            env["FINALE_TOTAL_BUDGET"] = args.total
            env["FINALE_TELEMETRY_RESERVE"] = "3s"
            expect = 6
        if args.backends:
            for tool in ("prometheus-pushgateway", "rotel-agent"):
                if not shutil.which(tool):
                    print(f"{tool} not found: run scripts/install-components.sh")
                    return 1
            procs, backend_env = start_backends(tmp, args.protocol, args.collector_nodelay)
            env.update(backend_env)
        times = [one_run(binary, env, READY.get(args.example, "started: ready"), expect)
                 for _ in range(args.runs)]
    finally:
        for listener, held in holes:
            listener.close()
            for c in held:
                c.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    ms = sorted(t * 1000 for t in times)
    backends = f" with backends (OTLP {args.protocol}{', collector TCP_NODELAY' if args.collector_nodelay else ''})"
    what = backends if args.backends else f" with hung backends, total budget {args.total}" if args.hung else ""
    print(f"{args.example}{what}: SIGTERM to exit over "
          f"{len(ms)} runs: median {statistics.median(ms):.1f} ms, min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
