"""Task limits against a real executor: memory and open files through the kernel's rlimits,
processes counted by the executor, the operator's maximum, and limits that cannot be
enforced refused rather than ignored."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from task_job.config import Config, load_config
from task_job.errors import ConfigError
from task_job.limits import parse_limits

from .conftest import pid_alive, records_of, wait_done, wait_until

SCRIPTS = {
    "alloc.py": "#!/usr/bin/env python3\nimport sys\nblock = bytearray(int(sys.argv[1]) * 1024 * 1024)\n"
                "print('allocated', len(block))\n",
    "files.py": "#!/usr/bin/env python3\nimport sys\nfs = [open('/dev/null') for _ in range(int(sys.argv[1]))]\n"
                "print('opened', len(fs))\n",
    "forks.sh": '#!/bin/sh\nwhile :; do sleep 30 & echo $! >> "$1"; done\n',
    "slow.sh": "#!/bin/sh\nsleep 30\n",
}


@pytest.fixture
def scripts(cmd_dir: Path) -> Path:
    for name, text in SCRIPTS.items():
        (cmd_dir / name).write_text(text)
        (cmd_dir / name).chmod(0o755)
    return cmd_dir


def push(r: redis.Redis, config: Config, argv: list[str], **task: Any) -> str:
    task_id = uuid.uuid4().hex
    r.rpush(config.queue_name, orjson.dumps(
        {"id": task_id, "task": {"cmdline": argv[0], "cmd_args": argv[1:], **task}}))
    return task_id


async def test_memory_limit_makes_a_big_allocation_fail_and_says_so(
        config: Config, executor: Any, sync_redis: redis.Redis, scripts: Path) -> None:
    over = push(sync_redis, config, ["alloc.py", "300"], limits={"max_memory_mb": 100})
    under = push(sync_redis, config, ["alloc.py", "20"], limits={"max_memory_mb": 100})
    done = await wait_done(sync_redis, config, over)
    assert done.fields["status"] == "failed"
    assert "memory limit 100 MB (RLIMIT_DATA) in force" in done.data
    err = "".join(r.data for r in records_of(sync_redis, config, over) if r.msg_type == "stderr")
    assert "MemoryError" in err
    assert (await wait_done(sync_redis, config, under)).fields["status"] == "succeeded"


async def test_open_files_limit_is_the_kernels(
        config: Config, executor: Any, sync_redis: redis.Redis, scripts: Path) -> None:
    over = push(sync_redis, config, ["files.py", "100"], limits={"max_open_files": 32})
    under = push(sync_redis, config, ["files.py", "10"], limits={"max_open_files": 32})
    assert (await wait_done(sync_redis, config, over)).fields["status"] == "failed"
    assert (await wait_done(sync_redis, config, under)).fields["status"] == "succeeded"


async def test_a_fork_loop_is_stopped_at_its_process_limit_and_named(
        config: Config, executor: Any, sync_redis: redis.Redis, scripts: Path,
        tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    task_id = push(sync_redis, config, ["forks.sh", str(pids)], limits={"max_processes": 20})
    done = await wait_done(sync_redis, config, task_id, timeout=30)
    assert done.fields["status"] == "failed" and done.data == "killed: 20 processes limit"
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) >= 19
    await wait_until(lambda: not any(pid_alive(p) for p in children), 10, what="the forks gone")


async def test_limits_above_the_maximum_or_not_enforceable_are_rejected_by_name(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        scripts: Path) -> None:
    config = make_config(limits_max={"max_memory_mb": 512, "max_execution_time_secs": 1})
    await start_executor(config)
    above = push(sync_redis, config, ["alloc.py", "1"], limits={"max_memory_mb": 1024})
    cpu = push(sync_redis, config, ["alloc.py", "1"], limits={"max_cpu_percent": 0.5})
    bad = push(sync_redis, config, ["alloc.py", "1"], limits={"max_gpus": 1})
    capped = push(sync_redis, config, ["slow.sh"])  # asks nothing: the maximum bounds it
    done = await wait_done(sync_redis, config, above)
    assert done.fields["status"] == "rejected" and "max_memory_mb 1024 is above limits_max" in done.data
    done = await wait_done(sync_redis, config, cpu)
    assert done.fields["status"] == "rejected" and "max_cpu_percent cannot be enforced" in done.data
    done = await wait_done(sync_redis, config, bad)
    assert done.fields["status"] == "rejected" and "max_gpus is not a limit" in done.data
    done = await wait_done(sync_redis, config, capped)
    assert done.fields["status"] == "timeout" and "timeout of 1s" in done.data


def test_limits_config_is_checked(tmp_path: Path, cmd_dir: Path) -> None:
    assert parse_limits({"max_cpu_percent": 0.8}, "x") == {"max_cpu_percent": 80.0}
    for bad in ({"limits_default": {"max_cpu_percent": 50}},
                {"limits_default": {"max_memory_mb": 200}, "limits_max": {"max_memory_mb": 100}},
                {"limits_max": {"max_processes": 2.5}}, {"limits_max": {"max_memory_mb": -1}}):
        path = tmp_path / "c.json"
        path.write_text(orjson.dumps({"cmd_dir": str(cmd_dir), **bad}).decode())
        with pytest.raises(ConfigError):
            load_config(path, env={})
