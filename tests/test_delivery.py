"""Output delivery: the HTTP sink against a real aiohttp receiver, `logs -f`, log files."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiohttp import web

from task_job.client import AsyncClient
from task_job.config import Config
from task_job.embedded import free_port
from task_job.files import prune
from task_job.http_sink import HttpSink

from .conftest import ExecutorProcess, records_of, wait_done, wait_until, write_config

TICKER = '#!/bin/sh\ni=1\nwhile [ $i -le "$1" ]; do echo "line $i"; i=$((i+1)); sleep 0.01; done\n' \
         'head -c 1000000 /dev/zero | tr "\\0" "z" | fold -w 99\necho end\n'


class Receiver:
    """A real HTTP receiver of record batches on loopback; it can answer scripted statuses,
    and go down and come back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/records"
        self.batches: list[list[dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.script: list[int] = []  # statuses to answer first, then 200
        self.answers: list[int] = []
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        status = self.script.pop(0) if self.script else 200
        self.answers.append(status)
        if status == 200:
            self.batches.append(orjson.loads(await request.read()))
            self.headers.append(dict(request.headers))
        return web.Response(status=status, text="ok" if status == 200 else "no")

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/records", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def records(self, task_id: str | None = None) -> list[dict[str, Any]]:
        return [r for batch in self.batches for r in batch if task_id is None or r["id"] == task_id]

    def done(self, task_id: str) -> bool:
        return any(r["msg_type"] == "done" for r in self.records(task_id))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    yield rec
    await rec.stop()


def output(records: list[dict[str, Any]]) -> bytes:
    return b"".join(r["data"].encode() for r in records if r["msg_type"] == "stdout")


def expected_ticker(n: int) -> bytes:
    flood = 1_000_000
    return ("".join(f"line {i}\n" for i in range(1, n + 1)).encode()
            + (b"z" * 99 + b"\n") * (flood // 99) + b"z" * (flood % 99) + b"end\n")


def assert_complete(records: list[dict[str, Any]]) -> None:
    """Complete and in order once deduplicated by (id, seq), as a receiver would."""
    seen: dict[int, dict[str, Any]] = {}
    for rec in records:
        seen.setdefault(rec["seq"], rec)
    assert sorted(seen) == list(range(len(seen)))
    assert seen[len(seen) - 1]["msg_type"] == "done"


async def test_http_batches_arrive_complete_and_in_order_with_configured_headers(
        receiver: Receiver, make_config: Callable[..., Config], start_executor: Any,
        sync_redis: redis.Redis) -> None:
    await receiver.start()
    config = make_config(logs_http=receiver.url, logs_http_headers={"Authorization": "Bearer t0k"})
    await start_executor(config)
    async with AsyncClient(config) as client:
        ids = [await client.submit("install.sh", [f"n{i}"]) for i in range(5)]
        for task_id in ids:
            await wait_done(sync_redis, config, task_id)
    await wait_until(lambda: all(receiver.done(i) for i in ids), what="every done record posted")
    for task_id in ids:
        got = receiver.records(task_id)
        assert [r["seq"] for r in got] == list(range(len(got)))  # in order, no duplicates
        assert got == [r.fields for r in records_of(sync_redis, config, task_id)]  # both sinks
    assert all(h["Authorization"] == "Bearer t0k" for h in receiver.headers)
    assert all(h["Content-Type"] == "application/json" for h in receiver.headers)


async def test_receiver_down_for_a_while_loses_nothing(
        receiver: Receiver, make_config: Callable[..., Config], start_executor: Any,
        sync_redis: redis.Redis, cmd_dir: Path) -> None:
    (cmd_dir / "ticker.sh").write_text(TICKER)
    (cmd_dir / "ticker.sh").chmod(0o755)
    config = make_config(logs_http=receiver.url, buffer_bytes=256 << 10)
    handle = await start_executor(config)
    async with AsyncClient(config) as client:
        task_id = await client.submit("ticker.sh", ["100"])
        await wait_done(sync_redis, config, task_id, timeout=30)  # Redis got everything meanwhile
    assert handle.executor.http.spooling
    await receiver.start()
    await wait_until(lambda: receiver.done(task_id), 30, what="records posted after the outage")
    assert_complete(receiver.records(task_id))
    dedup = {r["seq"]: r for r in receiver.records(task_id)}
    assert output(sorted(dedup.values(), key=lambda r: r["seq"])) == expected_ticker(100)


async def test_receiver_answering_500_then_200_gets_the_batch(
        receiver: Receiver, make_config: Callable[..., Config], start_executor: Any,
        sync_redis: redis.Redis) -> None:
    receiver.script = [500, 503, 429]
    await receiver.start()
    config = make_config(logs_http=receiver.url)
    await start_executor(config)
    async with AsyncClient(config) as client:
        task_id = await client.submit("install.sh", ["retried"])
    await wait_until(lambda: receiver.done(task_id), 30, what="records posted after retries")
    assert receiver.answers[:4] == [500, 503, 429, 200]
    assert_complete(receiver.records(task_id))


async def test_receiver_answering_400_dead_letters_the_batch_and_the_executor_goes_on(
        receiver: Receiver, make_config: Callable[..., Config], start_executor: Any,
        sync_redis: redis.Redis) -> None:
    receiver.script = [400]
    await receiver.start()
    config = make_config(logs_http=receiver.url)
    handle = await start_executor(config)
    async with AsyncClient(config) as client:
        first = await client.submit("install.sh", ["refused"])
        await wait_until(lambda: handle.executor.http.dead_batches == 1, what="batch dead-lettered")
        second = await client.submit("install.sh", ["accepted"])
    await wait_until(lambda: receiver.done(second), what="later records posted")
    dead = list((Path(config.state_dir) / "http-dead").glob("*.json"))
    assert len(dead) == 1
    kept = orjson.loads(dead[0].read_bytes())
    assert kept["reason"].startswith("HTTP 400")
    assert any(r["id"] == first for r in kept["records"])
    assert receiver.answers.count(400) == 1  # never retried


async def test_http_spool_is_delivered_after_an_executor_restart(
        receiver: Receiver, make_config: Callable[..., Config], start_executor: Any,
        spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path, cmd_dir: Path) -> None:
    (cmd_dir / "ticker.sh").write_text(TICKER)
    (cmd_dir / "ticker.sh").chmod(0o755)
    config = make_config(logs_http=receiver.url)
    write_config(tmp_path / "c.json", config, logs_http=receiver.url, buffer_bytes=256 << 10)
    proc = spawn_executor("run", "--config", str(tmp_path / "c.json"))
    from task_job.broker import Keys

    await wait_until(lambda: sync_redis.zscore(Keys.for_config(config).executors,
                                               config.executor_id), 15, what="registered")
    async with AsyncClient(config) as client:
        task_id = await client.submit("ticker.sh", ["30"])
    await wait_done(sync_redis, config, task_id, timeout=30)
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert list((Path(config.state_dir) / "spool").glob("*.httpspool"))
    await receiver.start()
    await start_executor(make_config(logs_http=receiver.url))  # same state_dir, new id
    await wait_until(lambda: receiver.done(task_id), 30, what="spooled records posted")
    assert_complete(receiver.records(task_id))


def test_logs_follow_prints_every_line_in_order_and_passes_the_exit_code(
        config: Config, spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path, cmd_dir: Path) -> None:
    (cmd_dir / "slow.sh").write_text(
        '#!/bin/sh\nfor i in $(seq 1 40); do echo "out $i"; echo "err $i" >&2; sleep 0.05; done\nexit 3\n')
    (cmd_dir / "slow.sh").chmod(0o755)
    path = write_config(tmp_path / "c.json", config)
    spawn_executor("run", "--config", str(path))
    cli = [sys.executable, "-m", "task_job.cli"]
    subprocess.run([*cli, "submit", "--config", str(path), "--id", "slow1", "--", "slow.sh"],
                   check=True, capture_output=True, timeout=30)
    follow = subprocess.run([*cli, "logs", "-f", "--config", str(path), "slow1"],
                            capture_output=True, text=True, timeout=60)
    assert follow.returncode == 3
    assert follow.stdout == "".join(f"out {i}\n" for i in range(1, 41))
    assert "".join(f"err {i}\n" for i in range(1, 41)) in follow.stderr
    as_json = subprocess.run([*cli, "logs", "--json", "--config", str(path), "slow1"],
                             capture_output=True, text=True, timeout=30)
    seqs = [orjson.loads(line)["seq"] for line in as_json.stdout.splitlines()]
    assert seqs == list(range(len(seqs)))


async def test_task_output_and_done_record_are_written_to_log_files(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    config = make_config(log_dir=str(log_dir))
    await start_executor(config)
    async with AsyncClient(config) as client:
        task_id = await client.submit("install.sh", ["to a file"])
        done = await wait_done(sync_redis, config, task_id)
    day = dt.datetime.fromtimestamp(done.fields["started_at"]).strftime("%Y-%m-%d")
    log_file = log_dir / day / f"{task_id}.log"
    await wait_until(lambda: (log_dir / day / f"{task_id}.json").exists(), what="done file")
    assert log_file.read_bytes() in (b"installing to a file\ndone installing\n",
                                     b"done installing\ninstalling to a file\n")
    assert orjson.loads((log_dir / day / f"{task_id}.json").read_bytes())["status"] == "succeeded"


def test_log_folders_older_than_the_retention_are_removed(tmp_path: Path) -> None:
    for name in ("2026-11-01", "2026-11-16", "2026-11-17", "2026-11-24", "not-a-date"):
        (tmp_path / name).mkdir()
    assert prune(str(tmp_path), 7, today=dt.date(2026, 11, 24)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2026-11-17", "2026-11-24", "not-a-date"]


async def test_max_output_action_kill_stops_a_task_that_prints_too_much(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(max_output=10_000, max_output_action="kill")
    await start_executor(config)
    async with AsyncClient(config) as client:
        task_id = await client.submit("flood.sh", ["100000000"])
        done = await wait_done(sync_redis, config, task_id)
    assert done.fields["status"] == "killed" and "max_output of 10000 bytes exceeded" in done.data
    kept = b"".join(r.payload for r in records_of(sync_redis, config, task_id) if r.msg_type == "stdout")
    assert len(kept) == 10_000


async def test_a_record_added_while_the_closing_http_sink_retries_its_spool_is_not_lost(
        receiver: Receiver, tmp_path: Path) -> None:
    """Closing while the receiver is down, the sink tries its spool once more; a record added
    during that attempt (here a done record) must reach the spool too, and the next start's
    replay must deliver it. It used to be dropped."""
    def make() -> HttpSink:
        return HttpSink(receiver.url, executor="e1", buffer_bytes=2048, batch_bytes=1024,
                        linger=0, timeout=2, headers={}, state_dir=tmp_path)

    def record(seq: int, msg_type: str = "stdout") -> bytes:
        return orjson.dumps({"id": "t1", "msg_type": msg_type, "seq": seq, "data": "x" * 200})

    sink = make()  # the receiver is not started: every POST fails
    running = asyncio.ensure_future(sink.run())
    for seq in range(20):  # as the Redis sink feeds it: waiting for room when it has none
        while not sink.has_room(len(record(seq))):
            await asyncio.wait_for(sink.wait_room(), 10)
        sink.add(record(seq))
    await wait_until(lambda: sink.spooling, 10, what="records spooled")

    post = sink._post

    async def done_during_the_attempt(batch: list[bytes]) -> None:
        if not sink._closing:
            sink.add(record(20, "done"))
            sink.close()
        await post(batch)

    sink._post = done_during_the_attempt  # type: ignore[method-assign]
    await asyncio.wait_for(running, 10)

    await receiver.start()
    replayer = make()
    replaying = asyncio.ensure_future(replayer.run())
    await wait_until(lambda: receiver.done("t1"), 10, what="the done record replayed")
    replayer.close()
    await asyncio.wait_for(replaying, 10)
    assert_complete(receiver.records("t1"))


async def test_a_torn_http_spool_replays_what_is_whole_without_empty_posts(
        receiver: Receiver, tmp_path: Path) -> None:
    """A spool cut mid-frame (a crash mid-write) used to make the next start spin for ever,
    POSTing empty arrays. Now what is whole is delivered and the torn rest is set aside."""
    from task_job.spool import SpoolFile, encode

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    path = spool_dir / "e1.httpspool"
    calls = [("http", "", [], [orjson.dumps({"id": "t1", "msg_type": "stdout", "seq": i,
                                             "data": "y" * 50})]) for i in range(10)]
    spool = SpoolFile(path)
    spool.append(calls)  # type: ignore[arg-type]
    spool.close()
    whole = 6
    cut = sum(len(encode(c)) for c in calls[:whole]) + 7  # inside the 7th frame
    with open(path, "r+b") as f:
        f.truncate(cut)
    await receiver.start()
    sink = HttpSink(receiver.url, executor="e2", buffer_bytes=1 << 20, batch_bytes=1 << 20,
                    linger=0, timeout=2, headers={}, state_dir=tmp_path)
    running = asyncio.ensure_future(sink.run())
    await wait_until(lambda: len(receiver.records("t1")) == whole, 10, what="whole frames")
    sink.close()
    await asyncio.wait_for(running, 10)
    assert [r["seq"] for r in receiver.records("t1")] == list(range(whole))
    assert all(batch for batch in receiver.batches)  # no empty POST
    assert not path.exists() and any(p.name.startswith("e1.httpspool.torn-") for p in spool_dir.iterdir())
