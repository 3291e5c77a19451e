#!/usr/bin/env python3
"""Instructions per HTTP/1.1 keep-alive request: finale's server vs axum::serve, under callgrind.

Usage:
  python3 scripts/bench_instructions.py [--requests N] [--repeat R] [--variants plain-ci,finale]
                                        [--protocol h1|h2]

Throughput on a shared machine swings by 15-30% from run to run; the number of user-space
instructions a server executes per request does not. This script builds
`integration/benches/http_server.rs` in release mode and, for each variant, starts it under
`valgrind --tool=callgrind` on a free loopback port, sends requests from a real client (one
HTTP/1.1 keep-alive connection, Python's http.client, each answer checked: 200
"hello, world"), stops it with SIGTERM and reads the total instruction count (Ir) of the
process. It does so twice, with N and 2N requests, and takes the difference: start-up and
shutdown cancel out, what is left is N requests' worth. That is repeated R times (--repeat,
the variants alternating) and the median is printed: the count is deterministic but for the
allocator, whose free lists depend on the order in which the threads first allocated (the
same code gives a few hundred instructions more or less per request from one start to the
next).

  plain-ci  axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            the peer: finale's server gives handlers the same `ConnectInfo`
  plain     axum::serve(listener, router)
  finale    finale::axum::serve(..)
  layer     axum::serve(listener, router.layer(DrainLayer))

--protocol h2: the requests go over one HTTP/2 connection with 16 streams at a time (`h2load -n N
-c 1 -m 16`, Debian package `nghttp2-client`), every one checked for a 2xx answer: the cost of
one stream.

Prints instructions per request for each variant and the ratio of each to the first.
Needs valgrind (Debian package `valgrind`). Loopback only; bounded: every server is killed if
it does not start or stop in time, and the request count is capped.
"""
import argparse
import glob
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_http import build, free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def send_h2(port: int, variant: str, requests: int) -> None:
    """`requests` requests on one HTTP/2 connection, 16 streams at a time; each one a 2xx."""
    out = subprocess.run(
        ["h2load", "-n", str(requests), "-c", "1", "-m", "16", f"http://127.0.0.1:{port}/"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600).stdout
    if (f"{requests} succeeded" not in out or f"{requests} 2xx" not in out):
        sys.exit(f"{variant}: h2load did not get {requests} 2xx answers:\n{out[-800:]}")


def instructions(binary: str, variant: str, requests: int, protocol: str = "h1") -> int:
    """Total Ir of one run of `variant` serving `requests` keep-alive requests (`h2`: streams
    of one HTTP/2 connection)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        out = os.path.join(tmp, "callgrind.out.%p")
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             "--dump-instr=no", "--compress-strings=no", binary, variant, str(port)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline()
            if "listening on" not in line:
                sys.exit(f"{variant}: server did not start (got {line!r})")
            conn = None
            deadline = time.monotonic() + 60
            while conn is None:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.connect()
                except OSError:
                    conn = None
                    if time.monotonic() > deadline:
                        sys.exit(f"{variant}: no connection on port {port}")
                    time.sleep(0.05)
            if protocol == "h2":
                conn.close()
                send_h2(port, variant, requests)
            else:
                for _ in range(requests):
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    body = response.read()
                    if response.status != 200 or body != b"hello, world":
                        sys.exit(f"{variant}: unexpected answer {response.status} {body!r}")
                conn.close()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        total = 0
        for path in glob.glob(os.path.join(tmp, "callgrind.out.*")):
            with open(path) as f:
                for row in f:
                    m = re.match(r"(?:summary|totals): (\d+)", row)
                    if m:
                        total += int(m.group(1))
                        break
        if total == 0:
            sys.exit(f"{variant}: callgrind wrote no totals")
        return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000,
                   help="N: runs with N and 2N requests are compared")
    p.add_argument("--variants", default="plain-ci,finale",
                   help="comma-separated; ratios are to the first")
    p.add_argument("--repeat", type=int, default=3,
                   help="R: each measure is taken R times, the median is printed")
    p.add_argument("--protocol", choices=["h1", "h2"], default="h1",
                   help="h1: one HTTP/1.1 keep-alive connection; h2: one HTTP/2 connection, "
                        "16 streams at a time (needs h2load)")
    args = p.parse_args()
    if not 100 <= args.requests <= 20000:
        sys.exit("--requests must be 100..20000")
    if not 1 <= args.repeat <= 9:
        sys.exit("--repeat must be 1..9")
    variants = args.variants.split(",")
    binary = build()
    runs = {v: [] for v in variants}
    for r in range(args.repeat):
        for variant in variants:
            low = instructions(binary, variant, args.requests, args.protocol)
            high = instructions(binary, variant, 2 * args.requests, args.protocol)
            runs[variant].append((high - low) / args.requests)
            print(f"  run {r + 1}/{args.repeat} {variant:>10}: {runs[variant][-1]:8.0f} "
                  f"({low} at {args.requests}, {high} at {2 * args.requests})", flush=True)
    per_request = {v: statistics.median(runs[v]) for v in variants}
    print()
    for v in variants:
        print(f"{v:>10}: {per_request[v]:8.0f} instructions per request (median of "
              f"{args.repeat}: {', '.join(f'{x:.0f}' for x in runs[v])})")
    peer = variants[0]
    print()
    for v in variants[1:]:
        ratio = per_request[v] / per_request[peer]
        verdict = "met" if ratio <= 1.05 else "missed"
        print(f"{v} / {peer}: {ratio:.3f}x  (goal <= 1.05x: {verdict})")


if __name__ == "__main__":
    main()
