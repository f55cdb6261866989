"""The fleet under faults at once: an executor SIGKILLed mid-run, Redis restarted from its
append-only file, a replacement joining. Every task id ends with exactly one done record."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import redis

from task_job.broker import Keys
from task_job.config import Config
from task_job.embedded import RedisServer
from task_job.protocol import build_task

from .conftest import ExecutorProcess, wait_until, write_config

SHORT = '#!/bin/sh\necho "task $1"\nsleep 0.0$(( $1 % 9 + 1 ))\necho "done $1" >&2\n'
FAST = dict(heartbeat_interval=0.2, dead_after=1.5, max_concurrency=4)


def done_records(r: redis.Redis, config: Config) -> list[dict[str, object]]:
    out = []
    for start in range(0, r.llen(config.logs_channel), 1000):
        for raw in r.lrange(config.logs_channel, start, start + 999):
            rec = orjson.loads(raw)
            if rec["msg_type"] == "done":
                out.append(rec)
    return out


async def test_fleet_loses_nothing_through_sigkill_redis_restart_and_replacement(
        tmp_path: Path, make_config: Callable[..., Config],
        spawn_executor: Callable[..., ExecutorProcess], cmd_dir: Path) -> None:
    (cmd_dir / "short.sh").write_text(SHORT)
    (cmd_dir / "short.sh").chmod(0o755)
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        configs = [make_config(redis_addr=server.url, **FAST) for _ in range(4)]
        keys = Keys.for_config(configs[0])
        procs = []
        for n, config in enumerate(configs[:3]):
            write_config(tmp_path / f"e{n}.json", config, **FAST)
            procs.append(spawn_executor("run", "--config", str(tmp_path / f"e{n}.json")))
        r = redis.Redis.from_url(server.url)
        await wait_until(lambda: r.zcard(keys.executors) == 3, 20, what="three executors")

        total = 300
        requeue = {f"t{i}" for i in range(0, total, 10)}
        for i in range(total):
            task_id = f"t{i}"
            r.rpush(keys.queue, build_task(task_id, "short.sh", [str(i)],
                                           on_lost="requeue" if task_id in requeue else None))

        await wait_until(lambda: len(done_records(r, configs[0])) >= 40, 30, what="work under way")
        victim = procs[0]
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()

        r.close()
        server.stop()  # SIGTERM: a clean shutdown that completes the append-only file
        server.start()
        r = redis.Redis.from_url(server.url)

        write_config(tmp_path / "e3.json", configs[3], **FAST)
        procs.append(spawn_executor("run", "--config", str(tmp_path / "e3.json")))

        await wait_until(lambda: len({d["id"] for d in done_records(r, configs[0])}) == total,
                         120, interval=0.2, what="a done record for every task")
        dones = done_records(r, configs[0])
        counts = Counter(d["id"] for d in dones)
        assert [i for i, c in counts.items() if c != 1] == []
        statuses = Counter(d["status"] for d in dones)
        assert set(statuses) <= {"succeeded", "lost"}, statuses
        lost = [d for d in dones if d["status"] == "lost"]
        assert all(d["id"] not in requeue for d in lost)  # opted in: ran again instead
        assert all(configs[0].executor_id in str(d["data"]) for d in lost)
        taken_over_after = time.monotonic() - killed_at
        for proc in procs[1:]:
            assert proc.proc.poll() is None  # the survivors never stopped
        assert r.zscore(keys.executors, configs[0].executor_id) is None
        assert r.llen(keys.queue) == 0
        for config in configs:
            assert r.llen(keys.processing(config.executor_id)) == 0
        print(f"\nfault suite: {dict(statuses)}; all settled {taken_over_after:.2f}s after the SIGKILL")
        r.close()
    finally:
        server.stop()
