"""Fleet timings: routed kill latency over three executors, and takeover time of a SIGKILLed
executor (SIGKILL to its tasks' `lost` records), with heartbeat_interval 1 s, dead_after 3 s.

    python bench/fleet.py [--kills 60] [--takeovers 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import tempfile
import time

from _harness import executor, redis_server, summary_ms, wait_done

FLEET = {"heartbeat_interval": 1.0, "dead_after": 3.0, "max_concurrency": 4}


def running(r, task_id: str, index: int) -> bool:
    return any(json.loads(x)["id"] == task_id for x in r.lrange("queue_job_task_logs", index, -1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--takeovers", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        script = os.path.join(cmd_dir, "sleep.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho started\nexec sleep 100\n")
        os.chmod(script, 0o755)

        with contextlib.ExitStack() as stack:
            owners = set()
            for n in range(3):
                stack.enter_context(executor(server.url, cmd_dir, executor_id=f"e{n}", **FLEET))
            index, latencies = 0, []
            for i in range(args.kills):
                task_id = f"k{i}"
                r.rpush("queue_job_task", json.dumps({"id": task_id, "task": {"cmdline": "sleep.sh"}}))
                while not running(r, task_id, index):
                    time.sleep(0.0005)
                owners.add(r.hget("{queue_job_task}:task:" + task_id, "executor"))
                t0 = time.perf_counter()
                r.rpush("queue_job_task_control", json.dumps({"id": task_id, "type": "kill"}))
                rec, index = wait_done(r, "queue_job_task_logs", task_id, index)
                latencies.append(time.perf_counter() - t0)
                assert rec["status"] == "killed", rec
        print(f"routed kill, {args.kills} tasks over {len(owners)} executors: {summary_ms(latencies)}")

        takeovers = []
        for round_ in range(args.takeovers):
            r.flushall()
            with executor(server.url, cmd_dir, executor_id=f"victim{round_}", **FLEET) as victim:
                ids = [f"v{round_}-{i}" for i in range(3)]
                for task_id in ids:
                    r.rpush("queue_job_task", json.dumps({"id": task_id, "task": {"cmdline": "sleep.sh"}}))
                while not all(running(r, t, 0) for t in ids):
                    time.sleep(0.001)
                with executor(server.url, cmd_dir, executor_id=f"survivor{round_}", **FLEET):
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    t0 = time.perf_counter()
                    for task_id in ids:
                        rec, _ = wait_done(r, "queue_job_task_logs", task_id, 0, timeout=60)
                        assert rec["status"] == "lost", rec
                    takeovers.append(time.perf_counter() - t0)
        print(f"takeover after SIGKILL (dead_after {FLEET['dead_after']:g}s, heartbeat "
              f"{FLEET['heartbeat_interval']:g}s), {args.takeovers} rounds: median "
              f"{statistics.median(takeovers):.2f}s, worst {max(takeovers):.2f}s")


if __name__ == "__main__":
    main()
