"""The dispatcher and per-executor queues against real Redis, with executors and dispatchers
as subprocesses: label matching, spreading, SIGKILLed dispatchers and executors, two
dispatchers at once, unroutable tasks, producers pushing onto an executor's own queue."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from task_job.broker import Keys
from task_job.config import Config

from .conftest import ExecutorProcess, done_of, wait_done, wait_until, write_config

FAST = dict(heartbeat_interval=0.3, dead_after=1.5)


@pytest.fixture
def scripts(cmd_dir: Path) -> Path:
    (cmd_dir / "where.sh").write_text("#!/bin/sh\nsleep ${1:-0}\necho done\n")
    (cmd_dir / "where.sh").chmod(0o755)
    return cmd_dir


def task(*, labels: dict[str, Any] | None = None, executor: str | None = None,
         sleep: str = "0") -> dict[str, Any]:
    spec: dict[str, Any] = {"cmdline": "where.sh", "cmd_args": [sleep]}
    if labels:
        spec["labels"] = labels
    if executor:
        spec["executor"] = executor
    return {"id": uuid.uuid4().hex, "task": spec}


class Fleet:
    def __init__(self, make_config: Callable[..., Config], spawn: Callable[..., ExecutorProcess],
                 tmp_path: Path, r: redis.Redis) -> None:
        self.make_config, self.spawn, self.tmp, self.r = make_config, spawn, tmp_path, r
        self.config = make_config(**FAST)
        self.keys = Keys.for_config(self.config)

    def executor(self, ident: str, labels: dict[str, str] | None = None, slots: int = 4) -> ExecutorProcess:
        cfg = self.make_config(executor_id=ident, max_concurrency=slots, state_dir=str(self.tmp / ident), **FAST)
        path = write_config(self.tmp / f"{ident}.json", cfg, labels=labels or {}, block_on="auto")
        return self.spawn("run", "--config", str(path))

    def dispatcher(self, ident: str, **extra: Any) -> ExecutorProcess:
        cfg = self.make_config(executor_id=ident, state_dir=str(self.tmp / ident), **FAST)
        path = write_config(self.tmp / f"{ident}.json", cfg, **extra)
        return self.spawn("dispatch", "--config", str(path))

    async def registered(self, *idents: str) -> None:
        await wait_until(lambda: all(self.r.zscore(self.keys.executors, i) is not None for i in idents),
                         60, what=f"executors {idents} registered")

    async def dispatching(self, n: int = 1) -> None:
        await wait_until(lambda: self.r.zcard(self.keys.dispatchers) >= n, 60, what="a dispatcher")

    def push(self, msg: dict[str, Any]) -> str:
        self.r.rpush(self.config.dispatch_queue, orjson.dumps(msg))
        return str(msg["id"])


@pytest.fixture
def fleet(make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path,
          sync_redis: redis.Redis, scripts: Path) -> Fleet:
    return Fleet(make_config, spawn_executor, tmp_path, sync_redis)


async def test_a_hundred_labelled_tasks_each_land_on_a_matching_executor(fleet: Fleet) -> None:
    fleet.executor("e-linux-a100", {"os": "linux", "gpu": "a100"})
    fleet.executor("e-linux", {"os": "linux"})
    fleet.executor("e-mac", ["macos"])  # type: ignore[arg-type]  # a list of names: {macos: "true"}
    await fleet.registered("e-linux-a100", "e-linux", "e-mac")
    fleet.dispatcher("d1")
    await fleet.dispatching()
    kinds = [({"gpu": "a100"}, {"e-linux-a100"}), ({"os": "linux"}, {"e-linux-a100", "e-linux"}),
             ({"macos": "true"}, {"e-mac"}), ({"gpu": "!=a100"}, {"e-linux", "e-mac"}),
             ({"os": ["linux", "bsd"], "gpu": "!=a100"}, {"e-linux"})]
    pushed = [(fleet.push(task(labels=kinds[i % 5][0])), kinds[i % 5][1]) for i in range(100)]
    for task_id, allowed in pushed:
        done = await wait_done(fleet.r, fleet.config, task_id, timeout=60)
        assert done.fields["status"] == "succeeded" and done.fields["executor"] in allowed, done.fields
    stats = fleet.r.hgetall(fleet.keys.dispatch_stats)
    assert int(stats[b"routed"]) == 100


async def test_placement_spreads_the_load(fleet: Fleet) -> None:
    for i in range(3):
        fleet.executor(f"s{i}", slots=2)
    await fleet.registered("s0", "s1", "s2")
    fleet.dispatcher("d1")
    await fleet.dispatching()
    ids = [fleet.push(task(sleep="0.2")) for _ in range(30)]
    ran = Counter()
    for task_id in ids:
        ran[(await wait_done(fleet.r, fleet.config, task_id, timeout=60)).fields["executor"]] += 1
    assert sum(ran.values()) == 30 and all(ran[f"s{i}"] <= 30 / 3 + 2 for i in range(3)), ran


async def test_a_sigkilled_dispatcher_loses_nothing_and_two_place_each_task_once(fleet: Fleet) -> None:
    fleet.executor("x1", slots=8)
    fleet.executor("x2", slots=8)
    await fleet.registered("x1", "x2")
    first = fleet.dispatcher("d1")
    fleet.dispatcher("d2")
    await fleet.dispatching(2)
    ids = [fleet.push(task()) for _ in range(300)]
    await wait_until(lambda: fleet.r.llen(fleet.config.dispatch_queue) < 250, 30, what="placing")
    first.signal(signal.SIGKILL)
    first.wait(10)
    for task_id in ids:
        await wait_done(fleet.r, fleet.config, task_id, timeout=60)
    for task_id in ids:
        assert len(done_of(fleet.r, fleet.config, task_id)) == 1  # one done record each
    assert fleet.r.llen(fleet.keys.dead) == 0  # no duplicate was placed
    again = fleet.dispatcher("d1")  # a restarted dispatcher with the same id starts clean
    await wait_until(lambda: fleet.r.llen(fleet.keys.dispatching("d1")) == 0, 20, what="d1's list empty")
    assert again.proc.poll() is None


async def test_tasks_waiting_on_a_sigkilled_executor_are_rerouted(fleet: Fleet) -> None:
    victim = fleet.executor("victim", slots=1)
    fleet.executor("survivor", slots=1)
    await fleet.registered("victim", "survivor")
    fleet.dispatcher("d1")
    await fleet.dispatching()
    # five tasks aimed at the victim: one runs (its one slot), four wait in its own queue
    ids = [fleet.push(task(sleep="30", executor="victim"))]
    await wait_until(lambda: fleet.r.llen(fleet.keys.processing("victim")) == 1, 20, what="one running")
    for _ in range(4):
        fleet.r.rpush(fleet.keys.inbox("victim"), orjson.dumps(msg := task()))
        ids.append(str(msg["id"]))
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    for task_id in ids[1:]:
        done = await wait_done(fleet.r, fleet.config, task_id, timeout=60)
        assert done.fields["executor"] == "survivor" and done.fields["status"] == "succeeded"
    lost = await wait_done(fleet.r, fleet.config, ids[0], timeout=60)
    assert lost.fields["status"] == "lost"


async def test_an_unroutable_task_waits_then_is_rejected_with_the_reason(fleet: Fleet) -> None:
    from task_job.client import AsyncClient

    fleet.executor("only-linux", {"os": "linux"})
    await fleet.registered("only-linux")
    fleet.dispatcher("d1", unroutable_after=1.5)
    await fleet.dispatching()
    task_id = fleet.push(task(labels={"os": "plan9"}))
    async with AsyncClient(fleet.config) as client:
        async def listed() -> bool:
            rows, _ = await client.tasks(status="unroutable")
            return any(r["id"] == task_id for r in rows)
        await wait_until(listed, 10, what="listed as unroutable")
    done = await wait_done(fleet.r, fleet.config, task_id, timeout=20)
    assert done.fields["status"] == "rejected" and '"os":"plan9"' in done.data, done.data
    assert fleet.r.zcard(fleet.keys.unroutable) == 0


async def test_producers_and_task_executor_reach_one_executor_without_a_dispatcher(fleet: Fleet) -> None:
    from task_job.client import AsyncClient

    fleet.executor("p1")
    fleet.executor("p2")
    await fleet.registered("p1", "p2")
    direct = task()
    fleet.r.rpush(fleet.keys.inbox("p2"), orjson.dumps(direct))  # as the original intended
    on_shared = task(executor="p1")  # a raw push of a targeted task onto the shared queue
    fleet.r.rpush(fleet.config.queue_name, orjson.dumps(on_shared))
    nobody = task(executor="never-registered")
    fleet.r.rpush(fleet.config.queue_name, orjson.dumps(nobody))
    async with AsyncClient(fleet.config) as client:
        via_client = await client.submit("where.sh", ["0"], executor="p2")
        assert fleet.r.llen(fleet.config.queue_name) <= 1  # never put on the shared queue
        mismatch = await client.submit("where.sh", ["0"], labels={"gpu": "h100"})
    assert (await wait_done(fleet.r, fleet.config, str(direct["id"]), timeout=20)).fields["executor"] == "p2"
    assert (await wait_done(fleet.r, fleet.config, via_client, timeout=20)).fields["executor"] == "p2"
    assert (await wait_done(fleet.r, fleet.config, str(on_shared["id"]), timeout=20)).fields["executor"] == "p1"
    done = await wait_done(fleet.r, fleet.config, str(nobody["id"]), timeout=20)
    assert done.fields["status"] == "rejected" and "'never-registered' is not registered" in done.data
    # a labelled task waits for a dispatcher on its queue: none runs here
    assert fleet.r.llen(fleet.config.dispatch_queue) == 1 and mismatch


async def test_routing_shows_in_metrics_queues_and_refuses_unknown_targets(fleet: Fleet) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from task_job.api.app import Service, create_app
    from task_job.api.auth import Tokens
    from task_job.client import AsyncClient
    from task_job.confine import Policy
    from task_job.errors import ProtocolError

    async with AsyncClient(fleet.config) as client:
        with pytest.raises(ProtocolError, match="'ghost' is not registered"):
            await client.submit("where.sh", ["0"], executor="ghost")  # no dispatcher either
        fleet.executor("m1", {"os": "linux"})
        await fleet.registered("m1")
        fleet.dispatcher("d1")
        await fleet.dispatching()
        ids = [await client.submit("where.sh", ["0"], labels={"os": "linux"}) for _ in range(5)]
        waiting = await client.submit("where.sh", ["0"], executor="ghost")  # the dispatcher waits for it
        for task_id in ids:
            await wait_done(fleet.r, fleet.config, task_id, timeout=30)
        await wait_until(lambda: fleet.r.zcard(fleet.keys.unroutable) == 1, 10, what="ghost's task waiting")
        queues = await client.queues()
        assert queues["dispatch"]["unroutable"] == 1 and queues["executors"][0]["inbox"] == 0
        service = Service(client, fleet.config, Tokens(()), Policy(cmd_dir=fleet.config.cmd_dir))
        from task_job.api.metrics import render

        create_app(service)
        text, _ = await render(service)
    samples = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    assert samples["task_job_tasks_routed_total"] >= 5 and samples["task_job_dispatchers"] == 1
    assert samples["task_job_tasks_unroutable_total"] >= 1 and samples["task_job_placement_seconds_count"] >= 5
    assert waiting
