#!/usr/bin/env python3
"""Memory per idle HTTP/1.1 keep-alive connection: finale's server vs axum::serve.

Usage:
  python3 scripts/bench_memory.py [--connections N] [--rounds R] [--variants plain-ci,finale]

Builds `integration/benches/http_server.rs` in release mode and, for each variant, starts it
on a free loopback port, reads its resident set size (VmRSS in /proc/<pid>/status), opens N
connections that each send one request and read its answer (so that each is an idle
keep-alive connection, as a load balancer's pool leaves them), reads the RSS again, and
prints the difference divided by N. The variants alternate over R rounds; the median is
printed. Every connection is opened and answered within the header-read timeout (10 s), after
which finale closes idle connections.

Loopback only; bounded: N is capped, every socket has a timeout, every server is stopped by
PID (SIGTERM, then SIGKILL).
"""
import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_http import build, free_port, start, stop  # noqa: E402


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def idle_connections(port: int, n: int) -> list:
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = b""
        while not got.endswith(b"hello, world"):
            chunk = s.recv(4096)
            if not chunk:
                sys.exit("the server closed a connection")
            got += chunk
        conns.append(s)
    return conns


def measure(binary: str, variant: str, n: int) -> float:
    port = free_port()
    proc = start(binary, variant, port)
    conns = []
    try:
        # One request first: lazily built state (the router, the date cache) is in the baseline.
        for s in idle_connections(port, 1):
            s.close()
        time.sleep(0.2)  # let the server settle before the baseline is read
        before = rss_kb(proc.pid)
        started = time.monotonic()
        conns = idle_connections(port, n)
        if time.monotonic() - started > 8:
            sys.exit(f"{variant}: opening {n} connections took too long for the idle timeout")
        time.sleep(0.2)  # the last connection tasks settle
        after = rss_kb(proc.pid)
    finally:
        for s in conns:
            s.close()
        stop(proc)
    return (after - before) * 1024 / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="plain-ci,finale")
    args = p.parse_args()
    if not 100 <= args.connections <= 20000 or not 1 <= args.rounds <= 20:
        sys.exit("--connections must be 100..20000 and --rounds 1..20")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 100
    if soft < want:
        if hard < want:
            sys.exit(f"open-file limit {hard} is below {want}: raise it (ulimit -n)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    variants = args.variants.split(",")
    binary = build()
    per_conn = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            value = measure(binary, v, args.connections)
            per_conn[v].append(value)
            print(f"round {r + 1}/{args.rounds} {v:>10}: {value / 1024:6.1f} KiB per connection",
                  flush=True)
    print()
    med = {v: statistics.median(per_conn[v]) for v in variants}
    for v in variants:
        print(f"{v:>10}: {med[v] / 1024:6.1f} KiB per idle keep-alive connection (median of "
              f"{args.rounds}, {args.connections} connections)")
    peer = variants[0]
    for v in variants[1:]:
        ratio = med[v] / med[peer]
        verdict = "met" if ratio <= 1.0 else "missed"
        print(f"{v} / {peer}: {ratio:.3f}x  (goal <= 1.0x: {verdict})")


if __name__ == "__main__":
    main()
