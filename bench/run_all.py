"""Every benchmark in turn, each printing its own tables (the tables of docs/benchmarks.md).

    python bench/run_all.py            # the figures of docs/benchmarks.md, about 8 minutes
    python bench/run_all.py --quick    # smaller counts for a spot check, under 3 minutes

RQ comparisons run when `rq` is installed (pip install -e '.[bench]'), and are skipped
otherwise. Run them one at a time on an otherwise quiet machine: they measure it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [
    ("throughput.py", []),
    ("pickup.py", []),
    ("kill_latency.py", []),
    ("scale.py", []),
    ("idle.py", []),
]
QUICK = [
    ("throughput.py", ["--tasks", "400", "--runs", "3"]),
    ("pickup.py", ["--tasks", "60", "--runs", "3"]),
    ("kill_latency.py", ["--tasks", "30", "--runs", "3"]),
    ("scale.py", ["--runs", "1", "--queues", "2000,20000"]),
    ("idle.py", ["--seconds", "15"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, under 3 minutes")
    parser.add_argument("--no-rq", action="store_true", help="skip the RQ comparisons")
    args = parser.parse_args()
    started = time.monotonic()
    failed = []
    for script, extra in QUICK if args.quick else FULL:
        argv = [sys.executable, str(HERE / script), *extra]
        if args.no_rq and script in ("throughput.py", "pickup.py", "idle.py"):
            argv.append("--no-rq")
        print(f"\n## {script} {' '.join(extra)}".rstrip(), flush=True)
        t0 = time.monotonic()
        if subprocess.run(argv, cwd=HERE).returncode != 0:
            failed.append(script)
        print(f"({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\nall done in {time.monotonic() - started:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
