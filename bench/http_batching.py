"""HTTP sink batching: for several (http_batch_bytes, http_linger_ms) pairs, the time for a
task printing 2,000,000 lines to reach the receiver completely, and the latency of one-line
tasks (push to the done record POSTed). Medians; the receiver is a real aiohttp server.

    python bench/http_batching.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time

import orjson
from _harness import executor, redis_server
from aiohttp import web

from task_job.embedded import free_port

COMBOS = [(64 << 10, 0), (256 << 10, 0), (256 << 10, 20), (512 << 10, 0), (1 << 20, 0), (1 << 20, 20)]


class Receiver(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.port = free_port()
        self.done_at: dict[str, float] = {}
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()

    async def handle(self, request: web.Request) -> web.Response:
        for rec in orjson.loads(await request.read()):
            if rec["msg_type"] == "done":
                self.done_at[rec["id"]] = time.perf_counter()
        return web.Response(text="ok")

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=256 << 20)
        app.router.add_post("/", self.handle)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def wait(self, task_id: str, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while task_id not in self.done_at:
            if time.monotonic() > deadline:
                raise TimeoutError(task_id)
            time.sleep(0.0005)
        return self.done_at[task_id]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    receiver = Receiver()
    receiver.start()
    receiver.ready.wait()
    url = f"http://127.0.0.1:{receiver.port}/"
    print(f"{'batch':>8} {'linger':>7} {'2M lines s':>11} {'1-line p50 ms':>14}")
    with tempfile.TemporaryDirectory() as cmd_dir, redis_server() as (server, r):
        for name, text in (("short.sh", '#!/bin/sh\nseq 1 "$1"\n'), ("one.sh", "#!/bin/sh\necho one\n")):
            path = os.path.join(cmd_dir, name)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o755)
        for batch, linger in COMBOS:
            bulk, small = [], []
            with executor(server.url, cmd_dir, logs_http=url, http_batch_bytes=batch,
                          http_linger_ms=linger, task_log_max_records=100):
                for run in range(args.runs):
                    r.delete("queue_job_task_logs")
                    task_id = f"bulk-{batch}-{linger}-{run}"
                    t0 = time.perf_counter()
                    r.rpush("queue_job_task", json.dumps({"id": task_id, "task": {"cmdline": "short.sh", "cmd_args": ["2000000"]}}))
                    bulk.append(receiver.wait(task_id) - t0)
                    for i in range(20):
                        task_id = f"one-{batch}-{linger}-{run}-{i}"
                        t0 = time.perf_counter()
                        r.rpush("queue_job_task", json.dumps({"id": task_id, "task": {"cmdline": "one.sh"}}))
                        small.append(receiver.wait(task_id) - t0)
            print(f"{batch >> 10:>7}K {linger:>5}ms {statistics.median(bulk):11.3f} "
                  f"{statistics.median(small) * 1000:14.2f}")
    receiver.loop.call_soon_threadsafe(receiver.loop.stop)


if __name__ == "__main__":
    main()
