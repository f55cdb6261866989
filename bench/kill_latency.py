"""Kill latency: N running `sleep` tasks, each killed through <queue_name>_control; time from
the push of the kill to the task's done record. p50, p99, max over all runs pooled.

    python bench/kill_latency.py [--tasks 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import redis
from _harness import executor, machine, pct, redis_server


def next_record(r: redis.Redis) -> dict:
    item = r.blpop(["queue_job_task_logs"], timeout=30)
    assert item is not None, "no record within 30 s"
    return json.loads(item[1])


def one_run(url: str, r: redis.Redis, cmd_dir: str, n: int) -> list[float]:
    r.flushall()
    latencies = []
    with executor(url, cmd_dir, max_concurrency=4, kill_grace=5):
        for i in range(n):
            task_id = f"k{i}"
            r.rpush("queue_job_task", json.dumps({"id": task_id, "task": {"cmdline": "sleep.sh"}}))
            rec = next_record(r)  # its first output: it is running
            assert rec["id"] == task_id and rec["msg_type"] == "stdout", rec
            t0 = time.perf_counter()
            r.rpush("queue_job_task_control", json.dumps({"id": task_id, "type": "kill"}))
            rec = next_record(r)
            latencies.append(time.perf_counter() - t0)
            assert rec["msg_type"] == "done" and rec["status"] == "killed", rec
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    samples: list[float] = []
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        script = os.path.join(cmd_dir, "sleep.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho started\nexec sleep 100\n")
        os.chmod(script, 0o755)
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            samples += one_run(server.url, r, cmd_dir, args.tasks)
    ms = [s * 1000 for s in samples]
    print(f"Kill latency: {args.tasks} running tasks killed one by one through "
          f"queue_job_task_control, {args.runs} runs pooled ({len(ms)} samples), ms")
    print(f"machine: {machine()}")
    print("| measure | p50 | p99 | max |")
    print("|---|---|---|---|")
    print(f"| push of the kill to the done record | {statistics.median(ms):.2f} | "
          f"{pct(ms, 99):.2f} | {max(ms):.2f} |")


if __name__ == "__main__":
    main()
