#!/usr/bin/env python3
"""Checks the compatibility table (README.md and the crate docs in src/lib.rs) against the
versions Cargo.lock resolves for finale and for the integration package (what the tests build
against). Fails when a listed version is not the one resolved, when the two tables differ, when
a crate the table lists is not a dependency, or when a crate of PUBLIC_API has no row.

Usage: python3 scripts/check-compat.py   (from anywhere in the repository)
"""

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- compat:start -->", "<!-- compat:end -->"
# The packages whose resolved dependencies must match: the library, and the tests.
PACKAGES = ["finale", "finale-integration"]
# The crates whose types appear in finale's public API: each must have a row, so that a row
# dropped (or a crate added to the API without one) fails. Keep in step with the API: a new
# public signature naming another crate's type adds its crate here and to the table.
PUBLIC_API = [
    "tokio", "metrics", "tower", "http", "http-body", "bytes", "hyper", "hyper-util", "axum",
    "tonic", "tonic-health", "rustls", "metrics-exporter-prometheus", "opentelemetry",
    "opentelemetry_sdk", "opentelemetry-http", "tracing-appender", "tokio-util", "serde",
]


def table(path: Path, prefix: str = "") -> dict[str, str]:
    """The rows between the markers: {crate: version}, from `| `crate` | version | ... |`."""
    lines = [l.removeprefix(prefix) for l in path.read_text().splitlines()]
    try:
        start = next(i for i, l in enumerate(lines) if l.strip() == START)
        end = next(i for i, l in enumerate(lines) if l.strip() == END)
    except StopIteration:
        sys.exit(f"{path.name}: no {START} ... {END} block")
    rows = {}
    for line in lines[start + 1 : end]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        for crate in re.findall(r"`([A-Za-z0-9_-]+)`", cells[0]):
            rows[crate] = cells[1]
    if not rows:
        sys.exit(f"{path.name}: the compatibility table is empty")
    return rows


def resolved(lock: dict) -> dict[str, dict[str, str]]:
    """{package: {dependency: version}} for PACKAGES, as Cargo.lock resolves them."""
    versions: dict[str, list[str]] = {}
    for p in lock["package"]:
        versions.setdefault(p["name"], []).append(p["version"])
    out = {}
    for p in lock["package"]:
        if p["name"] not in PACKAGES:
            continue
        deps = {}
        for dep in p.get("dependencies", []):
            parts = dep.split(" ")
            name = parts[0]
            # "name version" when several versions are in the lock file, else just "name".
            deps[name] = parts[1] if len(parts) > 1 else versions[name][0]
        out[p["name"]] = deps
    return out


def compatible(listed: str, version: str) -> bool:
    """Cargo's caret rule, as the table spells it: "0.8" covers 0.8.x, "1" covers 1.x.y."""
    want = listed.split(".")
    if want[0] == "0" and len(want) < 2:
        return False  # "0" alone says nothing about compatibility
    return version.split(".")[: len(want)] == want


def main() -> int:
    readme = table(ROOT / "README.md")
    docs = table(ROOT / "src" / "lib.rs", prefix="//! ")
    errors = []
    if readme != docs:
        errors.append(f"README.md and src/lib.rs list different versions:\n  {readme}\n  {docs}")
    lock = resolved(tomllib.loads((ROOT / "Cargo.lock").read_text()))
    for crate, listed in readme.items():
        found = False
        for package in PACKAGES:
            version = lock.get(package, {}).get(crate)
            if version is None:
                continue
            found = True
            if not compatible(listed, version):
                errors.append(
                    f"{crate}: the table says {listed}, Cargo.lock resolves {version} for {package}"
                )
        if not found:
            errors.append(f"{crate}: listed, but no dependency of {' or '.join(PACKAGES)}")
    for crate in PUBLIC_API:
        if crate not in readme:
            errors.append(f"{crate}: its types appear in finale's public API, but it has no row")
    for e in errors:
        print(f"compatibility table: {e}", file=sys.stderr)
    if not errors:
        print(f"compatibility table: {len(readme)} crates match Cargo.lock")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
