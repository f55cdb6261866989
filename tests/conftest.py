"""Fixtures: a real redis-server per session on a free loopback port, flushed per test;
executors in-process or as subprocesses, each stopped by its own pid."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from task_job.broker import Keys
from task_job.client import AsyncClient
from task_job.config import Config
from task_job.embedded import RedisServer
from task_job.executor import Executor
from task_job.protocol import Record, parse_record

SCRIPTS = {
    "install.sh": '#!/bin/sh\necho "installing $1"\necho "done installing" >&2\n',
    "args.sh": '#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done\n',
    "fail.sh": "#!/bin/sh\necho failing >&2\nexit 2\n",
    "sleep.sh": '#!/bin/sh\necho started\nexec sleep "${1:-1000}"\n',
    # Spawns a grandchild that would outlive a kill of the direct child alone.
    "family.sh": '#!/bin/sh\nsleep 1000 &\necho $! > "$1"\necho ready\nwait\n',
    "orphan.sh": '#!/bin/sh\nsleep 1000 &\necho $! > "$1"\necho parent exits\n',
    "noeol.sh": "#!/bin/sh\nprintf 'no newline at the end'\n",
    "binary.sh": "#!/bin/sh\nprintf 'ok \\377\\376 bytes\\n'\n",
    "env.sh": '#!/bin/sh\necho "GREETING=$GREETING"\npwd\n',
    "cat.sh": "#!/bin/sh\ncat\n",
    "count.sh": '#!/bin/sh\necho run >> "$1"\n',
    "flood.sh": '#!/bin/sh\nhead -c "$1" /dev/zero | tr "\\0" "x" | fold -w 99\n',
    "script.py": "import sys\nprint('python', sys.argv[1:])\n",
    "term_ignored.sh": '#!/bin/sh\ntrap "" TERM\necho ready\nwhile :; do sleep 0.05; done\n',
}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, with an append-only file, that the test may stop."""
    server = RedisServer(tmp_path / "own-redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own that keeps nothing on disk: a restart empties it."""
    server = RedisServer(tmp_path / "volatile-redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    with redis.Redis.from_url(redis_server.url) as r:
        r.flushall()
    yield redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as r:
        yield r


@pytest.fixture
def cmd_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cmd"
    root.mkdir()
    for name, text in SCRIPTS.items():
        path = root / name
        path.write_text(text)
        path.chmod(0o755)
    (root / "sub").mkdir()
    return root


@pytest.fixture
def make_config(redis_url: str, cmd_dir: Path, tmp_path: Path) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        values: dict[str, Any] = dict(
            redis_addr=redis_url, cmd_dir=str(cmd_dir), state_dir=str(tmp_path / "state"),
            executor_id=f"test-{uuid.uuid4().hex[:8]}", kill_grace=1.0, drain_timeout=5.0,
            heartbeat_interval=0.5, dead_after=3.0, max_concurrency=4,
        )
        values.update(overrides)
        return Config(**values)

    return make


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


class ExecutorHandle:
    """An executor running in this test's loop."""

    def __init__(self, executor: Executor, task: asyncio.Task[None]) -> None:
        self.executor = executor
        self.task = task

    async def stop(self, timeout: float = 30.0) -> None:
        self.executor.stop()
        async with asyncio.timeout(timeout):
            await self.task


@pytest.fixture
async def start_executor() -> AsyncIterator[Callable[[Config], Awaitable[ExecutorHandle]]]:
    handles: list[ExecutorHandle] = []

    async def start(config: Config) -> ExecutorHandle:
        executor = Executor(config)
        task = asyncio.create_task(executor.run())
        ready = asyncio.ensure_future(executor.wait_ready())
        await asyncio.wait({ready, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            await task
        assert ready.done(), "executor did not become ready in 10s"
        handle = ExecutorHandle(executor, task)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        if not handle.task.done():
            await handle.stop()


@pytest.fixture
async def executor(config: Config, start_executor: Any) -> ExecutorHandle:
    handle: ExecutorHandle = await start_executor(config)
    return handle


@pytest.fixture
async def client(config: Config) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(config) as c:
        yield c


async def wait_until(probe: Callable[[], Any], timeout: float = 10.0,
                     interval: float = 0.01, what: str = "condition") -> Any:
    """Poll `probe` (sync or async) until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {last!r}")
        await asyncio.sleep(interval)


def records_of(r: redis.Redis, config: Config, task_id: str | None = None) -> list[Record]:
    """Every record in the shared logs list (optionally of one task), in list order."""
    out = [parse_record(raw) for raw in r.lrange(config.logs_channel, 0, -1)]
    return [rec for rec in out if task_id is None or rec.id == task_id]


def done_of(r: redis.Redis, config: Config, task_id: str) -> list[Record]:
    return [rec for rec in records_of(r, config, task_id) if rec.is_done]


async def wait_done(r: redis.Redis, config: Config, task_id: str, timeout: float = 15.0) -> Record:
    found = await wait_until(lambda: done_of(r, config, task_id), timeout,
                             what=f"done record of {task_id}")
    return found[0]  # type: ignore[no-any-return]


def dead_letters(r: redis.Redis, config: Config) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in r.lrange(Keys.for_config(config).dead, 0, -1)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def pipes_and_pidfds() -> set[str]:
    """This process's open pipes and pidfds, each as 'fd:target' (to see what tasks leave)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # the listing's own fd, closed already
        if target.startswith(("pipe:", "anon_inode:[pidfd]")):
            found.add(f"{fd}:{target}")
    return found


class ExecutorProcess:
    """`task-job run` as a subprocess, stopped by its own pid."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "task_job.cli", *args], stdout=self.log, stderr=self.log,
            env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.log is not subprocess.DEVNULL:
            self.log.close()  # type: ignore[union-attr]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@pytest.fixture
def spawn_executor(tmp_path: Path) -> Iterator[Callable[..., ExecutorProcess]]:
    procs: list[ExecutorProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> ExecutorProcess:
        proc = ExecutorProcess(list(args), env, tmp_path / f"executor-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.stop()


def write_config(path: Path, config: Config, **extra: Any) -> Path:
    keys = ("redis_addr", "cmd_dir", "state_dir", "executor_id", "kill_grace", "drain_timeout",
            "heartbeat_interval", "dead_after", "max_concurrency")
    data = {k: getattr(config, k) for k in keys}
    data.update(extra)
    path.write_text("// written by a test\n" + orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return path
