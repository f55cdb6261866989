"""The broker's lanes against a real redis-server: packing, replies in order, error replies as
values, reconnects, and the scripts reloaded after Redis forgets them."""

from __future__ import annotations

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from task_job import broker as broker_module
from task_job.broker import BIG_ARG, SCRIPT_NAMES, Broker
from task_job.client import AsyncClient
from task_job.config import Config

from .conftest import ExecutorHandle, wait_done


@pytest.fixture(params=["hiredis reader", "redis-py read_response"])
def reply_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Replies taken straight from hiredis's reader, or through redis-py's read_response (the
    path where hiredis or its parser is missing)."""
    if request.param != "hiredis reader":
        monkeypatch.setattr(broker_module, "_NOT_ENOUGH_DATA", None)
        monkeypatch.setattr(broker_module, "_hiredis_pack", None)
    return str(request.param)


async def test_a_lane_returns_replies_in_order_with_errors_in_their_places(
        config: Config, reply_path: str) -> None:
    broker = Broker(config)
    big = b"x" * (BIG_ARG * 3)  # sent through redis-py's zero-copy path
    try:
        replies = await broker.claim_lane.execute([
            ("SET", "k:str", "v"),
            ("GET", "k:missing"),
            ("INCRBYFLOAT", "k:float", 1.5),
            ("LPUSH", "k:str", "x"),  # WRONGTYPE: an error reply, not an exception raised
            ("EVALSHA", "0" * 40, 0),  # a script Redis does not know
            ("SET", "k:big", big),
            ("STRLEN", "k:big"),
            ("MGET", "k:str", "k:missing"),
        ])
    finally:
        await broker.close()
    assert replies[:3] == [b"OK", None, b"1.5"]
    assert isinstance(replies[3], ResponseError) and "WRONGTYPE" in str(replies[3])
    assert isinstance(replies[4], NoScriptError)
    assert replies[5:] == [b"OK", len(big), [b"v", None]]


async def test_a_lane_cut_by_the_server_raises_once_then_reconnects(
        config: Config, sync_redis: redis.Redis, reply_path: str) -> None:
    broker = Broker(config)
    try:
        assert await broker.claim_lane.execute([("CLIENT", "SETNAME", "lane-under-test")]) == [b"OK"]
        killed = sync_redis.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")
        assert killed >= 1
        try:
            await broker.claim_lane.execute([("PING",)])
        except (RedisConnectionError, OSError):
            pass  # the cut connection: the caller's loop retries
        else:
            raise AssertionError("a lane whose connection the server closed answered a PING")
        assert await broker.claim_lane.execute([("PING",), ("ECHO", "back")]) == [b"PONG", b"back"]
    finally:
        await broker.close()


async def test_tasks_keep_running_after_redis_forgets_the_scripts(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    first = await client.submit("install.sh", ["one"])
    assert (await wait_done(sync_redis, config, first)).fields["status"] == "succeeded"
    sync_redis.script_flush()  # as after a restart of a Redis that keeps no scripts
    second = await client.submit("install.sh", ["two"])
    done = await wait_done(sync_redis, config, second)
    assert done.fields["status"] == "succeeded"
    assert sync_redis.script_exists(*executor.executor.broker.scripts.sha.values()) == [True] * len(SCRIPT_NAMES)


async def test_a_done_record_spooled_by_the_previous_version_is_still_written(
        config: Config, sync_redis: redis.Redis) -> None:
    """Spools outlive upgrades: finish.lua takes the old call (5 keys, 16 args, pid and start
    time at the end) and writes the record whole, without the newer indexes and event."""
    broker = Broker(config)
    keys = broker.keys
    try:
        written = await broker.call(
            "finish", [keys.logs, keys.log("old-1"), keys.task("old-1"), keys.processing("x"), keys.dead],
            ["new", "x", 0, b'{"id":"old-1","msg_type":"done","seq":0}', "", "", "rejected", "",
             "1700000000.000000", 3600, 3600, 100, 0, 0, 4242, "1699999999.000000"])
    finally:
        await broker.close()
    assert written == 1
    assert sync_redis.lrange(config.logs_channel, 0, -1) == [b'{"id":"old-1","msg_type":"done","seq":0}']
    state = sync_redis.hgetall(keys.task("old-1"))
    assert state[b"status"] == b"rejected" and state[b"pid"] == b"4242"
    assert sync_redis.ttl(keys.task("old-1")) > 0
