"""`task-job` as operators run it: subprocesses, signals, the original's flags, big output."""

from __future__ import annotations

import signal
import subprocess
import sys
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
from task_job.protocol import parse_record

from .conftest import ExecutorProcess, done_of, records_of, wait_done, wait_until, write_config

ORIGINAL = (b'{"id":"101","type":"test","task":{"cmdline":"install.sh",'
            b'"cmd_args":["feature/homestead"],"timeout":3600}}')


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "task_job.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def registered(r: redis.Redis, config: Config) -> bool:
    return r.zscore(Keys.for_config(config).executors, config.executor_id) is not None


async def started(spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
                  config: Config, tmp_path: Path, **extra: Any) -> tuple[ExecutorProcess, Path]:
    """`task-job run --config FILE` as a subprocess, once it has registered."""
    path = write_config(tmp_path / "config.json", config, **extra)
    proc = spawn_executor("run", "--config", str(path))
    await wait_until(lambda: registered(sync_redis, config), 15, what="executor registered")
    return proc, path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_original_command_line_flags_work(
        config: Config, spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", config)
    log_dir = tmp_path / "logs"
    proc = spawn_executor("run", f"-config={path}", "-alsologtostderr", f"-log_dir={log_dir}")
    await wait_until(lambda: registered(sync_redis, config), 15, what="executor registered")
    sync_redis.rpush(config.queue_name, ORIGINAL)
    done = await wait_done(sync_redis, config, "101")
    assert done.fields["status"] == "succeeded"
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    lines = [orjson.loads(line) for line in (log_dir / "task-job.log").read_text().splitlines()]
    events = [line["message"] for line in lines]
    for event in ("executor started", "task started", "task finished", "executor stopped"):
        assert event in events
    started = next(line for line in lines if line["message"] == "task started")
    assert started["task_id"] == "101" and started["pid"] > 0 and started["attempt"] == 1
    finished = next(line for line in lines if line["message"] == "task finished")
    assert finished["task_id"] == "101" and finished["status"] == "succeeded"
    on_stderr = [orjson.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    assert any(line["message"] == "task finished" for line in on_stderr)  # -alsologtostderr


async def test_sigterm_drains_running_tasks_kills_the_rest_and_exits_zero(
        make_config: Callable[..., Config], spawn_executor: Callable[..., ExecutorProcess],
        sync_redis: redis.Redis, tmp_path: Path) -> None:
    config = make_config(drain_timeout=1.5)
    proc, _ = await started(spawn_executor, sync_redis, config, tmp_path)
    async with AsyncClient(config) as client:
        short = await client.submit("sleep.sh", ["0.5"])
        long = await client.submit("sleep.sh", ["100"])
        await wait_until(lambda: len(records_of(sync_redis, config)) >= 2, what="both started")
        proc.signal(signal.SIGTERM)
        await wait_until(lambda: sync_redis.hget(Keys.for_config(config).executor(
            config.executor_id), "status") == b"draining", what="executor draining")
        queued = await client.submit("install.sh", ["after stop"])
        assert proc.wait(20) == 0
    assert done_of(sync_redis, config, short)[0].fields["status"] == "succeeded"
    killed = done_of(sync_redis, config, long)[0]
    assert killed.fields["status"] == "killed" and "drain_timeout of 1.5s" in killed.data
    assert not done_of(sync_redis, config, queued)  # not claimed after the stop
    assert sync_redis.lrange(config.queue_name, 0, -1) != []
    keys = Keys.for_config(config)
    assert sync_redis.llen(keys.processing(config.executor_id)) == 0
    assert not registered(sync_redis, config)


async def test_100_mb_of_output_is_delivered_completely_with_bounded_memory(
        make_config: Callable[..., Config], spawn_executor: Callable[..., ExecutorProcess],
        sync_redis: redis.Redis, tmp_path: Path) -> None:
    config = make_config(task_log_max_records=100)
    proc, _ = await started(spawn_executor, sync_redis, config, tmp_path, task_log_max_records=100)
    size = 100_000_000
    async with AsyncClient(config) as client:
        task_id = await client.submit("flood.sh", [str(size)])
        done = await wait_done(sync_redis, config, task_id, timeout=240)
    assert done.fields["status"] == "succeeded"
    rss = peak_rss_mb(proc.pid)
    total = 0
    lines = 0
    seqs = []
    tails: list[bool] = []
    start, step = 0, 200
    while True:
        chunk = sync_redis.lrange(config.logs_channel, start, start + step - 1)
        if not chunk:
            break
        for raw in chunk:
            rec = parse_record(raw)
            seqs.append(rec.seq)
            if rec.msg_type == "stdout":
                total += len(rec.data)
                lines += rec.data.count("\n")
                tails.append(rec.data.endswith("\n"))
        start += step
    # fold leaves its last, partial line without a newline: every record but the last ends
    # on a whole line.
    assert tails[:-1] == [True] * (len(tails) - 1) and tails[-1] is False
    assert (total, lines) == (size + size // 99, size // 99)
    assert seqs == list(range(len(seqs)))
    assert rss < 150, f"executor peak RSS {rss:.0f} MB"
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0


async def test_submit_wait_streams_output_and_passes_the_exit_code(
        config: Config, spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    _, path = await started(spawn_executor, sync_redis, config, tmp_path)
    ok = cli("submit", "--config", str(path), "--id", "w1", "--wait", "--", "install.sh", "a b")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "w1\ninstalling a b\n"
    assert "done installing" in ok.stderr and "w1 succeeded" in ok.stderr
    bad = cli("submit", "--config", str(path), "--wait", "--", "fail.sh")
    assert bad.returncode == 2 and "failing" in bad.stderr
    logs = cli("logs", "--config", str(path), "w1")
    assert logs.stdout == "installing a b\n" and "done installing" in logs.stderr
    rows = orjson.loads(cli("executors", "--config", str(path), "--json").stdout)
    assert [row["id"] for row in rows] == [config.executor_id]


async def test_kill_command_stops_a_running_task(
        config: Config, spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    _, path = await started(spawn_executor, sync_redis, config, tmp_path)
    assert cli("submit", "--config", str(path), "--id", "k1", "--", "sleep.sh", "100").returncode == 0
    await wait_until(lambda: records_of(sync_redis, config, "k1"), what="task started")
    assert cli("kill", "--config", str(path), "k1").returncode == 0
    done = await wait_done(sync_redis, config, "k1")
    assert done.fields["status"] == "killed"


@pytest.mark.parametrize("body, needle", [
    ('{"max_concurrency": -1}', "max_concurrency"),
    ('{"confine": "off"}', "confine"),
    ('{"cmd_dir": "/nonexistent/dir"}', "cmd_dir"),
    ('{"redis_adr": "x"}', "redis_adr"),
])
def test_bad_config_exits_nonzero_with_one_line_naming_the_key(
        tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(body)
    for args in (("check-config", str(path)), ("run", "--config", str(path))):
        result = cli(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr


def test_check_config_accepts_the_example_and_hides_passwords(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config.example.json"
    assert cli("check-config", str(example)).returncode == 0
    path = tmp_path / "c.json"
    path.write_text('{"redis_addr": "redis://u:topsecret@127.0.0.1:1/0"}')
    result = cli("check-config", str(path))
    assert result.returncode == 0 and "topsecret" not in result.stdout


def test_unreachable_redis_client_fails_with_one_clear_line_and_run_retries(
        tmp_path: Path, cmd_dir: Path) -> None:
    from task_job.embedded import free_port

    port = free_port()
    result = cli("logs", "--redis", f"127.0.0.1:{port}", "some-id")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"task-job: redis at 127.0.0.1:{port}: connection refused (is redis-server running there?)"]
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "task_job.cli", "run", "--redis",
                                 f"127.0.0.1:{port}", "--cmd-dir", str(cmd_dir), "--state-dir",
                                 str(tmp_path / "s")], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while b"cannot reach redis" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_runs_a_task_end_to_end_on_embedded_redis(tmp_path: Path) -> None:
    result = cli("run", "--embedded", "--demo", "--state-dir", str(tmp_path / "state"), timeout=60)
    assert result.returncode == 0, result.stderr
    records = [orjson.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records[-1]["msg_type"] == "done" and records[-1]["status"] == "succeeded"
    text: Any = "".join(r["data"] for r in records if r["msg_type"] == "stdout")
    assert "args: feature/homestead $HOME `date` (not expanded)" in text


async def test_status_tasks_dead_drain_commands_and_wait_exit_codes(
        config: Config, spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    _, path = await started(spawn_executor, sync_redis, config, tmp_path)
    conf = ["--config", str(path)]
    timed = cli("submit", *conf, "--id", "t-out", "--timeout", "0.2", "--wait", "--", "sleep.sh", "30")
    assert timed.returncode == 124, timed.stderr  # as coreutils' timeout
    refused = cli("submit", *conf, "--id", "t-rej", "--wait", "--", "no-such.sh")
    assert refused.returncode == 125, refused.stderr  # task-job did not run it
    status = orjson.loads(cli("status", *conf, "--json", "t-out").stdout)
    assert status["status"] == "timeout" and isinstance(status["finished_at"], float)
    text = cli("status", *conf, "t-rej").stdout
    assert "rejected" in text and config.executor_id in text
    assert cli("status", *conf, "never-seen").returncode == 1
    rows = orjson.loads(cli("tasks", *conf, "--json", "--status", "timeout").stdout)
    assert [r["id"] for r in rows] == ["t-out"]
    sync_redis.rpush(config.queue_name, b"not json")
    await wait_until(lambda: sync_redis.llen(f"{config.queue_name}_dead") == 1, what="a dead letter")
    (dead,) = orjson.loads(cli("dead", *conf, "--json").stdout)
    assert "not valid JSON" in dead["reason"]
    assert cli("drain", *conf, config.executor_id).returncode == 0
    await wait_until(lambda: sync_redis.hget(f"{{{config.queue_name}}}:executor:{config.executor_id}",
                                             "status") == b"draining", what="drained")
    (row,) = orjson.loads(cli("executors", *conf, "--json").stdout)
    assert row["status"] == "draining" and isinstance(row["slots"], int)
    assert cli("resume", *conf, config.executor_id).returncode == 0
    assert cli("drain", *conf, "no-such-executor").returncode == 1


async def test_ctrl_c_on_submit_wait_says_how_to_kill_the_task(
        config: Config, spawn_executor: Callable[..., ExecutorProcess], sync_redis: redis.Redis,
        tmp_path: Path) -> None:
    _, path = await started(spawn_executor, sync_redis, config, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "task_job.cli", "submit", "--config", str(path),
                             "--id", "cc1", "--wait", "--", "sleep.sh", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await wait_until(lambda: records_of(sync_redis, config, "cc1") or
                         sync_redis.hget(f"{{{config.queue_name}}}:task:cc1", "status") == b"running",
                         what="the task running")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert f"task-job kill --config {path} cc1" in err and "Traceback" not in err
    assert cli("kill", "--config", str(path), "cc1").returncode == 0
