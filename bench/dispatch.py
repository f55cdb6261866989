"""The dispatcher's cost, each against a baseline measured in the same run:

1. placements per second of one dispatcher (`task-job dispatch`): N tasks on the dispatcher
   queue placed onto the queues of 4 registered executors (registry entries kept alive by
   this script, no executor processes, so placement alone is timed), against one executor's
   own claim-run-report rate on N `true` tasks at concurrency 16;
2. push-to-running latency through a dispatcher (push onto the dispatcher queue; the executor
   waits on its own queue) against direct claiming (push onto the shared queue; the executor
   waits on it), one task at a time, `date +%s.%N` as the task, alternated in blocks.

    python bench/dispatch.py [--tasks 5000] [--samples 100] [--runs 3]
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from _harness import executor, machine, pct, redis_server, stop
from policy_cost import ROOT, run_once

CLOCK = "date +%s.%N"


@contextmanager
def dispatcher(url: str) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.TemporaryDirectory(prefix="tj-disp-") as tmp:
        cfg = {"redis_addr": url, "cmd_dir": tmp, "state_dir": tmp, "log_level": "warning",
               "executor_id": "bench-dispatcher"}
        (Path(tmp) / "c.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "task_job.cli", "dispatch", "--config",
                                 str(Path(tmp) / "c.json")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with redis.Redis.from_url(url) as r:
                deadline = time.monotonic() + 15
                while r.zscore("{queue_job_task}:dispatchers", "bench-dispatcher") is None:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the dispatcher did not start")
                    time.sleep(0.01)
            yield proc
        finally:
            stop(proc, 30)


def fake_executors(r: redis.Redis, n: int) -> list[str]:
    """Registry entries that look alive (heartbeat now, by the server's clock)."""
    sec, usec = r.time()
    ids = [f"fake-{i}" for i in range(n)]
    for ident in ids:
        r.hset(f"{{queue_job_task}}:executor:{ident}", mapping={
            "status": "up", "slots": 100000, "labels": "{}", "dead_after": 3600})
        r.zadd("{queue_job_task}:executors", {ident: sec * 1000 + usec // 1000})
    return ids


def placements(url: str, r: redis.Redis, n: int) -> float:
    r.flushall()
    ids = fake_executors(r, 4)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.rpush("queue_job_task_dispatch", json.dumps({"id": f"d{i}", "task": {"cmdline": "true"}}))
    pipe.execute()
    with dispatcher(url):
        t0 = time.perf_counter()
        while sum(r.llen(f"{{queue_job_task}}:inbox:{i}") for i in ids) < n:
            time.sleep(0.002)
        took = time.perf_counter() - t0
    return n / took


def latency(url: str, r: redis.Redis, cmd_dir: str, via: bool, n: int) -> list[float]:
    r.flushall()
    out = []
    with executor(url, cmd_dir, max_concurrency=1, block_on="inbox" if via else "shared"), \
            (dispatcher(url) if via else _nothing()):
        time.sleep(0.3)  # idle: the executor (and the dispatcher) sit in their blocking waits
        for i in range(n):
            t0 = time.time()
            r.rpush("queue_job_task_dispatch" if via else "queue_job_task",
                    json.dumps({"id": f"l{i}", "task": {"cmdline": CLOCK}}))
            clock = None
            while True:
                _, raw = r.blpop(["queue_job_task_logs"], timeout=10)
                rec = json.loads(raw)
                if rec["msg_type"] == "stdout":
                    clock = float(rec["data"])
                elif rec["msg_type"] == "done":
                    assert rec["status"] == "succeeded", rec
                    break
            assert clock is not None
            out.append(clock - t0)
    return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=100, help="latency samples per block")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cmd_dir = tempfile.mkdtemp(prefix="tj-cmd-")
    os.chmod(cmd_dir, 0o755)
    for program in ("true", "date"):
        shutil.copy(shutil.which(program) or f"/bin/{program}", os.path.join(cmd_dir, program))
    try:
        with redis_server() as (server, r):
            print("1. placements per second, one dispatcher, against an executor's own rate", flush=True)
            placed, claimed = [], []
            for i in range(args.runs):
                placed.append(placements(server.url, r, args.tasks))
                took: list[float] = []
                run_once(ROOT, server.url, r, cmd_dir, min(args.tasks, 2000), took)
                claimed.append(min(args.tasks, 2000) / took[0])
                print(f"   run {i + 1}: {placed[-1]:6.0f} placements/s; executor {claimed[-1]:5.0f} tasks/s",
                      flush=True)
            p, c = statistics.median(placed), statistics.median(claimed)
            print(f"   median: {p:.0f} placements/s, executor {c:.0f} tasks/s: {p / c:.1f}x")

            print("2. push to running: through a dispatcher against direct claiming", flush=True)
            direct: list[float] = []
            via: list[float] = []
            for i in range(args.runs):
                for through in ((False, True) if i % 2 == 0 else (True, False)):
                    (via if through else direct).extend(latency(server.url, r, cmd_dir, through, args.samples))
            print(f"   direct p50 {pct(direct, 50) * 1e3:.2f} ms p99 {pct(direct, 99) * 1e3:.2f} ms; "
                  f"via dispatcher p50 {pct(via, 50) * 1e3:.2f} ms p99 {pct(via, 99) * 1e3:.2f} ms; "
                  f"added p50 {(pct(via, 50) - pct(direct, 50)) * 1e3:.2f} ms")
    finally:
        shutil.rmtree(cmd_dir, ignore_errors=True)
    print(f"\n{machine()}")


if __name__ == "__main__":
    main()
