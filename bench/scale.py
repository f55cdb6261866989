"""Scale: (1) 200 and 1,000 concurrent `sleep 5` tasks on one executor (max_concurrency
raised to match): the executor's peak RSS, the CPU seconds it spent from the push to the last
done record, and its CPU while the tasks sleep; how each grows from 200 to 1,000. (2) Claim
rate against queue length: 2,000, 20,000 and 100,000 queued tasks of `true`, time for the
executor (max_concurrency 16) to finish the first 2,000: the rate must not fall as the queue
grows. Medians over --runs.

    python bench/scale.py [--runs 3] [--sizes 200,1000] [--queues 2000,20000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import redis
from _harness import cpu_seconds, executor, guard_of, machine, peak_rss_mb, redis_server, rss_mb

SLEEP = 5.0
FIRST = 2000


def concurrent(url: str, r: redis.Redis, cmd_dir: str, n: int) -> dict[str, float]:
    r.flushall()
    with executor(url, cmd_dir, max_concurrency=n) as proc:
        rss0, cpu0 = rss_mb(proc.pid), cpu_seconds(proc.pid)
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.rpush("queue_job_task",
                       json.dumps({"id": f"s{i}", "task": {"cmdline": f"sleep {SLEEP:g}"}}))
        t0 = time.monotonic()
        pipe.execute()
        # All are running well before 1.5 s (spawning 1,000 takes a fraction of a second);
        # the window [1.5 s, 4.5 s] is the executor watching 1,000 sleepers.
        time.sleep(1.5 - (time.monotonic() - t0))
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.hget(f"{{queue_job_task}}:task:s{i}", "pid")
        running = sum(1 for pid in pipe.execute() if pid)
        cpu_a, t_a = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(max(0.0, SLEEP - 0.5 - (time.monotonic() - t0)))
        cpu_b, t_b = cpu_seconds(proc.pid), time.monotonic()
        while r.llen("queue_job_task_logs") < n:
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        guard = guard_of(proc.pid)
        result = {
            "running": running, "rss0": rss0, "peak": peak_rss_mb(proc.pid),
            "cpu": cpu_seconds(proc.pid) - cpu0, "sleeping_pct": (cpu_b - cpu_a) / (t_b - t_a) * 100,
            "elapsed": elapsed, "guard_rss": rss_mb(guard) if guard else float("nan"),
        }
    statuses = {json.loads(x)["status"] for x in r.lrange("queue_job_task_logs", 0, -1)}
    assert statuses == {"succeeded"}, statuses
    return result


def claim_rate(url: str, r: redis.Redis, cmd_dir: str, queued: int) -> float:
    assert queued >= FIRST, f"queue lengths start at {FIRST}"
    r.flushall()
    for start in range(0, queued, 10000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(queued, start + 10000)):
            pipe.rpush("queue_job_task", json.dumps({"id": f"q{i}", "task": {"cmdline": "true"}}))
        pipe.execute()
    with executor(url, cmd_dir, max_concurrency=16):
        t0 = time.perf_counter()
        while r.llen("queue_job_task_logs") < FIRST:
            time.sleep(0.001)
        elapsed = time.perf_counter() - t0
    return FIRST / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="200,1000")
    parser.add_argument("--queues", default="2000,20000,100000")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    queues = [int(x) for x in args.queues.split(",") if x]
    conc: dict[int, list[dict[str, float]]] = {}
    rates: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        for name in ("sleep", "true"):
            shutil.copy(shutil.which(name) or f"/bin/{name}", os.path.join(cmd_dir, name))
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            for n in sizes:
                conc.setdefault(n, []).append(concurrent(server.url, r, cmd_dir, n))
            for q in queues:
                rates.setdefault(q, []).append(claim_rate(server.url, r, cmd_dir, q))
    print(f"machine: {machine()}")
    if sizes:
        print(f"Concurrent `sleep {SLEEP:g}` tasks on one executor, medians of {args.runs} runs")
        print("| tasks | RSS before, MB | peak RSS, MB | CPU s, push to last done | "
              "CPU while they sleep, % of a core | push to last done, s | guard RSS, MB |")
        print("|---|---|---|---|---|---|---|")
        med = {n: {k: statistics.median(run[k] for run in conc[n]) for k in conc[n][0]}
               for n in sizes}
        for n in sizes:
            m = med[n]
            assert m["running"] == n, f"only {m['running']} of {n} were running"
            print(f"| {n} | {m['rss0']:.1f} | {m['peak']:.1f} | {m['cpu']:.2f} | "
                  f"{m['sleeping_pct']:.2f} | {m['elapsed']:.2f} | {m['guard_rss']:.1f} |")
        if len(sizes) > 1:
            a, b = med[sizes[0]], med[sizes[-1]]
            print(f"from {sizes[0]} to {sizes[-1]} tasks ({sizes[-1] / sizes[0]:.0f}x): peak RSS "
                  f"+{b['peak'] - a['peak']:.1f} MB ({(b['peak'] - a['rss0']) / sizes[-1] * 1024:.0f} KiB "
                  f"per task over the idle RSS), CPU x{b['cpu'] / a['cpu']:.1f}")
    if queues:
        print(f"Claim rate against queue length: first {FIRST} tasks of `true`, "
              f"max_concurrency 16, medians of {args.runs} runs")
        print("| queued | tasks/s | vs the shortest queue |")
        print("|---|---|---|")
        base = statistics.median(rates[queues[0]])
        for q in queues:
            rate = statistics.median(rates[q])
            print(f"| {q:,} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
