"""Dependencies against real Redis and executors as subprocesses: a chain runs in order
whatever order it was pushed in, a failed middle cancels the rest naming it, a whole DAG is
held all-or-nothing and a cycle is refused naming it, a wait is bounded by depends_timeout,
and a kill ends a waiting task."""

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

from .conftest import done_of, wait_done, wait_until, write_config

FAST = dict(heartbeat_interval=0.3, dead_after=1.5)


@pytest.fixture
def two(make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path, cmd_dir: Path) -> Config:
    for name, body in (("step.sh", "sleep 0.3; echo step $1"), ("fail.sh", "exit 3")):
        (cmd_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (cmd_dir / name).chmod(0o755)
    for i in range(2):
        cfg = make_config(executor_id=f"d{i}", state_dir=str(tmp_path / f"d{i}"), **FAST)
        spawn_executor("run", "--config", str(write_config(tmp_path / f"d{i}.json", cfg)))
    return make_config(**FAST)


def msg(task_id: str, cmd: str = "step.sh", *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "task": {"cmdline": cmd, "cmd_args": [task_id],
                                    **({"depends_on": list(deps)} if deps else {}), **extra}}


async def _registered(r: redis.Redis, config: Config) -> None:
    await wait_until(lambda: r.zcard(Keys.for_config(config).executors) == 2, 60, what="two executors")


async def test_a_chain_pushed_backwards_runs_in_order(two: Config, sync_redis: redis.Redis) -> None:
    await _registered(sync_redis, two)
    a, b, c = (f"{x}-{uuid.uuid4().hex[:6]}" for x in "abc")
    # raw pushes, last first: c names b, which nobody has seen yet; it waits
    sync_redis.rpush(two.queue_name, orjson.dumps(msg(c, "step.sh", b)))
    await wait_until(lambda: sync_redis.hget(Keys.for_config(two).task(c), "status") == b"waiting", 10,
                     what="c waiting")
    async with AsyncClient(two) as client:
        assert await client.whereabouts(c) == ("pending", "waiting")
        rows, _ = await client.tasks(status="waiting")
        assert [(r["id"], r["waiting_on"]) for r in rows] == [(c, [b])]
        await client.submit("step.sh", [b], task_id=b, depends_on=[a])
        assert sync_redis.llen(two.queue_name) == 0  # held by the client: never on the queue
        await client.submit("step.sh", [a], task_id=a)
    spans = []
    for task_id in (a, b, c):
        done = await wait_done(sync_redis, two, task_id, timeout=30)
        assert done.fields["status"] == "succeeded"
        spans.append((done.fields["started_at"], done.fields["finished_at"]))
    assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0], spans


async def test_a_dag_with_a_failed_middle_cancels_the_last_naming_it(two: Config, sync_redis: redis.Redis) -> None:
    await _registered(sync_redis, two)
    a, b, c, d = (f"{x}-{uuid.uuid4().hex[:6]}" for x in "abcd")
    dag = {"id": f"dag-{uuid.uuid4().hex[:6]}", "tasks": [
        msg(c, "step.sh", b), msg(b, "fail.sh", a), msg(a), msg(d, "step.sh", a)]}
    async with AsyncClient(two) as client:
        accepted = await client.submit_dag(dag)
        assert [t.id for t in accepted.tasks] == [c, b, a, d]
        with pytest.raises(ProtocolError, match="already known"):
            await client.submit_dag(dag)  # the DAG's id is taken: nothing held twice
    assert (await wait_done(sync_redis, two, a, timeout=30)).fields["status"] == "succeeded"
    assert (await wait_done(sync_redis, two, d, timeout=30)).fields["status"] == "succeeded"
    assert (await wait_done(sync_redis, two, b, timeout=30)).fields["status"] == "failed"
    done = await wait_done(sync_redis, two, c, timeout=30)
    assert done.fields["status"] == "cancelled" and f"dependency {b} ended failed" in done.data
    assert len(done_of(sync_redis, two, c)) == 1
    waiting, until, why = Keys.for_config(two).waiting
    assert sync_redis.hlen(waiting) == 0 and sync_redis.zcard(until) == 0 and sync_redis.hlen(why) == 0


async def test_a_cycle_or_an_unknown_reference_rejects_the_whole_dag(two: Config, sync_redis: redis.Redis) -> None:
    await _registered(sync_redis, two)
    keys = Keys.for_config(two)
    a, b, c = (f"{x}-{uuid.uuid4().hex[:6]}" for x in "abc")
    cyclic = {"id": f"dag-{uuid.uuid4().hex[:6]}", "tasks": [msg(a, "step.sh", c), msg(b, "step.sh", a),
                                                              msg(c, "step.sh", b)]}
    async with AsyncClient(two) as client:
        with pytest.raises(ProtocolError, match=f"cycle: {a} -> {c} -> {b} -> {a}"):
            await client.submit_dag(cyclic)
        with pytest.raises(ProtocolError, match="'nobody-knows', which is neither in it nor known"):
            await client.submit_dag({"id": f"dag-{uuid.uuid4().hex[:6]}",
                                     "tasks": [msg(a), msg(b, "step.sh", a, "nobody-knows")]})
    assert not any(sync_redis.exists(keys.task(t)) for t in (a, b, c))  # nothing held
    # pushed raw onto the queue, the DAG is rejected whole: its id's done record says why
    sync_redis.rpush(two.queue_name, orjson.dumps(cyclic))
    done = await wait_done(sync_redis, two, cyclic["id"], timeout=20)
    assert done.fields["status"] == "rejected" and "cycle" in done.data
    assert not any(sync_redis.exists(keys.task(t)) for t in (a, b, c))


async def test_a_wait_ends_at_depends_timeout_or_at_a_kill(two: Config, sync_redis: redis.Redis) -> None:
    await _registered(sync_redis, two)
    late, killed = (f"{x}-{uuid.uuid4().hex[:6]}" for x in ("late", "killed"))
    sync_redis.rpush(two.queue_name, orjson.dumps(msg(late, "step.sh", "never-pushed", depends_timeout=1.5)))
    async with AsyncClient(two) as client:
        await client.submit("step.sh", task_id=killed, depends_on=["never-pushed"])
        await client.kill(killed, by="test")
        done = await wait_done(sync_redis, two, killed, timeout=10)
        assert done.fields["status"] == "cancelled" and "killed while waiting" in done.data
    done = await wait_done(sync_redis, two, late, timeout=15)
    assert done.fields["status"] == "cancelled"
    assert "dependency never-pushed not seen within depends_timeout" in done.data
    assert done.fields["finished_at"] - float(sync_redis.hget(Keys.for_config(two).task(late), "waiting_since")) >= 1.5
