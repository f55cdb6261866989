"""Throughput: N tasks running `true`, pushed at once; time from the first push to the last
done record. task-job at max_concurrency 1, 4, 16; in the same run, as baselines: raw
spawning of the same processes with asyncio.create_subprocess_exec at the same concurrency
(the limit for a Python executor), and RQ running the same command via subprocess.run with its
default (forking) worker and with SimpleWorker. Medians over --runs; the kinds of run are
interleaved so that a noisy moment of a shared machine hits them alike.

    python bench/throughput.py [--tasks 2000] [--runs 3] [--concurrency 1,4,16] [--no-rq]
                               [--log-level warning]

The executor logs at `warning` here (no line per task); `--log-level info`, the default of a
deployed executor, adds its two JSON lines per task (started, finished) to the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import redis
from _harness import executor, have_rq, machine, redis_server, rq_worker

TRUE = shutil.which("true") or "/bin/true"
# How often the end of a queued run is checked. Polling costs CPU that the raw baseline (timed
# inside its own event loop) never pays; on 2 cores a 0.5 ms poll took about 0.04 off the
# task-job/raw ratio. A 5 ms poll costs a tenth of that and ends the timing at most 5 ms late
# (under 0.5% of a 2,000-task run), which counts against the queued side.
POLL = 0.005


async def raw_spawn(n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            proc = await asyncio.create_subprocess_exec(TRUE)
            await proc.wait()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t0


def task_job(url: str, r: redis.Redis, cmd_dir: str, n: int, concurrency: int,
             log_level: str) -> float:
    r.flushall()
    with executor(url, cmd_dir, max_concurrency=concurrency, log_level=log_level):
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.rpush("queue_job_task", json.dumps({"id": f"t{i}", "task": {"cmdline": "true"}}))
        t0 = time.perf_counter()
        pipe.execute()
        # `true` prints nothing: each task's only record is its done record.
        while r.llen("queue_job_task_logs") < n:
            time.sleep(POLL)
        elapsed = time.perf_counter() - t0
    statuses = {json.loads(x)["status"] for x in r.lrange("queue_job_task_logs", 0, -1)}
    assert statuses == {"succeeded"}, statuses
    return elapsed


def rq_run(url: str, r: redis.Redis, n: int, worker_class: str | None) -> float:
    from rq import Queue

    r.flushall()
    queue = Queue("bench", connection=r)
    with rq_worker(url, "bench", worker_class):
        t0 = time.perf_counter()
        with r.pipeline() as pipe:
            for _ in range(n):
                queue.enqueue("rq_jobs.run", [TRUE], pipeline=pipe)
            pipe.execute()
        while queue.finished_job_registry.count + queue.failed_job_registry.count < n:
            time.sleep(POLL)
        elapsed = time.perf_counter() - t0
    assert queue.failed_job_registry.count == 0, "RQ jobs failed"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--no-rq", action="store_true")
    parser.add_argument("--log-level", default="warning", help="the executor's log_level")
    args = parser.parse_args()
    n = args.tasks
    levels = [int(c) for c in args.concurrency.split(",")]
    use_rq = not args.no_rq and have_rq()
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        shutil.copy(TRUE, os.path.join(cmd_dir, "true"))
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            if use_rq:
                times.setdefault("rq", []).append(rq_run(server.url, r, n, None))
                times.setdefault("rq_simple", []).append(
                    rq_run(server.url, r, n, "rq.worker.SimpleWorker"))
            for c in levels:
                times.setdefault(f"raw{c}", []).append(asyncio.run(raw_spawn(n, c)))
                times.setdefault(f"tj{c}", []).append(
                    task_job(server.url, r, cmd_dir, n, c, args.log_level))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Throughput: {n} tasks of `true` pushed at once, medians of {args.runs} runs, "
          f"executor log_level {args.log_level}")
    print(f"machine: {machine()}")
    if use_rq:
        print(f"RQ default worker {n / med['rq']:.0f} tasks/s, "
              f"RQ SimpleWorker {n / med['rq_simple']:.0f} tasks/s (one worker, one job at a time)")
    header = "| concurrency | raw asyncio/s | task-job/s | task-job/raw |"
    if use_rq:
        header += " task-job/RQ | task-job/SimpleWorker |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for c in levels:
        raw, ours = med[f"raw{c}"], med[f"tj{c}"]
        row = f"| {c} | {n / raw:.0f} | {n / ours:.0f} | {raw / ours:.2f} |"
        if use_rq:
            row += f" {med['rq'] / ours:.1f} | {med['rq_simple'] / ours:.1f} |"
        print(row)


if __name__ == "__main__":
    main()
