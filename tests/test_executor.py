"""The executor against a real redis-server and real subprocesses, in the test's event loop."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from task_job.broker import Keys
from task_job.client import AsyncClient
from task_job.config import Config
from task_job.protocol import build_task
from task_job.runner import Guard

from .conftest import (
    ExecutorHandle,
    dead_letters,
    done_of,
    pid_alive,
    pipes_and_pidfds,
    records_of,
    wait_done,
    wait_until,
)

ORIGINAL = (b'{"id":"101","type":"test","task":{"cmdline":"install.sh",'
            b'"cmd_args":["feature/homestead"],"timeout":3600}}')


def output_of(r: redis.Redis, config: Config, task_id: str, kind: str = "stdout") -> bytes:
    return b"".join(rec.payload for rec in records_of(r, config, task_id) if rec.msg_type == kind)


async def test_original_example_message_runs_and_streams_records(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    await client.push_raw(ORIGINAL)
    done = await wait_done(sync_redis, config, "101")
    recs = records_of(sync_redis, config, "101")
    assert [r.seq for r in recs] == list(range(len(recs)))
    assert recs[-1] is not None and recs[-1].is_done
    assert output_of(sync_redis, config, "101") == b"installing feature/homestead\n"
    assert output_of(sync_redis, config, "101", "stderr") == b"done installing\n"
    assert done.fields["status"] == "succeeded" and done.fields["exit_code"] == 0
    assert done.data == "exit status 0"
    for rec in recs:
        assert rec.fields["type"] == "test" and rec.fields["executor"] == config.executor_id
        assert isinstance(rec.fields["ts"], float)
    assert done.fields["started_at"] <= done.fields["finished_at"]
    keys = Keys.for_config(config)
    assert sync_redis.llen(keys.processing(config.executor_id)) == 0
    state = sync_redis.hgetall(keys.task("101"))
    assert state[b"status"] == b"succeeded" and sync_redis.ttl(keys.task("101")) > 0
    assert int(state[b"pid"]) > 0 and float(state[b"started_at"]) == pytest.approx(
        done.fields["started_at"], abs=1e-5)


async def test_every_state_record_keeps_its_pid_and_start_time_whether_sent_alone_or_folded(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    # A burst of short tasks: most start notes are folded into their done record's script.
    ids = [await client.submit("install.sh", [str(i)]) for i in range(30)]
    dones = [await wait_done(sync_redis, config, i) for i in ids]
    keys = Keys.for_config(config)
    for task_id, done in zip(ids, dones, strict=True):
        state = sync_redis.hgetall(keys.task(task_id))
        assert state[b"status"] == b"succeeded", state
        assert int(state[b"pid"]) > 0
        assert float(state[b"started_at"]) == pytest.approx(done.fields["started_at"], abs=1e-5)


async def test_failed_task_reports_exit_status(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    task_id = await client.submit("fail.sh")
    done = await wait_done(sync_redis, config, task_id)
    assert (done.fields["status"], done.fields["exit_code"], done.data) == ("failed", 2, "exit status 2")


async def test_shell_metacharacters_in_cmd_args_arrive_verbatim(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    args = ["$HOME", "`id`", "a b", "; rm -rf /", "*", "'\"", "$(touch pwned)", "", "x\ny"]
    task_id = await client.submit("args.sh", args)
    await wait_done(sync_redis, config, task_id)
    expected = "".join(f"[{a}]\n" for a in args).encode()
    assert output_of(sync_redis, config, task_id) == expected
    assert not (Path(config.cmd_dir) / "pwned").exists()


async def test_output_without_trailing_newline_is_delivered(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    task_id = await client.submit("noeol.sh")
    await wait_done(sync_redis, config, task_id)
    assert output_of(sync_redis, config, task_id) == b"no newline at the end"


async def test_non_utf8_output_round_trips_through_base64(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    task_id = await client.submit("binary.sh")
    await wait_done(sync_redis, config, task_id)
    recs = [r for r in records_of(sync_redis, config, task_id) if r.msg_type == "stdout"]
    assert recs[0].fields["encoding"] == "base64"
    assert output_of(sync_redis, config, task_id) == b"ok \xff\xfe bytes\n"


async def test_env_cwd_and_stdin_reach_the_task(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    env_id = await client.submit("../env.sh", env={"GREETING": "hi there"}, cwd="sub")
    cat_id = await client.submit("cat.sh", stdin="fed through stdin\n")
    await wait_done(sync_redis, config, env_id)
    await wait_done(sync_redis, config, cat_id)
    assert output_of(sync_redis, config, env_id) == f"GREETING=hi there\n{config.cmd_dir}/sub\n".encode()
    assert output_of(sync_redis, config, cat_id) == b"fed through stdin\n"


async def test_stdin_bigger_than_a_pipe_arrives_whole_and_tasks_leave_no_fd_open(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    fds_before = pipes_and_pidfds()
    # 740 KB through cat (a pipe holds 64 KiB): the writer waits for room, the reader for output.
    lines = "".join(f"line {i:07d} of the stdin fed to cat\n" for i in range(20000))
    big_id = await client.submit("cat.sh", stdin=lines)
    quiet = [await client.submit("count.sh", [str(config.cmd_dir) + f"/count-{i}"]) for i in range(20)]
    for task_id in (big_id, *quiet):
        assert (await wait_done(sync_redis, config, task_id, timeout=30)).fields["status"] == "succeeded"
    assert output_of(sync_redis, config, big_id) == lines.encode()
    # Every pipe and pidfd of those tasks is closed (and unwatched) once their done records
    # are queued.
    try:
        await wait_until(lambda: pipes_and_pidfds() <= fds_before, what="fds back to those before the tasks")
    except AssertionError:
        raise AssertionError(f"left open: {sorted(pipes_and_pidfds() - fds_before)}") from None


async def test_interpreter_runs_a_script_inside_cmd_dir(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    task_id = await client.submit("python3", ["-u", "script.py", "a b"])
    done = await wait_done(sync_redis, config, task_id)
    assert done.fields["status"] == "succeeded", done.fields
    assert output_of(sync_redis, config, task_id) == b"python ['a b']\n"


@pytest.mark.parametrize("cmdline, args", [
    ("../escape.sh", []),
    ("/bin/echo", ["hi"]),
    ("link-out.sh", []),
    ("sh", ["-c", "echo escaped"]),
    ("python3", ["-c", "print('escaped')"]),
])
async def test_confinement_escape_is_rejected_and_never_runs(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config,
        tmp_path: Path, cmdline: str, args: list[str]) -> None:
    escape = tmp_path / "escape.sh"
    escape.write_text(f"#!/bin/sh\ntouch {tmp_path}/escaped\n")
    escape.chmod(0o755)
    (Path(config.cmd_dir) / "link-out.sh").symlink_to(escape)
    task_id = await client.submit(cmdline, args)
    done = await wait_done(sync_redis, config, task_id)
    assert done.fields["status"] == "rejected"
    assert done.data.startswith("rejected:")
    assert not (tmp_path / "escaped").exists()
    assert not output_of(sync_redis, config, task_id)


async def test_timeout_kills_the_task_and_its_grandchild(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config,
        tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    task_id = await client.submit("family.sh", [str(pidfile)], timeout=0.5)
    grandchild = int(await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                                      what="grandchild pid"))
    done = await wait_done(sync_redis, config, task_id)
    assert done.fields["status"] == "timeout"
    assert done.fields["signal"] == "SIGTERM" and done.fields["exit_code"] is None
    assert done.data == "killed by SIGTERM after timeout of 0.5s"
    await wait_until(lambda: not pid_alive(grandchild), 5, what="grandchild to die")


async def test_kill_message_reaches_grandchild_processes(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config,
        tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    await client.push_raw(build_task("101", "family.sh", [str(pidfile)], type="test"))
    grandchild = int(await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                                      what="grandchild pid"))
    await wait_until(lambda: output_of(sync_redis, config, "101"), what="first output")
    pushed = time.monotonic()
    sync_redis.rpush(config.queue_control_name, b'{"id":"101","type":"kill"}')
    await wait_until(lambda: not pid_alive(grandchild), 5, interval=0.002, what="grandchild to die")
    took = time.monotonic() - pushed
    done = await wait_done(sync_redis, config, "101")
    assert done.fields["status"] == "killed" and done.fields["signal"] == "SIGTERM"
    assert "on request" in done.data
    # The contract is 100 ms (measured in bench/); the bound here leaves room for a loaded CI.
    assert took < 1.0, f"kill took {took:.3f}s"


async def test_kill_escalates_to_sigkill_after_kill_grace(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(kill_grace=0.3)
    await start_executor(config)
    async with AsyncClient(config) as client:
        task_id = await client.submit("term_ignored.sh")
        await wait_until(lambda: output_of(sync_redis, config, task_id), what="task ready")
        await client.kill(task_id)
        done = await wait_done(sync_redis, config, task_id)
    assert (done.fields["status"], done.fields["signal"]) == ("killed", "SIGKILL")
    assert done.data.startswith("killed by SIGKILL")


async def test_kill_before_the_task_starts_cancels_it(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config,
        tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    await client.kill("later")
    await wait_until(lambda: sync_redis.hget(Keys.for_config(config).task("later"), "status"),
                     what="cancel mark")
    await client.submit("count.sh", [str(marker)], task_id="later")
    done = await wait_done(sync_redis, config, "later")
    assert done.fields["status"] == "cancelled"
    assert not marker.exists()


async def test_kill_for_unknown_or_finished_task_changes_nothing(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    task_id = await client.submit("install.sh", ["x"])
    await wait_done(sync_redis, config, task_id)
    await client.kill(task_id)
    probe = await client.submit("install.sh", ["after"])
    await wait_done(sync_redis, config, probe)
    await wait_until(lambda: sync_redis.llen(config.queue_control_name) == 0, what="control drained")
    assert len(done_of(sync_redis, config, task_id)) == 1


async def test_duplicate_id_is_rejected_not_run_twice(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config,
        tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    await client.submit("count.sh", [str(counter)], task_id="dup")
    await wait_done(sync_redis, config, "dup")
    # A producer pushing the raw message again (the client itself refuses a known id).
    await client.push_raw(orjson.dumps({"id": "dup", "task": {"cmdline": "count.sh",
                                                              "cmd_args": [str(counter)]}}))
    await wait_until(lambda: dead_letters(sync_redis, config), what="dead letter")
    assert counter.read_text() == "run\n"
    assert len(done_of(sync_redis, config, "dup")) == 1
    assert "duplicate id" in dead_letters(sync_redis, config)[0]["reason"]


MALFORMED = [
    (b"not json at all", "not valid JSON", None),
    (b'["an", "array"]', "must be a JSON object", None),
    (b'{"type": "start", "task": {"cmdline": "install.sh"}}', "missing 'id'", None),
    (b'{"id": "m1", "type": "start"}', "missing 'task'", "m1"),
    (b'{"id": "m2", "task": {"cmd_args": ["x"]}}', "missing 'task.cmdline'", "m2"),
    (b'{"id": "m3", "task": {"cmdline": ["install.sh"]}}', "must be a string", "m3"),
    (b'{"id": "m4", "task": {"cmdline": "install.sh", "cmd_args": "x"}}', "must be an array", "m4"),
    (b'{"id": "m5", "task": {"cmdline": "install.sh", "timeout": "soon"}}', "must be a number", "m5"),
    (b'{"id": "m6", "task": {"cmdline": "install.sh \'unbalanced"}}', "cannot be split", "m6"),
    (b'{"id": "m7", "task": {"cmdline": "x", "pad": "' + b"p" * 5000 + b'"}}', "exceeds the limit", None),
    (b"\xff\xfe\x00binary", "not valid JSON", None),
]


async def test_malformed_messages_are_dead_lettered_and_the_executor_keeps_serving(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(max_message_bytes=4096)
    await start_executor(config)
    async with AsyncClient(config) as client:
        for raw, _, _ in MALFORMED:
            await client.push_raw(raw)
        good = await client.submit("install.sh", ["still serving"])
        await wait_done(sync_redis, config, good)
    await wait_until(lambda: len(dead_letters(sync_redis, config)) == len(MALFORMED),
                     what="every malformed message dead-lettered")
    dead = dead_letters(sync_redis, config)
    for (raw, reason, task_id), entry in zip(MALFORMED, dead, strict=True):
        assert reason in entry["reason"], (raw, entry)
        if task_id:
            done = done_of(sync_redis, config, task_id)
            assert len(done) == 1 and done[0].fields["status"] == "rejected"
            assert reason in done[0].data
    assert dead[-1]["encoding"] == "base64"  # the binary one is kept exactly
    keys = Keys.for_config(config)
    assert sync_redis.llen(keys.processing(config.executor_id)) == 0


async def test_slots_bound_how_many_tasks_run_at_once(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(max_concurrency=2)
    handle = await start_executor(config)
    async with AsyncClient(config) as client:
        ids = [await client.submit("sleep.sh", ["0.3"]) for _ in range(5)]
        keys = Keys.for_config(config)
        peak = 0
        deadline = time.monotonic() + 15
        while len([i for i in ids if done_of(sync_redis, config, i)]) < 5:
            peak = max(peak, len(handle.executor.running))
            # Claimed means moved out of the queue: never more than the free slots.
            assert sync_redis.llen(keys.processing(config.executor_id)) <= 2 + 1
            assert time.monotonic() < deadline, "tasks did not finish"
            await asyncio.sleep(0.01)
    assert peak == 2


async def test_leftover_of_a_dead_run_with_this_executor_id_is_reported_lost(
        config: Config, start_executor: Any, sync_redis: redis.Redis) -> None:
    keys = Keys.for_config(config)
    raw = build_task("orphan", "sleep.sh", ["100"])
    never_begun = build_task("unstarted", "install.sh", ["x"])
    # As a SIGKILLed executor leaves things: one task claimed and running, one claimed only.
    sync_redis.rpush(keys.processing(config.executor_id), raw, never_begun)
    sync_redis.hset(keys.task("orphan"), mapping={"status": "running", "executor": config.executor_id,
                                                  "seq": 1, "attempt": 1})
    await start_executor(config)
    lost = await wait_done(sync_redis, config, "orphan")
    assert lost.fields["status"] == "lost" and lost.seq == 2
    ran = await wait_done(sync_redis, config, "unstarted")
    assert ran.fields["status"] == "succeeded"


async def test_orphaned_background_child_does_not_hang_the_task(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config,
        tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    task_id = await client.submit("orphan.sh", [str(pidfile)])
    done = await wait_done(sync_redis, config, task_id, timeout=10)
    assert done.fields["status"] == "succeeded"
    await wait_until(lambda: not pid_alive(int(pidfile.read_text())), 5, what="background child to die")


async def test_max_output_caps_what_is_kept_and_says_so(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config) -> None:
    task_id = "capped"
    await client.push_raw(orjson.dumps({"id": task_id, "task": {
        "cmdline": "flood.sh", "cmd_args": ["100000"], "max_output": 1000}}))
    done = await wait_done(sync_redis, config, task_id)
    assert done.fields["status"] == "succeeded"
    assert len(output_of(sync_redis, config, task_id)) == 1000
    dropped = done.fields["dropped_bytes"]
    assert dropped == 100000 + 100000 // 99 - 1000
    assert f"{dropped} bytes of output dropped" in output_of(sync_redis, config, task_id, "stderr").decode()


async def test_logs_false_sends_only_done_records(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(logs=False)
    await start_executor(config)
    async with AsyncClient(config) as client:
        task_id = await client.submit("install.sh", ["quiet"])
        await wait_done(sync_redis, config, task_id)
    recs = records_of(sync_redis, config, task_id)
    assert [r.msg_type for r in recs] == ["done"] and recs[0].seq == 0


async def test_wait_follows_the_per_task_stream(
        executor: ExecutorHandle, client: AsyncClient, config: Config) -> None:
    task_id = await client.submit("install.sh", ["streamed"])
    done = await client.wait(task_id, timeout=15)
    assert done.fields["status"] == "succeeded"
    seen = [r async for r in client.records(task_id)]
    assert b"".join(r.payload for r in seen if r.msg_type == "stdout") == b"installing streamed\n"
    assert seen[-1].is_done


async def test_stop_drains_running_tasks_then_kills_the_rest(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    config = make_config(drain_timeout=0.5)
    handle = await start_executor(config)
    async with AsyncClient(config) as client:
        short = await client.submit("sleep.sh", ["0.1"])
        long = await client.submit("sleep.sh", ["100"])
        await wait_until(lambda: len(handle.executor.running) == 2, what="both running")
        await handle.stop()
    assert done_of(sync_redis, config, short)[0].fields["status"] == "succeeded"
    killed = done_of(sync_redis, config, long)[0]
    assert killed.fields["status"] == "killed" and "drain_timeout" in killed.data
    assert sync_redis.llen(Keys.for_config(config).processing(config.executor_id)) == 0


async def test_guard_kills_the_groups_it_lists_when_its_pipe_closes_and_spares_released_ones(
        ) -> None:
    # One slot for four groups: the shared table grows; one group is released before the end.
    guard = Guard(1)
    guard.start()
    children = [subprocess.Popen(["sleep", "100"], start_new_session=True) for _ in range(4)]
    try:
        for child in children:
            guard.watch(child.pid)
        guard.release(children[0].pid)
        guard.close()  # as if the executor died: the guard reads EOF
        for child in children[1:]:
            assert child.wait(5) == -signal.SIGKILL
        assert children[0].poll() is None  # released: not the guard's to kill
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


async def test_a_setsid_grandchild_and_a_double_fork_do_not_outlive_their_task(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config,
        cmd_dir: Path, tmp_path: Path) -> None:
    (cmd_dir / "escape.sh").write_text(
        '#!/bin/sh\nsetsid sleep 1000 </dev/null >/dev/null 2>&1 &\necho $! > "$1"\n'
        '( sh -c \'sleep 1001 & echo $! > "$0"\' "$2" & ) </dev/null >/dev/null 2>&1\n'
        'sleep 0.2\necho spawned\n')
    (cmd_dir / "escape.sh").chmod(0o755)
    first, second = tmp_path / "setsid.pid", tmp_path / "double.pid"
    task_id = await client.submit("escape.sh", [str(first), str(second)])
    done = await wait_done(sync_redis, config, task_id)
    assert done.fields["status"] == "succeeded"
    pids = [int(first.read_text()), int(second.read_text())]
    await wait_until(lambda: not any(pid_alive(p) for p in pids), 10,
                     what="the escaped processes killed")


async def test_done_records_carry_usage_of_cpu_and_peak_memory(
        executor: ExecutorHandle, client: AsyncClient, sync_redis: redis.Redis, config: Config,
        cmd_dir: Path) -> None:
    (cmd_dir / "alloc.py").write_text(
        "#!/usr/bin/env python3\nblock = bytearray(100 * 1024 * 1024)\n"
        "for i in range(0, len(block), 4096):\n    block[i] = 1\nprint('allocated')\n")
    (cmd_dir / "alloc.py").chmod(0o755)
    task_id = await client.submit("alloc.py")
    done = await wait_done(sync_redis, config, task_id)
    usage = done.fields["usage"]
    assert usage["max_rss"] >= 100 * 1024 * 1024
    assert 0 < usage["cpu_user"] + usage["cpu_system"] < done.fields["duration"] + 0.5
