"""``make bench``: every benchmark, one after the other, then one table.

Each script prints the machine, the versions and its parameters, and its own details; this
one runs them as separate processes and prints their result rows together at the end.
Figures on a 2-core machine shared with other work are noisy: run it two or three times and
compare ratios against the do-nothing consumer of the same run, not absolute rates.

    .venv/bin/python bench/all.py [--quick] [--only ingest,detection,memory,client,failover]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
from common import Row, machine

HERE = Path(__file__).resolve().parent
SCRIPTS = ("ingest", "detection", "memory", "client", "failover")


def run_one(name: str, quick: bool, json_path: str) -> int:
    args = [sys.executable, str(HERE / f"{name}.py"), "--json", json_path]
    if quick:
        args.append("--quick")
    print(f"\n$ {' '.join(args[1:])}", flush=True)
    return subprocess.call(args)


def table(rows: list[Row]) -> None:
    print("\n" + "=" * 110)
    print(f"hbbus benchmarks — {machine()}")
    print(f"{'bench':<10} {'metric':<62} {'value':>16}  {'target':<10} verdict")
    for row in rows:
        verdict = {True: "met", False: "NOT met", None: ""}[row.met]
        note = f"  ({row.note})" if row.note else ""
        print(f"{row.bench:<10} {row.metric:<62} {row.value:>16}  {row.target:<10} {verdict}{note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a quick look")
    parser.add_argument("--only", default=",".join(SCRIPTS))
    args = parser.parse_args()
    failed = []
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        for name in args.only.split(","):
            if run_one(name, args.quick, out.name) != 0:
                failed.append(name)
        rows = [Row(**orjson.loads(line)) for line in Path(out.name).read_bytes().splitlines()]
    table(rows)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
