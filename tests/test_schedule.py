"""Delayed tasks against real Redis with executors as subprocesses: parked until due, moved
once however many executors race, started within a second of their time, cancelled by a
kill while parked."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from task_job.broker import Keys
from task_job.client import AsyncClient
from task_job.config import Config
from task_job.errors import ProtocolError
from task_job.protocol import parse_task

from .conftest import done_of, records_of, wait_done, wait_until, write_config

FAST = dict(heartbeat_interval=0.3, dead_after=1.5)


@pytest.fixture
def three(make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path,
          sync_redis: redis.Redis, cmd_dir: Path) -> Config:
    (cmd_dir / "now.sh").write_text("#!/bin/sh\necho ran\n")
    (cmd_dir / "now.sh").chmod(0o755)
    config = make_config(**FAST)
    for i in range(3):
        cfg = make_config(executor_id=f"m{i}", state_dir=str(tmp_path / f"m{i}"), **FAST)
        spawn_executor("run", "--config", str(write_config(tmp_path / f"m{i}.json", cfg)))
    return config


@pytest.fixture
def flaky(cmd_dir: Path) -> Path:
    """A script that always fails with exit status 3."""
    (cmd_dir / "flaky.sh").write_text("#!/bin/sh\nexit 3\n")
    (cmd_dir / "flaky.sh").chmod(0o755)
    return cmd_dir / "flaky.sh"


async def _registered(r: redis.Redis, config: Config) -> None:
    keys = Keys.for_config(config)
    await wait_until(lambda: r.zcard(keys.executors) == 3, 60, what="three executors")


async def test_delayed_tasks_start_on_time_and_once_with_three_executors_racing(
        three: Config, sync_redis: redis.Redis) -> None:
    await _registered(sync_redis, three)
    async with AsyncClient(three) as client:
        at = await client.server_time() + 2.0
        ids = [await client.submit("now.sh", at=at) for _ in range(30)]
        delayed = await client.submit("now.sh", delay=1.0)
        assert (await client.whereabouts(ids[0])) == ("pending", "scheduled")
        rows, _ = await client.tasks(status="scheduled", limit=1000)
        assert {r["id"] for r in rows} >= set(ids) and all(r["due"] == at for r in rows if r["id"] in ids)
        # a raw push carrying its time, straight onto the shared queue: the claiming
        # executor parks it; one with a delay is parked once, its delay fixed at the claim
        raw_at = {"id": uuid.uuid4().hex, "task": {"cmdline": "now.sh", "enqueue_at": at}}
        raw_delay = {"id": uuid.uuid4().hex, "task": {"cmdline": "now.sh", "delay": 1.5}}
        pushed = await client.server_time()
        sync_redis.rpush(three.queue_name, orjson.dumps(raw_at), orjson.dumps(raw_delay))
    assert sync_redis.llen(three.queue_name) <= 2  # the client parked its own: none queued
    for task_id in [*ids, raw_at["id"]]:
        done = await wait_done(sync_redis, three, task_id, timeout=20)
        assert done.fields["status"] == "succeeded"
        assert at <= done.fields["started_at"] <= at + 1.0 + 0.5, (done.fields["started_at"] - at)
    for task_id in [*ids, raw_at["id"], delayed, raw_delay["id"]]:
        assert len(done_of(sync_redis, three, task_id)) == 1
    done = await wait_done(sync_redis, three, raw_delay["id"], timeout=20)
    # started_at is the executor's clock, `pushed` Redis' TIME: the executor's estimate of the
    # offset between them is good to a few milliseconds
    assert pushed + 1.5 - 0.05 <= done.fields["started_at"] <= pushed + 1.5 + 1.5
    assert sync_redis.llen(f"{three.queue_name}_dead") == 0  # nothing moved twice
    keys = Keys.for_config(three)
    assert sync_redis.zcard(keys.scheduled) == 0 and sync_redis.hlen(keys.scheduled_ids) == 0


async def test_a_kill_cancels_a_parked_task(three: Config, sync_redis: redis.Redis) -> None:
    await _registered(sync_redis, three)
    async with AsyncClient(three) as client:
        task_id = await client.submit("now.sh", delay=30)
        await client.kill(task_id, by="test")
        done = await wait_done(sync_redis, three, task_id, timeout=10)
        assert done.fields["status"] == "cancelled" and "before its time" in done.data
        assert await client.whereabouts(task_id) == ("finished", "cancelled")
        with pytest.raises(ProtocolError, match="already known"):
            await client.submit("now.sh", task_id=task_id)


def test_enqueue_at_takes_rfc3339_with_a_zone_or_unix_seconds() -> None:
    def at(value: Any) -> float | None:
        return parse_task(orjson.dumps({"id": "1", "task": {"cmdline": "x", "enqueue_at": value}})).enqueue_at

    assert at("2026-11-25T10:00:00Z") == at("2026-11-25T18:00:00+08:00") == 1795600800.0
    assert at(1795600800) == 1795600800.0
    for bad, why in (("2026-11-25T10:00:00", "needs a zone"), ("tomorrow", "not RFC 3339"),
                     (True, "RFC 3339 or unix seconds")):
        with pytest.raises(ProtocolError, match=why):
            at(bad)
    with pytest.raises(ProtocolError, match="exclude each other"):
        parse_task(orjson.dumps({"id": "1", "task": {"cmdline": "x", "enqueue_at": 1, "delay": 1}}))


async def test_retries_back_off_then_end_in_one_done_record(three: Config, sync_redis: redis.Redis,
                                                            flaky: Path) -> None:
    await _registered(sync_redis, three)
    task_id = uuid.uuid4().hex
    sync_redis.rpush(three.queue_name, orjson.dumps({"id": task_id, "task": {
        "cmdline": "flaky.sh", "retries": 3, "retry_delay": 0.4}}))
    done = await wait_done(sync_redis, three, task_id, timeout=30)
    records = [r for r in records_of(sync_redis, three, task_id) if r.msg_type in ("retry", "done")]
    assert [r.msg_type for r in records] == ["retry", "retry", "retry", "done"]
    assert [r.fields["attempt"] for r in records] == [1, 2, 3, 4]
    assert done.fields["status"] == "failed" and done.fields["exit_code"] == 3
    assert all(r.fields["status"] == "failed" and r.fields["exit_code"] == 3 for r in records[:3])
    # the delays, measured: retry record to the next attempt's start, 0.4, 0.8 and 1.6 s
    # within ±50% (plus the mover's quarter second and a spawn)
    for i, base in enumerate((0.4, 0.8, 1.6)):
        gap = records[i + 1].fields["started_at"] - records[i].fields["ts"]
        assert base * 0.5 - 0.05 <= gap <= base * 1.5 + 0.4, (i, gap)
        assert base * 0.5 - 0.01 <= records[i].fields["next_at"] - records[i].fields["ts"] <= base * 1.5 + 0.01
    assert len(done_of(sync_redis, three, task_id)) == 1


async def test_a_kill_during_back_off_ends_the_retrying(three: Config, sync_redis: redis.Redis,
                                                        flaky: Path) -> None:
    await _registered(sync_redis, three)
    async with AsyncClient(three) as client:
        task_id = uuid.uuid4().hex
        sync_redis.rpush(three.queue_name, orjson.dumps({"id": task_id, "task": {
            "cmdline": "flaky.sh", "retries": 5, "retry_delay": 30}}))
        await wait_until(lambda: any(r.msg_type == "retry" for r in records_of(sync_redis, three, task_id)),
                         20, what="the first retry record")
        assert await client.whereabouts(task_id) == ("pending", "retrying")
        rows, _ = await client.tasks(status="scheduled")
        assert [(r["id"], r["status"], r["attempt"]) for r in rows] == [(task_id, "retrying", 1)]
        assert rows[0]["due"] == rows[0]["next_at"]
        await client.kill(task_id)
        done = await wait_done(sync_redis, three, task_id, timeout=10)
    assert done.fields["status"] == "cancelled" and done.fields["attempt"] == 1


async def test_on_lost_requeue_with_retries_keeps_its_older_meaning(three: Config, sync_redis: redis.Redis,
                                                                    flaky: Path) -> None:
    await _registered(sync_redis, three)
    task_id = uuid.uuid4().hex
    sync_redis.rpush(three.queue_name, orjson.dumps({"id": task_id, "task": {
        "cmdline": "flaky.sh", "on_lost": "requeue", "retries": 3}}))
    done = await wait_done(sync_redis, three, task_id, timeout=20)
    assert done.fields["status"] == "failed"  # not re-run after a failure
    assert [r.msg_type for r in records_of(sync_redis, three, task_id) if r.msg_type == "retry"] == []
    assert "attempt" not in done.fields


@pytest.fixture
def grouped(make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path,
            cmd_dir: Path) -> tuple[Config, dict[str, Any]]:
    (cmd_dir / "nap.sh").write_text("#!/bin/sh\nsleep ${1:-2}\n")
    (cmd_dir / "nap.sh").chmod(0o755)
    config = make_config(**FAST)
    procs = {}
    for i in range(3):
        cfg = make_config(executor_id=f"g{i}", state_dir=str(tmp_path / f"g{i}"), max_concurrency=4, **FAST)
        procs[f"g{i}"] = spawn_executor("run", "--config", str(write_config(
            tmp_path / f"g{i}.json", cfg, groups={"deploy": {"parallel": 2}})))
    return config, procs


async def test_a_group_never_runs_more_than_its_parallel_across_the_fleet(
        grouped: tuple[Config, dict[str, Any]], sync_redis: redis.Redis) -> None:
    config, _ = grouped
    await _registered(sync_redis, config)
    ids = [uuid.uuid4().hex for _ in range(6)]
    for task_id in ids:
        sync_redis.rpush(config.queue_name, orjson.dumps(
            {"id": task_id, "task": {"cmdline": "nap.sh", "cmd_args": ["2"], "group": "deploy"}}))
    other = uuid.uuid4().hex  # another group, unlimited: not held up
    sync_redis.rpush(config.queue_name, orjson.dumps(
        {"id": other, "task": {"cmdline": "nap.sh", "cmd_args": ["0"], "group": "default"}}))
    assert (await wait_done(sync_redis, config, other, timeout=10)).fields["status"] == "succeeded"
    spans = []
    for task_id in ids:
        done = await wait_done(sync_redis, config, task_id, timeout=60)
        assert done.fields["status"] == "succeeded"
        spans.append((done.fields["started_at"], done.fields["finished_at"], done.fields["executor"]))
    for start, _, _ in spans:  # at each start, how many ran: never more than two
        assert sum(1 for s, f, _ in spans if s <= start < f) <= 2, spans
    assert len({e for _, _, e in spans}) >= 2  # spread over the fleet, limited across it
    keys = Keys.for_config(config)
    running, waiting = keys.group_keys("deploy")
    assert sync_redis.scard(running) == 0 and sync_redis.llen(waiting) == 0


async def test_a_sigkilled_executor_gives_its_group_lease_back_at_takeover(
        grouped: tuple[Config, dict[str, Any]], sync_redis: redis.Redis) -> None:
    import signal

    config, procs = grouped
    await _registered(sync_redis, config)
    keys = Keys.for_config(config)
    running, waiting = keys.group_keys("deploy")
    first = [uuid.uuid4().hex for _ in range(2)]
    for task_id in first:
        sync_redis.rpush(config.queue_name, orjson.dumps(
            {"id": task_id, "task": {"cmdline": "nap.sh", "cmd_args": ["60"], "group": "deploy"}}))
    await wait_until(lambda: sync_redis.scard(running) == 2, 20, what="two leases taken")
    later = uuid.uuid4().hex
    sync_redis.rpush(config.queue_name, orjson.dumps(
        {"id": later, "task": {"cmdline": "nap.sh", "cmd_args": ["0"], "group": "deploy"}}))
    await wait_until(lambda: sync_redis.llen(waiting) == 1, 20, what="the third waiting")
    holder = sync_redis.hget(keys.task(first[0]), "executor").decode()
    procs[holder].signal(signal.SIGKILL)
    procs[holder].wait(10)
    lost = await wait_done(sync_redis, config, first[0], timeout=30)
    assert lost.fields["status"] == "lost"
    done = await wait_done(sync_redis, config, later, timeout=30)  # ran on the lease given back
    assert done.fields["status"] == "succeeded" and done.fields["executor"] != holder


async def test_the_client_keeps_a_full_groups_task_off_the_shared_queue(
        grouped: tuple[Config, dict[str, Any]], sync_redis: redis.Redis) -> None:
    config, _ = grouped
    await _registered(sync_redis, config)
    keys = Keys.for_config(config)
    running, waiting = keys.group_keys("deploy")
    async with AsyncClient(config) as client:
        first = [await client.submit("nap.sh", ["60"], group="deploy") for _ in range(2)]
        await wait_until(lambda: sync_redis.scard(running) == 2, 20, what="two leases taken")
        later = await client.submit("nap.sh", ["0"], group="deploy")
        # straight to the group's waiting list: an executor that knows no groups never sees it
        assert sync_redis.llen(config.queue_name) == 0 and sync_redis.lrange(waiting, 0, -1)[0].find(later.encode()) > 0
        await client.kill(first[0])
        done = await wait_done(sync_redis, config, later, timeout=30)
        assert done.fields["status"] == "succeeded"
        await client.kill(first[1])
