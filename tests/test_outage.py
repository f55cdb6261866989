"""Redis goes away and comes back: tasks keep running, records arrive in order and once, the
spool survives an executor restart, and nobody declares the others dead because of it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from task_job.broker import Broker, Keys
from task_job.client import AsyncClient
from task_job.config import Config
from task_job.embedded import RedisServer
from task_job.protocol import MsgType, Outcome, RecordHead, Status
from task_job.sinks import RedisSink

from .conftest import ExecutorProcess, done_of, records_of, wait_done, wait_until, write_config

TICKER = '#!/bin/sh\ni=1\nwhile [ $i -le "$1" ]; do echo "line $i"; i=$((i+1)); sleep 0.01; done\n' \
         'head -c 3000000 /dev/zero | tr "\\0" "y" | fold -w 199\necho end\n'


@pytest.fixture
def outage_config(own_redis: RedisServer, make_config: Callable[..., Config]) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        values: dict[str, Any] = {"redis_addr": own_redis.url, "heartbeat_interval": 0.2,
                                  "dead_after": 1.5, "buffer_bytes": 256 << 10}
        values.update(overrides)
        return make_config(**values)

    return make


def stdout_of(r: redis.Redis, config: Config, task_id: str) -> bytes:
    return b"".join(rec.payload for rec in records_of(r, config, task_id) if rec.msg_type == "stdout")


def expected_ticker(n: int) -> bytes:
    lines = "".join(f"line {i}\n" for i in range(1, n + 1)).encode()
    flood = 3_000_000
    return lines + (b"y" * 199 + b"\n") * (flood // 199) + b"y" * (flood % 199) + b"end\n"


async def test_records_written_during_an_outage_arrive_in_order_exactly_once(
        own_redis: RedisServer, outage_config: Callable[..., Config], start_executor: Any,
        cmd_dir: Path) -> None:
    (cmd_dir / "ticker.sh").write_text(TICKER)
    (cmd_dir / "ticker.sh").chmod(0o755)
    config = outage_config()
    handle = await start_executor(config)
    r = redis.Redis.from_url(own_redis.url)
    async with AsyncClient(config) as client:
        task_id = await client.submit("ticker.sh", ["150"])
        await wait_until(lambda: records_of(r, config, task_id), what="output flowing")
        r.close()
        own_redis.stop()  # SIGTERM: the append-only file is complete
        # The task keeps running and its output fills the buffer, then the spool.
        await wait_until(lambda: handle.executor.sink.spooling, 20, what="records spooled")
        own_redis.start()
    r = redis.Redis.from_url(own_redis.url)
    done = await wait_done(r, config, task_id, timeout=60)
    assert done.fields["status"] == "succeeded"
    recs = records_of(r, config, task_id)
    assert [rec.seq for rec in recs] == list(range(len(recs)))
    assert stdout_of(r, config, task_id) == expected_ticker(150)
    async with AsyncClient(config) as client:  # claiming resumed by itself
        after = await client.submit("install.sh", ["after the outage"])
        assert (await wait_done(r, config, after)).fields["status"] == "succeeded"
    await wait_until(lambda: not handle.executor.sink.spooling, what="spool emptied")
    assert not list((Path(config.state_dir) / "spool").glob("*.spool"))
    r.close()


async def test_spooled_records_are_delivered_by_the_next_start_after_a_restart(
        own_redis: RedisServer, outage_config: Callable[..., Config], start_executor: Any,
        spawn_executor: Callable[..., ExecutorProcess], cmd_dir: Path, tmp_path: Path) -> None:
    (cmd_dir / "ticker.sh").write_text(TICKER)
    (cmd_dir / "ticker.sh").chmod(0o755)
    config = outage_config()
    write_config(tmp_path / "a.json", config, buffer_bytes=256 << 10)
    proc = spawn_executor("run", "--config", str(tmp_path / "a.json"))
    r = redis.Redis.from_url(own_redis.url)
    keys = Keys.for_config(config)
    await wait_until(lambda: r.zscore(keys.executors, config.executor_id), 15, what="registered")
    async with AsyncClient(config) as client:
        task_id = await client.submit("ticker.sh", ["50"])
    await wait_until(lambda: records_of(r, config, task_id), what="output flowing")
    r.close()
    own_redis.stop()
    spool_dir = Path(config.state_dir) / "spool"
    # The task ends while Redis is away; its done record goes to disk with its output.
    await wait_until(lambda: any(p.stat().st_size > 3_000_000 for p in spool_dir.glob("*.spool")),
                     30, what="output spooled")
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    own_redis.start()
    r = redis.Redis.from_url(own_redis.url)
    assert not done_of(r, config, task_id)
    await start_executor(outage_config())  # another executor id, same state_dir
    done = await wait_done(r, config, task_id, timeout=30)
    assert done.fields["status"] == "succeeded"
    recs = records_of(r, config, task_id)
    assert [rec.seq for rec in recs] == list(range(len(recs)))
    assert stdout_of(r, config, task_id) == expected_ticker(50)
    assert not list(spool_dir.glob("*.spool"))
    r.close()


async def test_executors_cut_off_together_do_not_declare_each_other_dead(
        own_redis: RedisServer, outage_config: Callable[..., Config], start_executor: Any) -> None:
    configs = [outage_config(), outage_config()]
    handles = [await start_executor(c) for c in configs]
    r = redis.Redis.from_url(own_redis.url)
    async with AsyncClient(configs[0]) as client:
        ids = [await client.submit("sleep.sh", ["100"]) for _ in range(4)]
        await wait_until(lambda: all(records_of(r, configs[0], i) for i in ids), what="running")
        r.close()
        own_redis.stop()
        # Everyone's heartbeat goes stale while Redis is away, far past dead_after.
        await wait_until(lambda: all(h.executor.link.connected_for() == 0 for h in handles),
                         what="both executors see the outage")
        # The outage itself: its length (twice dead_after) is the fault being injected.
        await asyncio.sleep(configs[0].dead_after * 2)
        own_redis.start()
        r = redis.Redis.from_url(own_redis.url)
        # Long enough back for any reaper to run: connected for more than dead_after.
        await wait_until(lambda: all(h.executor.link.connected_for() > configs[0].dead_after + 1
                                     for h in handles), 20, what="both reconnected for a while")
        assert all(h.executor.fleet.takeovers == 0 for h in handles)
        assert not any(done_of(r, configs[0], i) for i in ids)
        for i in ids:
            await client.kill(i)
        for i in ids:
            assert (await wait_done(r, configs[0], i)).fields["status"] == "killed"
    r.close()


async def test_a_done_record_queued_while_the_closing_sink_retries_the_spool_is_not_lost(
        own_redis: RedisServer, outage_config: Callable[..., Config], tmp_path: Path) -> None:
    """Closing during an outage, the sink tries its spool once more; what is queued during that
    attempt (here a done record) must reach the spool too. It used to be dropped."""
    config = outage_config(buffer_bytes=4096)
    broker = Broker(config)
    await broker.start()
    spool_dir = tmp_path / "spool"
    sink = RedisSink(broker, "e1", config.buffer_bytes, _spool_dir=spool_dir)
    running = asyncio.ensure_future(sink.run())
    stream = sink.open_stream(RecordHead("t1", None, None, "e1"))
    own_redis.stop()
    for _ in range(20):
        await sink.put_output(stream, MsgType.STDOUT, b"x" * 1000 + b"\n")
    await wait_until(lambda: sink.spooling, 10, what="records spooled")

    send = broker.sink_lane.execute

    async def finish_during_the_attempt(commands: Any) -> Any:
        if not sink._closing:  # the done record arrives while the attempt is under way
            # mode "own": a task with output (a rejected message, mode "new", has none)
            sink.finish(stream, Outcome(Status.FAILED, "exit status 1"), raw=b"{}", mode="own")
            sink.close()
        return await send(commands)

    broker.sink_lane.execute = finish_during_the_attempt  # type: ignore[method-assign]
    await asyncio.wait_for(running, 10)
    await broker.close()

    own_redis.start()
    replayer = Broker(config)
    await replayer.start()
    await RedisSink(replayer, "e2", config.buffer_bytes, _spool_dir=spool_dir).replay_spools()
    await replayer.close()
    r = redis.Redis.from_url(own_redis.url)
    assert [rec.fields["status"] for rec in done_of(r, config, "t1")] == ["failed"]
    r.close()
