"""Inputs and faults that must not stop an executor: full and read-only disks, torn spools,
long ids, a Redis that never answers or loses its data or its memory, oversize messages,
growing lists, two embedded servers. In each, every id ends with exactly one done record."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from task_job.broker import Broker, Keys
from task_job.client import AsyncClient
from task_job.config import Config
from task_job.embedded import RedisServer
from task_job.errors import ProtocolError
from task_job.files import STEM_MAX, file_stem
from task_job.sinks import RedisSink
from task_job.spool import SpoolFile, encode

from .conftest import dead_letters, done_of, records_of, wait_done, wait_until


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """Mount small tmpfs file systems where the test can (root); unmount them after."""
    mounted: list[Path] = []

    def mount(name: str, size_kb: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def push(r: redis.Redis, config: Config, cmdline: str, *args: str, task_id: str | None = None,
         **extra: Any) -> str:
    task_id = task_id or uuid.uuid4().hex
    r.rpush(config.queue_name, orjson.dumps(
        {"id": task_id, "type": "start", "task": {"cmdline": cmdline, "cmd_args": list(args), **extra}}))
    return task_id


# -- disks ---------------------------------------------------------------------------------

async def test_a_full_log_dir_neither_stops_the_executor_nor_changes_a_status(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        tiny_tmpfs: Callable[[str, int], Path]) -> None:
    log_dir = tiny_tmpfs("logs", 64)
    config = make_config(log_dir=str(log_dir))
    handle = await start_executor(config)
    flood = push(sync_redis, config, "flood.sh", "400000")  # 400 KB into a 64 KB file system
    done = await wait_done(sync_redis, config, flood, timeout=30)
    assert done.fields["status"] == "succeeded", done.fields
    out = b"".join(r.payload for r in records_of(sync_redis, config, flood) if not r.is_done)
    assert len(out) >= 400000  # Redis got all of it; the file only what fitted
    # The disk is full now: later tasks still start, run and report.
    ids = [push(sync_redis, config, "install.sh", str(i)) for i in range(5)]
    for task_id in ids:
        done = await wait_done(sync_redis, config, task_id)
        assert done.fields["status"] == "succeeded", (done.fields, done.data)
    assert not handle.task.done()
    for task_id in [flood, *ids]:
        assert len(done_of(sync_redis, config, task_id)) == 1


async def test_a_full_state_dir_during_an_outage_keeps_records_in_memory_until_redis_returns(
        own_redis: RedisServer, make_config: Callable[..., Config], start_executor: Any,
        tiny_tmpfs: Callable[[str, int], Path], cmd_dir: Path) -> None:
    state = tiny_tmpfs("state", 64)
    (cmd_dir / "fill.sh").write_text(f'#!/bin/sh\nhead -c 1000000 /dev/zero > "{state}/filler" 2>/dev/null\n'
                                     'i=0; while [ $i -lt 200 ]; do echo "line $i"; i=$((i+1)); sleep 0.01; done\n')
    (cmd_dir / "fill.sh").chmod(0o755)
    config = make_config(redis_addr=own_redis.url, state_dir=str(state), buffer_bytes=8 << 10,
                         record_max_bytes=1024, heartbeat_interval=0.2, dead_after=1.5)
    r = redis.Redis.from_url(own_redis.url)
    handle = await start_executor(config)
    task_id = push(r, config, "fill.sh")
    await wait_until(lambda: r.hget(Keys.for_config(config).task(task_id), "status") == b"running")
    own_redis.stop()
    await asyncio.sleep(1.5)  # the task writes into a full disk's spool: refused, kept in memory
    assert not handle.task.done()
    own_redis.start()
    done = await wait_done(r, config, task_id, timeout=30)
    assert done.fields["status"] == "succeeded"
    lines = b"".join(rec.payload for rec in records_of(r, config, task_id) if not rec.is_done)
    assert lines == "".join(f"line {i}\n" for i in range(200)).encode()
    assert len(done_of(r, config, task_id)) == 1
    r.close()


async def test_a_read_only_state_dir_does_not_stop_the_executor(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        tiny_tmpfs: Callable[[str, int], Path]) -> None:
    state = tiny_tmpfs("ro-state", 64)
    (state / "spool").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
    config = make_config(state_dir=str(state), log_dir=str(state / "logs"))
    handle = await start_executor(config)
    ids = [push(sync_redis, config, "install.sh", str(i)) for i in range(3)]
    for task_id in ids:
        done = await wait_done(sync_redis, config, task_id)
        assert done.fields["status"] == "succeeded", done.fields  # not "cannot start"
    await handle.stop()


# -- spools --------------------------------------------------------------------------------

def _spool_of(path: Path, n: int) -> list[int]:
    spool = SpoolFile(path)
    calls = [("cmd", "", [], ["RPUSH", "spooled", f"v{i}".encode() * (i % 7 + 1)]) for i in range(n)]
    spool.append(calls)  # type: ignore[arg-type]
    spool.close()
    ends, at = [], 0
    for call in calls:
        at += len(encode(call))  # type: ignore[arg-type]
        ends.append(at)
    return ends


async def test_spools_cut_at_any_byte_replay_what_is_whole_and_start(
        config: Config, sync_redis: redis.Redis, tmp_path: Path) -> None:
    rng = random.Random(7)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    broker = Broker(config)
    await broker.start()
    try:
        for round_ in range(12):
            path = spool_dir / f"exec-{round_}.spool"
            ends = _spool_of(path, 20)
            cut = rng.randrange(0, ends[-1] + 1) if round_ else ends[-1] - 1
            with open(path, "r+b") as f:
                f.truncate(cut)
            if round_ % 3 == 1:  # damage inside the last whole frame too
                with open(path, "r+b") as f:
                    f.seek(max(0, cut - 3))
                    f.write(b"\xff\xff")
            sync_redis.delete("spooled")
            sink = RedisSink(broker, f"exec-{round_}", 1 << 20, _spool_dir=spool_dir)
            async with asyncio.timeout(10):  # used to spin forever on a torn frame
                await sink.replay_spools()
            whole = sum(1 for e in ends if e <= cut)
            got = sync_redis.lrange("spooled", 0, -1)
            assert whole - 1 <= len(got) <= whole  # the damaged frame may go too
            assert got == [f"v{i}".encode() * (i % 7 + 1) for i in range(len(got))]
            assert not path.exists()
        assert any(p.name.count(".torn-") for p in spool_dir.iterdir())
    finally:
        await broker.close()


def test_a_spool_append_that_fails_leaves_no_torn_frame(tiny_tmpfs: Callable[[str, int], Path]) -> None:
    disk = tiny_tmpfs("spooldisk", 16)
    spool = SpoolFile(disk / "x.spool")
    spool.append([("cmd", "", [], ["RPUSH", "k", b"a"])])
    size = spool.size
    with pytest.raises(OSError):
        spool.append([("cmd", "", [], ["RPUSH", "k", b"x" * 40000])])
    assert spool.size == size
    calls, _ = spool.read(1 << 20)
    assert calls == [("cmd", "", [], ["RPUSH", "k", b"a"])]
    spool.close()


# -- ids and file names --------------------------------------------------------------------

def test_file_stems_are_injective_and_fit_name_max() -> None:
    ids = ["a/b", "a_b", "a%2Fb", "a b", "a\tb", ".hidden", "%2Ehidden", "x" * 256, "x" * 255 + "y",
           "é" * 200, "é" * 199 + "e", "~", "%7E", "..", "."]
    stems = [file_stem(i) for i in ids]
    assert len(set(stems)) == len(ids)
    assert all(len(s.encode()) <= STEM_MAX + 41 and len(s) + 5 <= 255 for s in stems)
    assert all("/" not in s and not s.startswith(".") for s in stems)


async def test_long_ids_with_log_dir_each_end_with_one_done_record(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    config = make_config(log_dir=str(tmp_path / "logs"))
    handle = await start_executor(config)
    ids = ["i" * 251, "j" * 255, "k" * 256, "k" * 255 + "/", "k" * 255 + "_"]
    for task_id in ids:
        push(sync_redis, config, "install.sh", task_id=task_id)
    too_long = "l" * 257
    push(sync_redis, config, "install.sh", task_id=too_long)
    for task_id in ids:
        done = await wait_done(sync_redis, config, task_id)
        assert done.fields["status"] == "succeeded", done.fields
    await wait_until(lambda: dead_letters(sync_redis, config), what="the 257-character id dead-lettered")
    assert not handle.task.done()
    logs = sorted(p.name for p in (tmp_path / "logs").rglob("*.json"))
    assert len(logs) == len(ids)  # ids differing only in '/' and '_' have files of their own


# -- redis that never answers, or answers something else -----------------------------------

class SilentListener:
    """A TCP listener that accepts connections and never answers (or answers `reply`)."""

    def __init__(self, reply: bytes = b"") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply:
                try:
                    conn.recv(1024)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "task_job.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_client_commands_fail_with_one_clear_line_against_a_silent_or_foreign_server() -> None:
    silent = SilentListener()
    foreign = SilentListener(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    try:
        env = {"TASK_JOB_REDIS_TIMEOUT": "1"}
        started = time.monotonic()
        result = run_cli("logs", "--redis", f"127.0.0.1:{silent.port}", "x", env=env)
        assert result.returncode == 1 and time.monotonic() - started < 15
        assert result.stderr.strip().splitlines() == [
            f"task-job: redis at 127.0.0.1:{silent.port}: connected, but no reply within 1s "
            "(a stalled server, or not Redis)"], result.stderr
        result = run_cli("logs", "--redis", f"127.0.0.1:{foreign.port}", "x", env=env)
        assert result.returncode == 1
        assert "does not speak the Redis protocol" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        silent.close()
        foreign.close()


def test_run_against_a_silent_server_retries_and_stops_promptly_on_sigterm(
        tmp_path: Path, cmd_dir: Path) -> None:
    silent = SilentListener()
    log = tmp_path / "run.log"
    out = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "task_job.cli", "run", "--redis", f"127.0.0.1:{silent.port}",
         "--cmd-dir", str(cmd_dir), "--state-dir", str(tmp_path / "s")],
        stdout=out, stderr=out, env={**os.environ, "TASK_JOB_REDIS_TIMEOUT": "1",
                                     "TASK_JOB_DRAIN_TIMEOUT": "2", "TASK_JOB_KILL_GRACE": "1"})
    try:
        deadline = time.monotonic() + 20
        while b"cannot reach redis" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert b"no reply within 1s" in log.read_bytes()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(2 + 1 + 5) == 0
        assert time.monotonic() - started < 8
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        silent.close()


async def test_redis_going_silent_mid_run_then_sigterm_ends_within_drain_and_grace(
        volatile_redis: RedisServer, make_config: Callable[..., Config], tmp_path: Path,
        spawn_executor: Any) -> None:
    """SIGSTOP the Redis server: connections stay open, nothing answers."""
    config = make_config(redis_addr=volatile_redis.url)
    r = redis.Redis.from_url(volatile_redis.url)
    proc = spawn_executor("run", "--redis", volatile_redis.url, "--cmd-dir", config.cmd_dir,
                          "--state-dir", str(tmp_path / "st"), "--executor-id", "silent-1",
                          env={"TASK_JOB_REDIS_TIMEOUT": "1", "TASK_JOB_DRAIN_TIMEOUT": "2",
                               "TASK_JOB_KILL_GRACE": "1", "TASK_JOB_HEARTBEAT_INTERVAL": "0.5",
                               "TASK_JOB_DEAD_AFTER": "3"})
    task_id = push(r, config, "sleep.sh", "30")
    await wait_until(lambda: r.hget(Keys.for_config(config).task(task_id), "status") == b"running",
                     timeout=15)
    assert volatile_redis.proc is not None
    volatile_redis.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(2.5)  # every lane batch times out meanwhile
        assert proc.proc.poll() is None
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
        assert code == 0, proc.output()
        assert time.monotonic() - started < 2 + 1 + 5, proc.output()
    finally:
        volatile_redis.proc.send_signal(signal.SIGCONT)
    # The task's done record waited in the spool; the next start delivers it.
    again = spawn_executor("run", "--redis", volatile_redis.url, "--cmd-dir", config.cmd_dir,
                           "--state-dir", str(tmp_path / "st"), "--executor-id", "silent-1")
    done = await wait_done(r, config, task_id, timeout=20)
    assert done.fields["status"] == "killed" and len(done_of(r, config, task_id)) == 1
    again.stop()
    r.close()


# -- redis that loses its data or its memory -----------------------------------------------

async def test_flushall_mid_run_keeps_running_tasks_and_their_one_done_record(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(heartbeat_interval=0.2, dead_after=1.5)
    handle = await start_executor(config)
    keys = Keys.for_config(config)
    ids = [push(sync_redis, config, "sleep.sh", "1.5") for _ in range(3)]
    await wait_until(lambda: all(sync_redis.hget(keys.task(i), "pid") for i in ids))
    sync_redis.flushall()
    # Re-registered without killing anything, the running tasks adopted again.
    await wait_until(lambda: sync_redis.zscore(keys.executors, config.executor_id) is not None)
    await wait_until(lambda: len(sync_redis.lrange(keys.processing(config.executor_id), 0, -1)) == 3)
    for task_id in ids:
        done = await wait_done(sync_redis, config, task_id)
        assert done.fields["status"] == "succeeded", done.fields
        assert len(done_of(sync_redis, config, task_id)) == 1
    after = push(sync_redis, config, "install.sh", "after")
    assert (await wait_done(sync_redis, config, after)).fields["status"] == "succeeded"
    assert not handle.task.done()


async def test_a_redis_restart_without_persistence_mid_run_loses_no_done_record(
        volatile_redis: RedisServer, make_config: Callable[..., Config], start_executor: Any) -> None:
    config = make_config(redis_addr=volatile_redis.url, heartbeat_interval=0.2, dead_after=1.5)
    r = redis.Redis.from_url(volatile_redis.url)
    handle = await start_executor(config)
    keys = Keys.for_config(config)
    ids = [push(r, config, "sleep.sh", "2") for _ in range(2)]
    await wait_until(lambda: all(r.hget(keys.task(i), "status") == b"running" for i in ids))
    volatile_redis.stop()
    volatile_redis.start()  # empty: no AOF, no RDB
    for task_id in ids:
        done = await wait_done(r, config, task_id, timeout=20)
        assert done.fields["status"] == "succeeded", done.fields
        assert len(done_of(r, config, task_id)) == 1
    after = push(r, config, "install.sh")
    assert (await wait_done(r, config, after, timeout=20)).fields["status"] == "succeeded"
    assert not handle.task.done()
    r.close()


async def test_redis_out_of_memory_delays_records_but_applies_each_batch_whole(
        volatile_redis: RedisServer, make_config: Callable[..., Config], start_executor: Any,
        cmd_dir: Path) -> None:
    (cmd_dir / "lines.sh").write_text('#!/bin/sh\ni=0; while [ $i -lt 300 ]; do echo "line $i"; '
                                      'i=$((i+1)); sleep 0.005; done\n')
    (cmd_dir / "lines.sh").chmod(0o755)
    config = make_config(redis_addr=volatile_redis.url)
    r = redis.Redis.from_url(volatile_redis.url)
    handle = await start_executor(config)
    keys = Keys.for_config(config)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "noeviction")
    task_id = push(r, config, "lines.sh")
    await wait_until(lambda: r.hget(keys.task(task_id), "status") == b"running")
    r.config_set("maxmemory", str(used))  # below what is in use: every write is refused
    await asyncio.sleep(1.0)
    r.config_set("maxmemory", "0")
    done = await wait_done(r, config, task_id, timeout=20)
    assert done.fields["status"] == "succeeded"
    listed = [rec.data for rec in records_of(r, config, task_id) if not rec.is_done]
    streamed = [orjson.loads(f[b"r"])["data"] for _, f in r.xrange(keys.log(task_id))][:-1]
    assert "".join(listed) == "".join(f"line {i}\n" for i in range(300))
    assert listed == streamed  # the shared list and the per-task stream agree
    assert not handle.task.done()
    r.close()


# -- what producers send -------------------------------------------------------------------

async def test_a_huge_label_is_rejected_and_does_not_multiply_into_records(
        config: Config, executor: Any, sync_redis: redis.Redis) -> None:
    task_id = push(sync_redis, config, "install.sh")
    big = uuid.uuid4().hex
    sync_redis.rpush(config.queue_name, orjson.dumps(
        {"id": big, "type": "start", "tube": "t" * 900_000, "task": {"cmdline": "install.sh"}}))
    done = await wait_done(sync_redis, config, big)
    assert done.fields["status"] == "rejected" and "label_max_bytes" in done.data
    assert "tube" not in done.fields or len(done.fields.get("tube") or "") < 2000
    assert (await wait_done(sync_redis, config, task_id)).fields["status"] == "succeeded"


async def test_an_oversize_message_is_dead_lettered_as_a_bounded_prefix(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(max_message_bytes=64 << 10)
    await start_executor(config)
    raw = orjson.dumps({"id": "huge", "task": {"cmdline": "install.sh", "stdin": "x" * (4 << 20)}})
    sync_redis.rpush(config.queue_name, raw)
    await wait_until(lambda: dead_letters(sync_redis, config), what="dead letter")
    (entry,) = dead_letters(sync_redis, config)
    assert entry["size"] == len(raw) and entry["truncated"] is True
    assert len(entry["raw"]) <= 64 << 10 and "exceeds the limit" in entry["reason"]
    keys = Keys.for_config(config)
    assert sync_redis.llen(keys.processing(config.executor_id)) == 0  # settled by its digest
    assert sync_redis.llen(keys.dead) == 1


async def test_malformed_control_messages_are_dead_lettered_and_cancel_marks_expire(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(cancel_ttl=60)
    await start_executor(config)
    for bad in (b"not json", b'{"id":"1","type":"explode"}', b'{"type":"kill"}', b"[1,2]"):
        sync_redis.rpush(config.queue_control_name, bad)
    await wait_until(lambda: len(dead_letters(sync_redis, config)) == 4, what="4 dead letters")
    assert all(d["reason"].startswith("control: ") for d in dead_letters(sync_redis, config))
    sync_redis.rpush(config.queue_control_name, orjson.dumps({"id": "never-seen", "type": "kill"}))
    key = Keys.for_config(config).task("never-seen")
    await wait_until(lambda: sync_redis.ttl(key) > 0, what="a cancel mark")
    assert 0 < sync_redis.ttl(key) <= 60


async def test_dead_letter_and_records_lists_are_capped_oldest_out(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(dead_max_len=5, logs_max_len=20)
    await start_executor(config)
    for i in range(12):
        sync_redis.rpush(config.queue_name, f"garbage {i}")
    await wait_until(lambda: dead_letters(sync_redis, config)
                     and dead_letters(sync_redis, config)[-1]["raw"] == "garbage 11")
    assert [d["raw"] for d in dead_letters(sync_redis, config)] == [f"garbage {i}" for i in range(7, 12)]
    ids = [push(sync_redis, config, "args.sh", *[str(n) for n in range(10)]) for _ in range(6)]
    for task_id in ids:
        await wait_until(lambda t=task_id: sync_redis.hget(Keys.for_config(config).task(t), "status") == b"succeeded")
    assert sync_redis.llen(config.logs_channel) <= 20
    assert orjson.loads(sync_redis.lrange(config.logs_channel, -1, -1)[0])["msg_type"] == "done"


# -- the client side -----------------------------------------------------------------------

async def test_submit_validates_before_pushing_and_refuses_a_known_id(
        config: Config, executor: Any, sync_redis: redis.Redis) -> None:
    async with AsyncClient(config) as client:
        for bad_id in ("x" * 257, "tab\there"):
            with pytest.raises(ProtocolError):
                await client.submit("install.sh", task_id=bad_id)
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            await client.submit("install.sh", stdin="x" * (config.max_message_bytes + 1))
        assert sync_redis.llen(config.queue_name) == 0
        first = await client.submit("install.sh", task_id="once")
        await wait_done(sync_redis, config, first)
        with pytest.raises(ProtocolError, match="already known"):
            await client.submit("install.sh", task_id="once")


def test_cli_says_plainly_when_an_id_is_unknown_or_finished(
        config: Config, sync_redis: redis.Redis) -> None:
    base = ["--redis", config.redis_addr, "--queue", config.queue_name]
    result = run_cli("logs", *base, "nobody")
    assert result.returncode == 1 and "unknown task nobody" in result.stderr
    sync_redis.hset(Keys.for_config(config).task("over"), mapping={"status": "succeeded"})
    result = run_cli("kill", *base, "over")
    assert result.returncode == 1 and "already finished (succeeded)" in result.stderr
    result = run_cli("submit", *base, "--id", "over", "--", "install.sh")
    assert result.returncode == 2 and "already known" in result.stderr
    result = run_cli("submit", *base, "--wait", "--wait-timeout", "0.5", "--", "install.sh")
    assert result.returncode == 124 and "gave up waiting" in result.stderr


def test_check_config_hides_secrets(tmp_path: Path, cmd_dir: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(orjson.dumps({
        "redis_addr": "redis://u:hunter2@127.0.0.1:1/0", "cmd_dir": str(cmd_dir),
        "logs_http": "https://user:hunter3@example.test/in",
        "logs_http_headers": {"Authorization": "Bearer hunter4"}}).decode())
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    for secret in ("hunter2", "hunter3", "hunter4"):
        assert secret not in result.stdout
    assert "Authorization" in result.stdout


def test_a_second_embedded_server_on_one_state_dir_refuses_to_start(
        tmp_path: Path, spawn_executor: Any, cmd_dir: Path) -> None:
    state = tmp_path / "state"
    first = spawn_executor("run", "--embedded", "--state-dir", str(state), "--cmd-dir", str(cmd_dir))
    sock = state / "redis" / "redis.sock"
    deadline = time.monotonic() + 20
    while not (sock.exists() and b"executor started" in Path(first.log_path or "").read_bytes()):
        assert first.proc.poll() is None and time.monotonic() < deadline, first.output()
        time.sleep(0.05)
    result = run_cli("run", "--embedded", "--state-dir", str(state), "--cmd-dir", str(cmd_dir))
    assert result.returncode != 0
    assert "already runs an embedded redis" in result.stderr.strip().splitlines()[-1]
    assert sock.exists() and first.proc.poll() is None
    with redis.Redis(unix_socket_path=str(sock)) as r:
        assert r.ping()
    first.signal(signal.SIGTERM)  # stops its embedded redis-server too (SIGKILL would orphan it)
    assert first.wait(30) == 0
    assert not sock.exists()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_an_oversize_message_is_streamed_past_not_held_in_memory(
        config: Config, sync_redis: redis.Redis, spawn_executor: Any, tmp_path: Path) -> None:
    proc = spawn_executor("run", "--redis", config.redis_addr, "--cmd-dir", config.cmd_dir,
                          "--state-dir", str(tmp_path / "st"), "--executor-id", "big-1")
    keys = Keys.for_config(config)
    await wait_until(lambda: sync_redis.zscore(keys.executors, "big-1") is not None, 15)
    before = _peak_rss_mb(proc.pid)
    size = 48 << 20
    sync_redis.rpush(config.queue_name, b'{"id":"big","tube":"' + b"t" * size + b'"}')
    await wait_until(lambda: sync_redis.llen(keys.dead), 30, what="the big message dead-lettered")
    entry = dead_letters(sync_redis, config)[0]
    assert entry["size"] > size and entry["truncated"] and len(entry["raw"]) <= 64 << 10
    assert _peak_rss_mb(proc.pid) - before < 16, "the executor held the message in memory"
    assert sync_redis.llen(keys.processing("big-1")) == 0
    after = push(sync_redis, config, "install.sh")
    assert (await wait_done(sync_redis, config, after)).fields["status"] == "succeeded"
