"""Delayed tasks at scale, each against a baseline measured in the same run:

1. 100,000 tasks parked for the same second, moved onto the queue by a mover (a dispatcher,
   which runs the same mover as executors, and claims nothing from that queue): lateness of
   the 50th, 99th and 100th percentile task (when the queue reached that length, minus the
   due time), against the mover's poll interval;
2. executor CPU per claimed `true` task with 100,000 tasks parked for later against none
   (bench/policy_cost.py's harness, alternated runs).

    python bench/schedule.py [--parked 100000] [--runs 3]
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
from pathlib import Path

import redis
from _harness import machine, redis_server, stop
from policy_cost import ROOT, run_once

from task_job.broker import parked_member

SCHEDULED, IDS = "{queue_job_task}:scheduled", "{queue_job_task}:scheduled_ids"


def park(r: redis.Redis, n: int, due: float, prefix: str) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        task_id = f"{prefix}{i}"
        msg = json.dumps({"id": task_id, "task": {"cmdline": "true", "enqueue_at": due}})
        member = parked_member("queue_job_task", task_id, msg.encode())
        pipe.zadd(SCHEDULED, {member: due})
        pipe.hset(IDS, task_id, member)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def lateness(url: str, r: redis.Redis, n: int) -> tuple[float, float, float]:
    r.flushall()
    marks: dict[float, float] = {}
    with tempfile.TemporaryDirectory(prefix="tj-mover-") as tmp:
        (Path(tmp) / "c.json").write_text(json.dumps(
            {"redis_addr": url, "cmd_dir": tmp, "state_dir": tmp, "log_level": "warning",
             "executor_id": "mover"}))
        proc = subprocess.Popen([sys.executable, "-m", "task_job.cli", "dispatch", "--config",
                                 str(Path(tmp) / "c.json")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while r.zscore("{queue_job_task}:dispatchers", "mover") is None:  # the mover is up
                if proc.poll() is not None:
                    raise RuntimeError("the mover did not start")
                time.sleep(0.01)
            sec, usec = r.time()
            due = sec + usec / 1e6 + 1.0 + n / 25_000  # time enough to park them all first
            park(r, n, due, "s")
            sec, usec = r.time()
            if sec + usec / 1e6 > due:
                raise RuntimeError("parking took longer than the margin before due")
            while True:
                length = r.llen("queue_job_task")
                sec, usec = r.time()
                now = sec + usec / 1e6
                for q in (0.5, 0.99, 1.0):
                    if q not in marks and length >= q * n:
                        marks[q] = now - due
                if len(marks) == 3:
                    break
                if now > due + 60:
                    raise RuntimeError(f"only {length} of {n} moved a minute after due")
                time.sleep(0.002)
        finally:
            stop(proc, 30)
    return marks[0.5], marks[0.99], marks[1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parked", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    cmd_dir = tempfile.mkdtemp(prefix="tj-cmd-")
    shutil.copy(shutil.which("true") or "/bin/true", os.path.join(cmd_dir, "true"))
    try:
        with redis_server() as (server, r):
            print(f"1. {args.parked} tasks due in the same second: lateness on the queue", flush=True)
            runs = [lateness(server.url, r, args.parked) for _ in range(args.runs)]
            for i, (p50, p99, p100) in enumerate(runs):
                print(f"   run {i + 1}: p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, last {p100 * 1e3:.0f} ms")
            print(f"   median p99 lateness {statistics.median(r[1] for r in runs) * 1e3:.0f} ms "
                  "(the mover looks every 250 ms; target: within 1 s)")

            print(f"2. executor CPU per task, {args.parked} tasks parked for later against none", flush=True)
            cpu: dict[str, list[float]] = {"none": [], "parked": []}

            def fill(rr: redis.Redis) -> None:
                sec, _ = rr.time()
                park(rr, args.parked, sec + 3600, "later")

            for i in range(args.runs):
                for name in (("none", "parked") if i % 2 == 0 else ("parked", "none")):
                    cpu[name].append(run_once(ROOT, server.url, r, cmd_dir, args.tasks,
                                              setup=fill if name == "parked" else None))
                    print(f"   run {i + 1} {name:6}: {cpu[name][-1] * 1e6:5.0f} us per task", flush=True)
            c0, c1 = statistics.median(cpu["none"]), statistics.median(cpu["parked"])
            print(f"   median: {c0 * 1e6:.0f} us with none parked, {c1 * 1e6:.0f} us with "
                  f"{args.parked} ({(c1 - c0) * 1e6:+.0f} us)")
    finally:
        shutil.rmtree(cmd_dir, ignore_errors=True)
    print(f"\n{machine()}")


if __name__ == "__main__":
    main()
