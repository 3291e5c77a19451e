#!/usr/bin/env python3
"""SIGTERM to exit with the final-scrape stage, against a real Prometheus server.

Usage:
  python3 scripts/bench_scrape.py [--runs 20] [--interval-ms 1000] [--debug]

Builds the `full_service` example (release mode unless --debug), and for each run starts it in
pull mode (`METRICS_ADDR`, drain delay 0), starts Prometheus (Debian `prometheus`) on a free
loopback port with a generated config scraping it every interval and its own TSDB in a temp
dir, waits for three successful scrapes, sends SIGTERM at a random moment of the interval and
measures until the process has exited (waitpid). From the report's `scrape` line it reads when
the final scrape arrived after the trigger and how long it took, and prints, per run and as
median / min-max:

  exit       SIGTERM to exit
  scrape     time to the next scrape + the scrape's duration (from the report)
  overhead   exit - scrape: what the stage adds beyond waiting for the scrape (goal <= 50 ms)

Loopback only; every process it starts is stopped by PID.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, promql: str):
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(promql)}"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            result = json.load(r)["data"]["result"]
        return float(result[0]["value"][1]) if result else None
    except OSError:
        return None


def wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Lines:
    """The child's stderr, line by line, on a thread."""

    def __init__(self, stream):
        self.lines = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for raw in stream:
            with self.cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no line with {needle!r}:\n" + "\n".join(self.lines))
                self.cond.wait(left)


def one_run(binary: str, interval_ms: int, tmp: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINALE_")}
    env.update(
        FULL_SERVICE_ADDR="127.0.0.1:0",
        METRICS_ADDR="127.0.0.1:0",
        FULL_SERVICE_LOG=os.path.join(tmp, "service.log"),
        FINALE_DRAIN_DELAY="0s",
        RUST_LOG="info",
        NO_COLOR="1",
    )
    for k in ("PUSHGATEWAY_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "KUBERNETES_SERVICE_HOST"):
        env.pop(k, None)
    service = subprocess.Popen([binary], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    prometheus = None
    try:
        lines = Lines(service.stderr)
        metrics = lines.wait_for("metrics on http://").split("http://")[1].split("/")[0]
        lines.wait_for("started: ready")
        prom_port = free_port()
        prom_dir = tempfile.mkdtemp(dir=tmp)
        config = os.path.join(prom_dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write(
                f"global:\n  scrape_interval: {interval_ms}ms\n"
                f"  scrape_timeout: {max(interval_ms // 2, 100)}ms\n"
                f"scrape_configs:\n  - job_name: svc\n    static_configs:\n"
                f"      - targets: ['{metrics}']\n"
            )
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(prom_dir, 'data')}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=prom_dir)
        wait(lambda: (query(prom_port, 'sum_over_time(up{job="svc"}[10m])') or 0) >= 3,
             30, "three scrapes")
        # A random moment of the interval, so the wait for the next scrape is sampled evenly.
        time.sleep(random.uniform(0, interval_ms / 1000))
        # A blocking wait: `Popen.wait(timeout=...)` polls with sleeps that double up to 50 ms
        # and would round every exit up. The timer only kills a process that never exits.
        watchdog = threading.Timer(60, service.kill)
        watchdog.start()
        start = time.perf_counter()
        os.kill(service.pid, signal.SIGTERM)
        service.wait()
        elapsed = time.perf_counter() - start
        watchdog.cancel()
        line = lines.wait_for("scrape     final-scrape:", 5)
        m = re.search(r"first at ([0-9.]+)s .* in ([0-9.]+)ms", line)
        if not m:
            raise RuntimeError(f"the stage did not see a scrape: {line}")
        scrape = float(m.group(1)) + float(m.group(2)) / 1000
        return elapsed, scrape, service.returncode
    finally:
        for p in (service, prometheus):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def fmt(values):
    ms = [v * 1000 for v in values]
    return f"median {statistics.median(ms):7.1f} ms   min-max {min(ms):.1f}-{max(ms):.1f} ms"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--interval-ms", type=int, default=1000)
    ap.add_argument("--debug", action="store_true", help="a debug build (faster to build)")
    args = ap.parse_args()
    if not shutil.which("prometheus"):
        print("prometheus is not on PATH (scripts/install-components.sh)", file=sys.stderr)
        return 2
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    profile = "debug" if args.debug else "release"
    cmd = ["cargo", "build", "--quiet", "-p", "finale-integration", "--example", "full_service"]
    if not args.debug:
        cmd.insert(2, "--release")
    subprocess.run(cmd, check=True)
    binary = os.path.join("target", profile, "examples", "full_service")
    exits, scrapes, overheads = [], [], []
    with tempfile.TemporaryDirectory(prefix="finale-bench-scrape-") as tmp:
        for i in range(args.runs):
            elapsed, scrape, code = one_run(binary, args.interval_ms, tmp)
            exits.append(elapsed)
            scrapes.append(scrape)
            overheads.append(elapsed - scrape)
            print(f"run {i + 1:2}: exit {elapsed * 1000:7.1f} ms  scrape {scrape * 1000:7.1f} ms  "
                  f"overhead {(elapsed - scrape) * 1000:6.1f} ms  code {code}", flush=True)
    print(f"{args.runs} runs, {profile} build, {args.interval_ms} ms interval")
    print(f"exit      {fmt(exits)}")
    print(f"scrape    {fmt(scrapes)}")
    print(f"overhead  {fmt(overheads)}   (goal: <= 50 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
