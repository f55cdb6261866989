"""The management API's cost, three ways, each against a baseline measured in the same run:

1. submissions per second through `POST /api/v1/tasks` (`task-job api`, no executor competing
   for the cores) against a bare aiohttp handler that only reads the body, the same load
   generator driving both, alternated;
2. the latency `?wait=` adds: `POST /api/v1/tasks?wait=30` round trips against the executor's
   own push-to-done (RPUSH, then the task's done record read with XREAD), alternated;
3. the executor's CPU per `true` task with the API enabled and idle against disabled,
   alternated (bench/policy_cost.py's harness).

    python bench/api.py [--requests 3000] [--concurrency 16] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import redis
from _harness import executor, machine, pct, redis_server, stop
from policy_cost import ROOT, run_once

from task_job.embedded import free_port

TOKEN = "bench-token-0123456789"
TOKENS = [{"name": "bench", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
           "scopes": ["admin"]}]
BARE = """
import sys
from aiohttp import web
async def handle(request):
    await request.read()
    return web.json_response({"id": "x", "status": "queued"}, status=202)
app = web.Application()
app.router.add_post("/api/v1/tasks", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server on {port} did not start") from None
            time.sleep(0.02)


@contextmanager
def api_server(redis_url: str, cmd_dir: str) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tj-api-") as tmp:
        cfg = {"redis_addr": redis_url, "cmd_dir": cmd_dir, "state_dir": tmp, "server_port": port,
               "api_tokens": TOKENS, "log_level": "warning"}
        (Path(tmp) / "c.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "task_job.cli", "api", "--config",
                                 str(Path(tmp) / "c.json")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, proc)
            yield port
        finally:
            stop(proc, 30)


@contextmanager
def bare_server() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield port
    finally:
        stop(proc, 30)


async def load(port: int, n: int, concurrency: int) -> float:
    """Submissions per second: n POSTs of a task message by `concurrency` workers."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}/api/v1/tasks"
    left = iter(range(n))
    async with aiohttp.ClientSession(headers=headers) as session:
        async def worker() -> None:
            for _ in left:
                body = json.dumps({"id": uuid.uuid4().hex, "task": {"cmdline": "true"}})
                async with session.post(url, data=body) as resp:
                    await resp.read()
                    assert resp.status == 202, resp.status
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


async def wait_latency(port: int, r: redis.Redis, n: int) -> tuple[list[float], list[float]]:
    """(through ?wait, direct push-to-done) round trips in seconds, alternated one by one."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{port}/api/v1/tasks?wait=30"
    api, direct = [], []
    async with aiohttp.ClientSession(headers=headers) as session:
        for i in range(n):
            for via_api in ((True, False) if i % 2 == 0 else (False, True)):
                task_id = uuid.uuid4().hex
                msg = json.dumps({"id": task_id, "task": {"cmdline": "true"}})
                t0 = time.perf_counter()
                if via_api:
                    async with session.post(url, data=msg) as resp:
                        await resp.read()
                        assert resp.status == 200
                    api.append(time.perf_counter() - t0)
                else:
                    await asyncio.to_thread(_push_and_wait, r, msg, task_id)
                    direct.append(time.perf_counter() - t0)
    return api, direct


def _push_and_wait(r: redis.Redis, msg: str, task_id: str) -> None:
    key = f"{{queue_job_task}}:log:{task_id}"
    r.rpush("queue_job_task", msg)
    last = "0-0"
    while True:
        for _, entries in r.xread({key: last}, block=30000) or []:
            for entry_id, fields in entries:
                last = entry_id
                if b'"msg_type":"done"' in fields[b"r"]:
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per CPU-cost run")
    parser.add_argument("--parts", default="123", help="which measurements, e.g. 3")
    args = parser.parse_args()
    cmd_dir = tempfile.mkdtemp(prefix="tj-cmd-")
    shutil.copy(shutil.which("true") or "/bin/true", os.path.join(cmd_dir, "true"))
    try:
        with redis_server() as (server, r):
            rates: dict[str, list[float]] = {"api": [], "bare": []}
            if "1" in args.parts:
                print("1. submissions per second (no executor)", flush=True)
            for i in range(args.runs if "1" in args.parts else 0):
                for name in (("api", "bare") if i % 2 == 0 else ("bare", "api")):
                    r.flushall()
                    with (api_server(server.url, cmd_dir) if name == "api" else bare_server()) as port:
                        asyncio.run(load(port, args.requests // 10, args.concurrency))  # warm-up
                        rates[name].append(asyncio.run(load(port, args.requests, args.concurrency)))
                    print(f"   run {i + 1} {name:4}: {rates[name][-1]:6.0f}/s", flush=True)
            if "1" in args.parts:
                a, b = statistics.median(rates["api"]), statistics.median(rates["bare"])
                print(f"   median: API {a:.0f}/s, bare aiohttp {b:.0f}/s: {a / b:.2f}x")
            if "2" in args.parts:
                latency(server.url, r, cmd_dir)
            if "3" in args.parts:
                cpu_cost(server.url, r, cmd_dir, args.runs, args.tasks)
    finally:
        shutil.rmtree(cmd_dir, ignore_errors=True)
    print(f"\n{machine()}")


def latency(url: str, r: redis.Redis, cmd_dir: str) -> None:
    print("2. latency ?wait adds over the executor's own push-to-done", flush=True)
    r.flushall()
    port = free_port()
    with executor(url, cmd_dir, server_port=port, api_tokens=TOKENS,
                  max_concurrency=4) as proc:
        wait_port(port, proc)  # served once the executor has registered
        asyncio.run(wait_latency(port, r, 20))  # warm-up
        api, direct = asyncio.run(wait_latency(port, r, 200))
    print(f"   ?wait p50 {pct(api, 50) * 1e3:.2f} ms p99 {pct(api, 99) * 1e3:.2f} ms; "
          f"direct p50 {pct(direct, 50) * 1e3:.2f} ms p99 {pct(direct, 99) * 1e3:.2f} ms; "
          f"added p50 {(pct(api, 50) - pct(direct, 50)) * 1e3:.2f} ms")


def cpu_cost(url: str, r: redis.Redis, cmd_dir: str, runs: int, tasks: int) -> None:
    print("3. executor CPU per task, API enabled and idle against disabled", flush=True)
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(runs):
        for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
            extra = {"server_port": free_port(), "api_tokens": TOKENS} if name == "on" else {}
            cpu[name].append(run_once(ROOT, url, r, cmd_dir, tasks, **extra))
            print(f"   run {i + 1} {name:3}: {cpu[name][-1] * 1e6:5.0f} us per task", flush=True)
    c0, c1 = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    print(f"   median: {c0 * 1e6:.0f} us off, {c1 * 1e6:.0f} us on ({(c1 - c0) * 1e6:+.0f} us)")


if __name__ == "__main__":
    main()
