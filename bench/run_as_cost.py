"""Cost of `run_as`: N `true` tasks at concurrency 16 run by an executor as root, with and
without `run_as` (another user), in alternated runs. Prints the median CPU per task of the
executor and of its helper processes (the guard; with run_as, the user's spawner), and the
median throughput of each, and their ratio. Needs root.

    python bench/run_as_cost.py [--tasks 2000] [--runs 5] [--user nobody]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable

from _harness import cpu_seconds, machine, redis_server
from policy_cost import ROOT, run_once


def helpers_cpu(pid: int) -> float:
    """CPU seconds of the executor's own helper processes (guard, spawners): its children
    that are Python (tasks are `true`)."""
    total = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as c:
                        if b"python" in c.read().split(b"\0")[0]:
                            total += cpu_seconds(int(child))
                except OSError:
                    continue  # a task that ended meanwhile
    return total


def noting_helpers(into: list[float]) -> Callable[[int], float]:
    """A CPU reading of the executor that also appends its helpers' reading to `into`."""
    def read(pid: int) -> float:
        into.append(helpers_cpu(pid))
        return cpu_seconds(pid)
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--user", default="nobody")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run_as_cost.py needs root")
    cmd_dir = tempfile.mkdtemp(prefix="tj-cmd-")
    os.chmod(cmd_dir, 0o755)
    shutil.copy(shutil.which("true") or "/bin/true", os.path.join(cmd_dir, "true"))
    cpu: dict[str, list[float]] = {"plain": [], "run_as": []}
    helpers: dict[str, list[float]] = {"plain": [], "run_as": []}
    rate: dict[str, list[float]] = {"plain": [], "run_as": []}
    try:
        with redis_server() as (server, r):
            for i in range(args.runs):
                order = [("plain", {}), ("run_as", {"run_as": args.user})]
                for name, extra in (order if i % 2 == 0 else order[::-1]):
                    took: list[float] = []
                    both: list[float] = []
                    cpu[name].append(run_once(ROOT, server.url, r, cmd_dir, args.tasks, took,
                                              cpu=noting_helpers(both), **extra))
                    helpers[name].append((both[-1] - both[0]) / args.tasks)
                    rate[name].append(args.tasks / took[0])
                    print(f"run {i + 1} {name:7}: {cpu[name][-1] * 1e6:5.0f} us executor + "
                          f"{helpers[name][-1] * 1e6:4.0f} us helpers CPU per task, "
                          f"{rate[name][-1]:5.0f} tasks/s", flush=True)
    finally:
        shutil.rmtree(cmd_dir, ignore_errors=True)
    c0, c1 = statistics.median(cpu["plain"]), statistics.median(cpu["run_as"])
    print(f"\n{machine()}; {args.tasks} `true` tasks, concurrency 16, {args.runs} alternated runs")
    r0, r1 = statistics.median(rate["plain"]), statistics.median(rate["run_as"])
    print(f"executor CPU per task: {c0 * 1e6:.0f} us without run_as, {c1 * 1e6:.0f} us with "
          f"({(c1 - c0) * 1e6:+.0f} us)")
    h0, h1 = statistics.median(helpers["plain"]), statistics.median(helpers["run_as"])
    print(f"helper processes' CPU per task: {h0 * 1e6:.0f} us without, {h1 * 1e6:.0f} us with; "
          f"executor and helpers together {(c0 + h0) * 1e6:.0f} us against {(c1 + h1) * 1e6:.0f} us")
    print(f"throughput: {r0:.0f} tasks/s without, {r1:.0f} with ({r1 / r0:.2f}x)")


if __name__ == "__main__":
    main()
