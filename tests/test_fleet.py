"""A fleet of executors: takeover of dead ones, routed kills, cancels, a frozen executor."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from task_job.broker import Keys
from task_job.client import AsyncClient
from task_job.config import Config
from task_job.protocol import build_task

from .conftest import (
    ExecutorHandle,
    ExecutorProcess,
    done_of,
    pid_alive,
    records_of,
    wait_done,
    wait_until,
    write_config,
)

FAST = dict(heartbeat_interval=0.2, dead_after=1.5)
ONCE = '#!/bin/sh\nif [ -e "$1" ]; then echo second attempt; exit 0; fi\ntouch "$1"\necho first\nexec sleep 100\n'


def owner_of(r: redis.Redis, config: Config, task_id: str) -> str | None:
    value = r.hget(Keys.for_config(config).task(task_id), "executor")
    return value.decode() if value else None


async def spawn_registered(spawn_executor: Callable[..., ExecutorProcess], r: redis.Redis,
                           config: Config, path: Path) -> ExecutorProcess:
    write_config(path, config, **FAST)
    proc = spawn_executor("run", "--config", str(path))
    keys = Keys.for_config(config)
    await wait_until(lambda: r.zscore(keys.executors, config.executor_id), 15,
                     what=f"{config.executor_id} registered")
    return proc


async def test_sigkilled_executors_tasks_are_taken_over_and_reported_lost(
        make_config: Callable[..., Config], start_executor: Any,
        spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    victim = make_config(**FAST)
    proc = await spawn_registered(spawn_executor, sync_redis, victim, tmp_path / "victim.json")
    async with AsyncClient(victim) as client:
        ids = [await client.submit("sleep.sh", ["100"]) for _ in range(3)]
        await wait_until(lambda: all(records_of(sync_redis, victim, i) for i in ids), what="running")
        killed_at = time.monotonic()
        proc.signal(signal.SIGKILL)
        proc.wait(10)
        survivor = make_config(**FAST)
        await start_executor(survivor)
        dones = [await wait_done(sync_redis, victim, i, timeout=20) for i in ids]
        took = time.monotonic() - killed_at
    pids = [int(sync_redis.hget(Keys.for_config(victim).task(i), "pid")) for i in ids]
    await wait_until(lambda: not any(pid_alive(p) for p in pids), 5,
                     what="the dead executor's tasks to die with it")
    for done in dones:
        assert done.fields["status"] == "lost", done.fields
        assert done.fields["executor"] == survivor.executor_id
        assert victim.executor_id in done.data
    keys = Keys.for_config(victim)
    assert sync_redis.zscore(keys.executors, victim.executor_id) is None
    assert sync_redis.llen(keys.processing(victim.executor_id)) == 0
    assert sync_redis.llen(keys.processing(survivor.executor_id)) == 0
    assert took < victim.dead_after + 10, f"takeover took {took:.2f}s"


FAMILY = '#!/bin/sh\nsleep 100 &\necho $! > "$1"\nexec sleep 100\n'


def guard_of(pid: int) -> int | None:
    """The executor's guard: its child whose command line carries the guard's source."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"killpg" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


async def test_tasks_and_their_children_die_with_a_sigkilled_executor(
        make_config: Callable[..., Config], spawn_executor: Callable[..., ExecutorProcess],
        sync_redis: redis.Redis, cmd_dir: Path, tmp_path: Path) -> None:
    (cmd_dir / "family.sh").write_text(FAMILY)
    (cmd_dir / "family.sh").chmod(0o755)
    config = make_config(**FAST)
    proc = await spawn_registered(spawn_executor, sync_redis, config, tmp_path / "e.json")
    first = guard_of(proc.pid)
    assert first is not None
    os.kill(first, signal.SIGKILL)  # a guard that dies is replaced
    second = await wait_until(lambda: (g := guard_of(proc.pid)) != first and g, 10,
                              what="a new guard")
    pidfile = tmp_path / "child.pid"
    async with AsyncClient(config) as client:
        task_id = await client.submit("family.sh", [str(pidfile)])
    child = int(await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                                 what="the task's child"))
    leader = int(await wait_until(
        lambda: sync_redis.hget(Keys.for_config(config).task(task_id), "pid"), what="task pid"))
    assert pid_alive(leader) and pid_alive(child)
    proc.signal(signal.SIGKILL)
    proc.wait(10)
    await wait_until(lambda: not pid_alive(leader) and not pid_alive(child), 5,
                     interval=0.01, what="the task and its child to die with the executor")
    await wait_until(lambda: not pid_alive(second), 5, what="the guard to exit")


