"""Pickup latency: with an idle executor waiting, tasks pushed one at a time (each after the
previous one's done record). The task is `date +%s.%N` (a copy of date in cmd_dir: the
cheapest common program that prints a high-resolution clock); measured: RPUSH to that clock (the command running) and RPUSH to the done record. p50, p99,
max. In the same run: RQ (default worker and SimpleWorker) running the same script via
subprocess.run, and the floor: the same program spawned directly, spawn to its clock (what
exec and start-up cost before any program can print anything).

    python bench/pickup.py [--tasks 300] [--runs 3] [--no-rq]
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

import redis
from _harness import executor, have_rq, machine, pct, redis_server, rq_worker

CLOCK = ["date", "+%s.%N"]


def floor(program: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.time()
        printed = subprocess.run([program, CLOCK[1]], capture_output=True, check=True).stdout
        out.append(float(printed) - t0)
    return out


def task_job(url: str, r: redis.Redis, cmd_dir: str, n: int) -> tuple[list[float], list[float]]:
    r.flushall()
    start, done = [], []
    with executor(url, cmd_dir, max_concurrency=1):
        time.sleep(0.2)  # idle: the executor sits in its blocking claim
        for i in range(n):
            t0 = time.time()
            r.rpush("queue_job_task", json.dumps({"id": f"p{i}", "task": {"cmdline": " ".join(CLOCK)}}))
            clock = None
            while True:  # records arrive in order: stdout (the clock), then done
                _, raw = r.blpop(["queue_job_task_logs"], timeout=10)
                rec = json.loads(raw)
                if rec["msg_type"] == "stdout":
                    clock = float(rec["data"])
                elif rec["msg_type"] == "done":
                    t_done = time.time()
                    assert rec["status"] == "succeeded", rec
                    break
            assert clock is not None
            start.append(clock - t0)
            done.append(t_done - t0)
    return start, done


def rq_run(url: str, r: redis.Redis, script: str, n: int, worker_class: str | None
           ) -> tuple[list[float], list[float]]:
    from rq import Queue

    r.flushall()
    queue = Queue("bench", connection=r)
    start, done = [], []
    with rq_worker(url, "bench", worker_class):
        time.sleep(0.2)
        for _ in range(n):
            t0 = time.time()
            job = queue.enqueue("rq_jobs.run", [script, CLOCK[1]])
            while True:  # RQ has no push of results: poll the job's status
                status = job.get_status(refresh=True)
                if status in ("finished", "failed"):
                    t_done = time.time()
                    break
                time.sleep(0.0002)
            assert status == "finished", status
            start.append(float(job.return_value()) - t0)
            done.append(t_done - t0)
    return start, done


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.2f} | {pct(ms, 99):.2f} | {max(ms):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-rq", action="store_true")
    args = parser.parse_args()
    use_rq = not args.no_rq and have_rq()
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        date = shutil.which("date")
        if not date:
            sys.exit("date is needed (the task prints its clock)")
        script = os.path.join(cmd_dir, "date")
        shutil.copy(date, script)
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            samples.setdefault("floor", []).extend(floor(script, args.tasks))
            start, done = task_job(server.url, r, cmd_dir, args.tasks)
            samples.setdefault("tj_start", []).extend(start)
            samples.setdefault("tj_done", []).extend(done)
            if use_rq:
                for label, cls in (("rq", None), ("rqs", "rq.worker.SimpleWorker")):
                    start, done = rq_run(server.url, r, script, args.tasks, cls)
                    samples.setdefault(f"{label}_start", []).extend(start)
                    samples.setdefault(f"{label}_done", []).extend(done)
    print(f"Pickup latency: {args.tasks} tasks one at a time, {args.runs} runs pooled "
          f"({args.tasks * args.runs} samples), ms")
    print(f"machine: {machine()}")
    print("| measure | p50 | p99 | max |")
    print("|---|---|---|---|")
    print(f"| floor: spawn `date` to its clock (no queue) | {summary(samples['floor'])} |")
    print(f"| task-job: push to command running | {summary(samples['tj_start'])} |")
    print(f"| task-job: push to done record | {summary(samples['tj_done'])} |")
    if use_rq:
        print(f"| RQ default worker: push to command running | {summary(samples['rq_start'])} |")
        print(f"| RQ default worker: push to finished | {summary(samples['rq_done'])} |")
        print(f"| RQ SimpleWorker: push to command running | {summary(samples['rqs_start'])} |")
        print(f"| RQ SimpleWorker: push to finished | {summary(samples['rqs_done'])} |")
    overhead = [s - statistics.median(samples["floor"]) for s in samples["tj_start"]]
    print(f"task-job pickup beyond the floor's median: p50 {statistics.median(overhead) * 1000:.2f} ms, "
          f"p99 {pct(overhead, 99) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
