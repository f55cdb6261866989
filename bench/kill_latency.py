"""Kill latency: N running `sleep` tasks, each killed through <queue>_control; time from the
push of the kill to the task's `done` record. Prints p50/p99/max.

    python bench/kill_latency.py [--tasks 100]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from _harness import executor, redis_server, summary_ms, wait_done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        script = os.path.join(cmd_dir, "sleep.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho started\nexec sleep 100\n")
        os.chmod(script, 0o755)
        with executor(server.url, cmd_dir, max_concurrency=4, kill_grace=5):
            index = 0
            latencies = []
            for i in range(args.tasks):
                task_id = f"k{i}"
                r.rpush("queue_job_task", json.dumps({"id": task_id, "task": {"cmdline": "sleep.sh"}}))
                # wait for its first output: it is running
                while not any(json.loads(x)["id"] == task_id for x in r.lrange("queue_job_task_logs", index, -1)):
                    time.sleep(0.0005)
                t0 = time.perf_counter()
                r.rpush("queue_job_task_control", json.dumps({"id": task_id, "type": "kill"}))
                rec, index = wait_done(r, "queue_job_task_logs", task_id, index)
                latencies.append(time.perf_counter() - t0)
                assert rec["status"] == "killed", rec
        print(f"kill latency over {args.tasks} tasks (push to done record): {summary_ms(latencies)}")


if __name__ == "__main__":
    main()