async def test_lost_task_that_opted_in_is_requeued_and_runs_again(
        make_config: Callable[..., Config], start_executor: Any,
        spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path, cmd_dir: Path) -> None:
    (cmd_dir / "once.sh").write_text(ONCE)
    (cmd_dir / "once.sh").chmod(0o755)
    victim = make_config(**FAST)
    proc = await spawn_registered(spawn_executor, sync_redis, victim, tmp_path / "victim.json")
    marker = tmp_path / "marker"
    sync_redis.rpush(victim.queue_name, build_task("again", "once.sh", [str(marker)], on_lost="requeue"))
    await wait_until(lambda: records_of(sync_redis, victim, "again"), what="first attempt running")
    proc.signal(signal.SIGKILL)
    proc.wait(10)
    await start_executor(make_config(**FAST))
    done = await wait_done(sync_redis, victim, "again", timeout=20)
    assert done.fields["status"] == "succeeded"
    out = b"".join(r.payload for r in records_of(sync_redis, victim, "again") if r.msg_type == "stdout")
    assert out == b"first\nsecond attempt\n"
    assert [r.seq for r in records_of(sync_redis, victim, "again")] == [0, 1, 2]
    assert sync_redis.hget(Keys.for_config(victim).task("again"), "attempt") == b"2"


async def test_kill_reaches_the_executor_that_runs_the_task(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    configs = [make_config(**FAST) for _ in range(3)]
    handles: list[ExecutorHandle] = [await start_executor(c) for c in configs]
    latencies = []
    async with AsyncClient(configs[0]) as client:
        for n in range(9):
            task_id = f"route-{n}"
            await client.submit("sleep.sh", ["100"], task_id=task_id)
            await wait_until(lambda t=task_id: records_of(sync_redis, configs[0], t), what="running")
            owner = owner_of(sync_redis, configs[0], task_id)
            pushed = time.monotonic()
            await client.kill(task_id)
            done = await wait_done(sync_redis, configs[0], task_id)
            latencies.append(time.monotonic() - pushed)
            assert done.fields["status"] == "killed" and done.fields["executor"] == owner
    assert statistics.median(latencies) < 0.2, latencies
    assert all(not h.executor.running for h in handles)


async def test_kill_of_a_queued_task_cancels_it_before_it_starts(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    config = make_config(max_concurrency=1)
    await start_executor(config)
    marker = tmp_path / "ran"
    async with AsyncClient(config) as client:
        blocker = await client.submit("sleep.sh", ["100"])
        await wait_until(lambda: records_of(sync_redis, config, blocker), what="slot busy")
        queued = await client.submit("count.sh", [str(marker)])
        await client.kill(queued)
        await wait_until(lambda: sync_redis.hget(Keys.for_config(config).task(queued), "status"),
                         what="cancel mark")
        await client.kill(blocker)
        done = await wait_done(sync_redis, config, queued)
    assert done.fields["status"] == "cancelled"
    assert not marker.exists()
    assert len(done_of(sync_redis, config, queued)) == 1


async def test_frozen_executor_is_taken_over_and_does_not_report_twice_when_it_wakes(
        make_config: Callable[..., Config], start_executor: Any,
        spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    frozen = make_config(**FAST)
    proc = await spawn_registered(spawn_executor, sync_redis, frozen, tmp_path / "frozen.json")
    pidfile = tmp_path / "child.pid"
    async with AsyncClient(frozen) as client:
        task_id = await client.submit("family.sh", [str(pidfile)])
        await wait_until(lambda: records_of(sync_redis, frozen, task_id), what="running")
        proc.signal(signal.SIGSTOP)
        try:
            await start_executor(make_config(**FAST))
            lost = await wait_done(sync_redis, frozen, task_id, timeout=20)
        finally:
            proc.signal(signal.SIGCONT)
        assert lost.fields["status"] == "lost"
        keys = Keys.for_config(frozen)
        # Awake again, it notices the takeover, stops its copy of the task and registers anew.
        await wait_until(lambda: sync_redis.zscore(keys.executors, frozen.executor_id), 10,
                         what="frozen executor registered again")
        grandchild = int(pidfile.read_text())
        await wait_until(lambda: not pid_alive(grandchild), 10, what="its task stopped")
        after = await client.submit("install.sh", ["after wake"])
        await wait_done(sync_redis, frozen, after)
    assert len(done_of(sync_redis, frozen, task_id)) == 1
    assert proc.proc.poll() is None  # it kept serving


async def test_registry_events_announce_executors_up_and_down(
        config: Config, start_executor: Any, redis_url: str) -> None:
    sub = aioredis.Redis.from_url(redis_url)
    pubsub = sub.pubsub()
    await pubsub.subscribe(Keys.for_config(config).registry)
    try:
        handle = await start_executor(config)
        await handle.stop()
        events = []
        async with asyncio.timeout(10):
            while len(events) < 2:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg:
                    events.append(orjson.loads(msg["data"]))
    finally:
        await pubsub.aclose()
        await sub.aclose()
    assert [e["status"] for e in events] == ["UP", "DOWN"]
    up = events[0]
    assert up["app"] == "task-job" and up["hostName"] and up["ipAddr"]
    assert up["metadata"]["executor_id"] == config.executor_id
    assert up["metadata"]["inbox"] == Keys.for_config(config).inbox(config.executor_id)
    assert up["metadata"]["control"] == Keys.for_config(config).control_inbox(config.executor_id)
    assert up["metadata"]["inbox"].endswith(f":inbox:{config.executor_id}")  # its task queue
