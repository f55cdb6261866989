"""Throughput: N tasks running `true`, pushed at once; time from the first push to the last
done record. task-job at max_concurrency 1, 4, 16; baselines in the same run: raw spawning
with asyncio.create_subprocess_exec at the same concurrency, and RQ (default forking worker
and SimpleWorker) running the same command via subprocess.run. Medians over --runs.

    python bench/throughput.py [--tasks 2000] [--runs 3] [--no-rq]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _harness import ROOT, executor, redis_server

TRUE = "/bin/true"


async def raw_spawn(n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            proc = await asyncio.create_subprocess_exec(TRUE)
            await proc.wait()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t0


def task_job(url: str, r, cmd_dir: str, n: int, concurrency: int) -> float:
    r.flushall()
    with executor(url, cmd_dir, max_concurrency=concurrency, log_level="error"):
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.rpush("queue_job_task", json.dumps({"id": f"t{i}", "task": {"cmdline": "true"}}))
        t0 = time.perf_counter()
        pipe.execute()
        # `true` prints nothing: each task's only record is its done record.
        while r.llen("queue_job_task_logs") < n:
            time.sleep(0.001)
        elapsed = time.perf_counter() - t0
        statuses = {json.loads(x)["status"] for x in r.lrange("queue_job_task_logs", 0, -1)}
        assert statuses == {"succeeded"}, statuses
        return elapsed


def rq_run(url: str, r, n: int, worker_class: str | None) -> float:
    from rq import Queue

    r.flushall()
    queue = Queue("bench", connection=r)
    t0 = time.perf_counter()
    with r.pipeline() as pipe:
        for _ in range(n):
            queue.enqueue("rq_jobs.run", [TRUE], pipeline=pipe)
        pipe.execute()
    args = [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", url, "-q", "bench"]
    if worker_class:
        args += ["-w", worker_class]
    subprocess.run(args, cwd=os.path.dirname(__file__), check=True,
                   env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-rq", action="store_true")
    args = parser.parse_args()
    n = args.tasks
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        shutil.copy(TRUE, os.path.join(cmd_dir, "true"))
        rows = []
        rq_default = rq_simple = None
        if not args.no_rq:
            rq_default = statistics.median(rq_run(server.url, r, n, None) for _ in range(args.runs))
            rq_simple = statistics.median(rq_run(server.url, r, n, "rq.worker.SimpleWorker")
                                          for _ in range(args.runs))
        for c in (1, 4, 16):
            raw = statistics.median(asyncio.run(raw_spawn(n, c)) for _ in range(args.runs))
            ours = statistics.median(task_job(server.url, r, cmd_dir, n, c) for _ in range(args.runs))
            rows.append((c, raw, ours))
    print(f"{n} tasks of `true`, medians of {args.runs} runs (tasks/s)")
    if rq_default:
        print(f"  RQ default worker: {n / rq_default:8.0f}/s   RQ SimpleWorker: {n / rq_simple:8.0f}/s")
    print(f"{'conc':>5} {'raw asyncio':>12} {'task-job':>10} {'tj/raw':>7} {'tj/RQ':>7} {'tj/Simple':>10}")
    for c, raw, ours in rows:
        vs_rq = f"{rq_default / ours:7.1f}" if rq_default else "      -"
        vs_simple = f"{rq_simple / ours:10.1f}" if rq_simple else "         -"
        print(f"{c:>5} {n / raw:12.0f} {n / ours:10.0f} {raw / ours:7.2f} {vs_rq} {vs_simple}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
