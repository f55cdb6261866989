"""Cost of the hardening on the claim-run-report path: executor CPU per task, this checkout
against a baseline commit (default: the last one before the hardening), in alternated runs
of N `true` tasks that each carry a few `env` variables (so the environment policy has work
to do), at max_concurrency 16. Prints the median CPU per task of each side and the difference,
and the median throughput of each (push to the last done record).

    python bench/policy_cost.py [--tasks 2000] [--runs 5] [--baseline 42a440d]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from _harness import cpu_seconds, machine, redis_server, stop

ROOT = Path(__file__).resolve().parent.parent
ENV = {"MODE": "ci", "CI_BRANCH": "main", "BUILD_ID": "42", "LANG": "C.UTF-8"}


def run_once(checkout: Path, url: str, r: redis.Redis, cmd_dir: str, n: int,
             elapsed: list[float] | None = None, cpu: Callable[[int], float] = cpu_seconds,
             setup: Callable[[redis.Redis], None] | None = None, **config: object) -> float:
    """Executor CPU seconds per task for n tasks (as `cpu` reads them from its pid), the
    executor started from `checkout`; the time from the pushes to the last done record is
    appended to `elapsed` when given."""
    r.flushall()
    if setup is not None:
        setup(r)
    with tempfile.TemporaryDirectory(prefix="tj-cost-") as tmp:
        cfg = {"redis_addr": url, "cmd_dir": cmd_dir, "state_dir": tmp, "executor_id": "cost",
               "log_level": "warning", "max_concurrency": 16, **config}
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "task_job.cli", "run", "--config", str(path)],
                                cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while r.zscore("{queue_job_task}:executors", "cost") is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"executor from {checkout} did not start")
                time.sleep(0.01)
            time.sleep(0.3)  # let start-up work settle before the CPU is read
            before = cpu(proc.pid)
            pipe = r.pipeline(transaction=False)
            for i in range(n):
                pipe.rpush("queue_job_task", json.dumps(
                    {"id": f"t{i}", "task": {"cmdline": "true", "env": ENV}}))
            t0 = time.perf_counter()
            pipe.execute()
            while r.llen("queue_job_task_logs") < n:
                time.sleep(0.005)
            if elapsed is not None:
                elapsed.append(time.perf_counter() - t0)
            used = cpu(proc.pid) - before
            statuses = {json.loads(x)["status"] for x in r.lrange("queue_job_task_logs", 0, -1)}
            assert statuses == {"succeeded"}, statuses
        finally:
            stop(proc, 60)
    return used / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", default="42a440d", help="git ref to compare against")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tj-base-") as base_dir, \
            tempfile.TemporaryDirectory(prefix="tj-cmd-") as cmd_dir:
        base = Path(base_dir) / "checkout"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)
        shutil.copy(shutil.which("true") or "/bin/true", os.path.join(cmd_dir, "true"))
        try:
            sides: dict[str, list[float]] = {"baseline": [], "this": []}
            took: dict[str, list[float]] = {"baseline": [], "this": []}
            with redis_server() as (server, r):
                for i in range(args.runs):
                    order = [("baseline", base), ("this", ROOT)]
                    for name, checkout in (order if i % 2 == 0 else order[::-1]):
                        sides[name].append(run_once(checkout, server.url, r, cmd_dir, args.tasks,
                                                    took[name]))
                        print(f"run {i + 1} {name:8}: {sides[name][-1] * 1e6:6.0f} us CPU per task",
                              flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False, capture_output=True)
    b, t = statistics.median(sides["baseline"]), statistics.median(sides["this"])
    print(f"\n{machine()}; {args.tasks} `true` tasks with {len(ENV)} env variables, concurrency 16, "
          f"{args.runs} alternated runs")
    print(f"baseline {args.baseline}: median {b * 1e6:.0f} us executor CPU per task")
    print(f"this checkout:    median {t * 1e6:.0f} us executor CPU per task")
    print(f"difference: {(t - b) * 1e6:+.0f} us per task ({t / b:.3f}x)")
    rb, rt = (args.tasks / statistics.median(took[k]) for k in ("baseline", "this"))
    print(f"throughput: baseline {rb:.0f} tasks/s, this checkout {rt:.0f} tasks/s ({rt / rb:.2f}x)")


if __name__ == "__main__":
    main()
