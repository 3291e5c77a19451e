#!/usr/bin/env python3
"""Prints criterion results of one benchmark group as a table of medians and ratios.

Usage: python3 scripts/bench_ratios.py GROUP [BASELINE]

GROUP is a criterion group (for example `in_flight`); BASELINE is the function every other one
is compared with (default: the first whose name starts with `finale`). Reads
target/criterion/GROUP/*/*/new/estimates.json as written by the last `cargo bench` run.
"""
import json
import pathlib
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    group = sys.argv[1]
    root = pathlib.Path("target/criterion") / group
    if not root.is_dir():
        print(f"no results under {root}: run `cargo bench -p finale-integration --bench {group}` first")
        return 1
    rows = {}
    for est in sorted(root.glob("*/*/new/estimates.json")):
        function, param = est.parts[-4], est.parts[-3]
        data = json.loads(est.read_text())
        median = data["median"]["point_estimate"]
        lo = data["median"]["confidence_interval"]["lower_bound"]
        hi = data["median"]["confidence_interval"]["upper_bound"]
        rows.setdefault(param, {})[function] = (median, lo, hi)
    baseline = sys.argv[2] if len(sys.argv) > 2 else None
    for param in sorted(rows, key=lambda p: (len(p), p)):
        fns = rows[param]
        base = baseline or next((f for f in sorted(fns) if f.startswith("finale")), None)
        print(f"\n{group} / {param}")
        print(f"  {'function':<42} {'median':>10} {'95% CI':>21}  {'finale / this':>13}")
        for fn, (median, lo, hi) in sorted(fns.items(), key=lambda kv: kv[1][0]):
            ratio = fns[base][0] / median if base in fns else float("nan")
            print(f"  {fn:<42} {median:>8.1f}ns  [{lo:>8.1f}, {hi:>8.1f}]  {ratio:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
