#!/usr/bin/env python3
"""HTTP overhead of finale's request tracking, measured with wrk over loopback.

Usage:
  python3 scripts/bench_http.py [--mode keepalive|churn|h2|tls|grpc|grpc-tls] [--rounds N]
                                [--duration S] [--threads T] [--connections C]
                                [--variants plain-ci,finale]

Modes (each against its peer in the same run):
  keepalive  wrk, HTTP/1.1 keep-alive (the default)
  churn      wrk with `Connection: close`: a new connection per request
  h2         h2load, HTTP/2 multiplexed (prior knowledge, -c 8 -m 16)
  tls        wrk over HTTPS: finale's server over rustls vs tokio-rustls + hyper-util's
             auto connection (what axum-server's rustls acceptor does), with the connect info
             finale gives handlers inserted as axum::serve inserts it (plain-tls-ci, the peer);
             the same without it (plain-tls) beside
  grpc       h2load, unary gRPC (grpc.health.v1.Health/Check, -c 8 -m 16): finale::tonic::serve
             vs tonic's own Server (serve_with_incoming, TCP_NODELAY on)
  grpc-tls   the same over TLS (ALPN h2): finale's HttpServer::tls vs tonic's ServerTlsConfig

Builds `integration/benches/http_server.rs` in release mode, then for each round starts each variant in
turn (alternating, so drift on a shared machine hits all of them alike) on a free loopback
port, runs `wrk` against `GET /`, reads "Requests/sec:", and stops the server by PID with
SIGTERM. Prints requests/s per variant (median, min-max), the server's CPU time per request
(user + system, from /proc, median), and for each variant against the first (the peer): the
median of the rounds' ratios (each round runs every variant back to back, so the ratio within
a round cancels the drift between rounds; the goal is read on this one), the ratio of the
medians, and the ratio of CPU time per request. --variants picks some of a mode's variants
(the peer first), for more rounds in the same time.

  plain-ci  axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            the peer: finale's server gives handlers the same `ConnectInfo`
  finale    finale::axum::serve(&finale, "http", listener, router)  finale's accept loop + drain
  plain     axum::serve(listener, router)                      the bare handler, no connect info
  layer     axum::serve(listener, router.layer(DrainLayer))    the tower layer alone

The gRPC modes send a real unary call: POST with the 5-byte gRPC frame of an empty
HealthCheckRequest, `content-type: application/grpc`, `te: trailers`. gRPC answers its errors
with HTTP 200, so before the load each server is asked once with curl and must answer
`grpc-status: 0` and `SERVING`; h2load must then report every request succeeded.

Needs `wrk`, `h2load` and `curl` (scripts/install-components.sh installs them). Loopback only; bounded: every wrk run
has a timeout and every server is killed if it does not exit on SIGTERM.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MODES = {
    "keepalive": ["plain-ci", "finale", "plain", "layer"],
    "churn": ["plain-ci", "finale", "plain", "layer"],
    "h2": ["plain-ci", "finale", "plain", "layer"],
    "tls": ["plain-tls-ci", "finale-tls", "plain-tls"],
    "grpc": ["plain-grpc", "finale-grpc"],
    "grpc-tls": ["plain-grpc-tls", "finale-grpc-tls"],
}
GRPC_PATH = "/grpc.health.v1.Health/Check"
# An empty HealthCheckRequest as one gRPC message: not compressed, length 0.
GRPC_FRAME = b"\x00\x00\x00\x00\x00"
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build() -> str:
    """Builds the bench binary in release mode and returns its path (from cargo's JSON output)."""
    cmd = ["cargo", "build", "--release", "-p", "finale-integration", "--bench", "http_server",
           "--message-format=json-render-diagnostics"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    binary = None
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (msg.get("reason") == "compiler-artifact"
                and msg.get("target", {}).get("name") == "http_server"
                and msg.get("executable")):
            binary = msg["executable"]
    if binary is None:
        sys.exit("cargo did not report the http_server bench executable")
    return binary


def start(binary: str, variant: str, port: int) -> subprocess.Popen:
    # The TLS and gRPC variants: bound and accepting is enough (the first load run warms up;
    # the gRPC ones are then checked with a real call).
    raw = "-tls" in variant or "grpc" in variant
    proc = subprocess.Popen([binary, variant, str(port)], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "listening on 127.0.0.1:<port> (<variant>)"
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        sys.exit(f"{variant}: server did not start (got {line!r})")
    # Wait until it answers, not only until it is bound.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if raw:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return proc
            except OSError:
                time.sleep(0.02)
                continue
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            pass
        time.sleep(0.02)
    stop(proc)
    sys.exit(f"{variant}: server did not answer on port {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def grpc_url(port: int, args: argparse.Namespace) -> str:
    scheme = "https" if args.mode == "grpc-tls" else "http"
    return f"{scheme}://127.0.0.1:{port}{GRPC_PATH}"


def check_grpc(port: int, args: argparse.Namespace, frame: str) -> None:
    """One real call with curl: the answer must be grpc-status 0 and a SERVING message."""
    cmd = ["curl", "-sS", "--max-time", "10", "-X", "POST", "--data-binary", f"@{frame}",
           "-D", "-", "-o", "-"]
    cmd += ["--http2", "-k"] if args.mode == "grpc-tls" else ["--http2-prior-knowledge"]
    for h in GRPC_HEADERS:
        cmd += ["-H", h]
    cmd.append(grpc_url(port, args))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, timeout=20).stdout
    # The headers, the message (frame header + HealthCheckResponse{status: SERVING} = 08 01),
    # then the trailers, which curl prints with the headers.
    if (not out.startswith(b"HTTP/2 200") or b"grpc-status: 0" not in out
            or b"\x00\x00\x00\x00\x02\x08\x01" not in out):
        sys.exit(f"the gRPC check did not answer grpc-status 0 and SERVING:\n{out!r}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(port: int, args: argparse.Namespace) -> tuple[float, int]:
    """Requests per second, and how many requests were answered."""
    if args.mode == "h2" or args.mode.startswith("grpc"):
        return run_h2load(port, args)
    scheme = "https" if args.mode == "tls" else "http"
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s"]
    if args.mode == "churn":
        cmd += ["-H", "Connection: close"]
    cmd.append(f"{scheme}://127.0.0.1:{port}/")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                         timeout=args.duration + 30).stdout
    if re.search(r"Non-2xx or 3xx responses|Socket errors", out):
        sys.exit(f"wrk reported errors:\n{out}")
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    if m is None or n is None:
        sys.exit(f"no Requests/sec in wrk output:\n{out}")
    return float(m.group(1)), int(n.group(1))


def run_h2load(port: int, args: argparse.Namespace) -> tuple[float, int]:
    cmd = ["h2load", "-D", str(args.duration), "-c", "8", "-m", "16", "-t", "1"]
    if args.mode.startswith("grpc"):
        # -d makes every request a POST with the file as its body.
        cmd += ["-d", args.grpc_frame]
        for h in GRPC_HEADERS:
            cmd += ["-H", h]
        cmd.append(grpc_url(port, args))
    else:
        cmd.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                         timeout=args.duration + 30).stdout
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if codes is None or int(codes.group(1)) == 0 or any(int(codes.group(i)) for i in (2, 3, 4)):
        sys.exit(f"h2load reported errors:\n{out}")
    reqs = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored", out)
    if reqs is None or reqs.group(1) != reqs.group(2) or int(reqs.group(3)) or int(reqs.group(4)):
        sys.exit(f"h2load reported failed requests:\n{out}")
    m = re.search(r"finished in [0-9.]+m?s, ([0-9.]+) req/s", out)
    if m is None:
        sys.exit(f"no req/s in h2load output:\n{out}")
    return float(m.group(1)), int(reqs.group(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=sorted(MODES), default="keepalive")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=1, help="seconds of wrk before each run")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--variants", help="comma-separated, the peer first (default: the mode's)")
    args = p.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.duration <= 60:
        sys.exit("--rounds must be 1..50 and --duration 1..60")
    grpc = args.mode.startswith("grpc")
    tools = ["h2load", "curl"] if grpc else ["h2load"] if args.mode == "h2" else ["wrk"]
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run scripts/install-components.sh")
    variants = MODES[args.mode]
    if args.variants:
        chosen = args.variants.split(",")
        if len(chosen) < 2 or any(v not in variants for v in chosen):
            sys.exit(f"--variants: two or more of {','.join(variants)}, the peer first")
        variants = chosen
    peer = variants[0]

    binary = build()
    frame = tempfile.NamedTemporaryFile(prefix="grpc-frame-", suffix=".bin")
    frame.write(GRPC_FRAME)
    frame.flush()
    args.grpc_frame = frame.name
    rps: dict[str, list[float]] = {v: [] for v in variants}
    # The server's CPU time per answered request, in microseconds.
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        # Rotate the order each round so no variant always runs first or last.
        k = r % len(variants)
        order = variants[k:] + variants[:k]
        for variant in order:
            port = free_port()
            proc = start(binary, variant, port)
            try:
                if grpc:
                    check_grpc(port, args, frame.name)
                if args.warmup > 0:
                    warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
                    run_load(port, warm)
                before = cpu_seconds(proc.pid)
                value, answered = run_load(port, args)
                used = cpu_seconds(proc.pid) - before
            finally:
                stop(proc)
            rps[variant].append(value)
            cpu[variant].append(used / max(answered, 1) * 1e6)
            print(f"round {r + 1}/{args.rounds} {variant:>16}: {value:10.0f} req/s, "
                  f"{cpu[variant][-1]:6.2f} us of server CPU per request", flush=True)

    print()
    load = ("h2load -c 8 -m 16 -t 1" if args.mode == "h2" or grpc
            else f"wrk -t{args.threads} -c{args.connections}")
    what = (f"unary POST {GRPC_PATH} -> grpc-status 0" if grpc
            else "GET / -> 200 \"hello, world\"")
    print(f"mode {args.mode}: {load} -d{args.duration}s, {args.rounds} rounds, {what}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'variant':<16} {'median req/s':>13} {'min':>10} {'max':>10} {'CPU us/req':>11}")
    med = {}
    for v in variants:
        med[v] = statistics.median(rps[v])
        print(f"{v:<16} {med[v]:13.0f} {min(rps[v]):10.0f} {max(rps[v]):10.0f} "
              f"{statistics.median(cpu[v]):11.2f}")
    print()
    # Each round runs every variant once, back to back: the ratio within a round cancels the
    # drift between rounds, and the median of those ratios is the figure the goal is read on.
    for v in variants[1:]:
        paired = statistics.median(a / b for a, b in zip(rps[v], rps[peer]))
        cpu_ratio = statistics.median(cpu[v]) / statistics.median(cpu[peer])
        verdict = "met" if paired >= 1.0 else "missed"
        print(f"{v} / {peer}: {paired:.3f}x req/s (median of the rounds' ratios; "
              f"ratio of medians {med[v] / med[peer]:.3f}x), {cpu_ratio:.3f}x server CPU per "
              f"request  (goal for finale >= 1.0x req/s: {verdict})")


if __name__ == "__main__":
    main()
