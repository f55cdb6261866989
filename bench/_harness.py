"""Shared pieces of the benchmarks: a private redis-server, executors as subprocesses,
medians and percentiles. Every process started here is stopped by its own pid."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from task_job.embedded import RedisServer  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"p50 {statistics.median(ms):.2f} ms, p99 {pct(ms, 99):.2f} ms, max {max(ms):.2f} ms"


@contextmanager
def redis_server() -> Iterator[tuple[RedisServer, redis.Redis]]:
    with tempfile.TemporaryDirectory(prefix="tj-bench-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            with redis.Redis.from_url(server.url) as r:
                yield server, r
        finally:
            server.stop()


@contextmanager
def executor(redis_url: str, cmd_dir: str, **config: object) -> Iterator[subprocess.Popen[bytes]]:
    """`task-job run` as a subprocess; yields once it has registered."""
    with tempfile.TemporaryDirectory(prefix="tj-exec-") as tmp:
        cfg = {"redis_addr": redis_url, "cmd_dir": cmd_dir, "state_dir": tmp,
               "executor_id": f"bench-{os.getpid()}", "log_level": "warning", **config}
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg))
        log = open(Path(tmp) / "log", "wb")  # noqa: SIM115 - closed with the executor
        proc = subprocess.Popen([sys.executable, "-m", "task_job.cli", "run", "--config", str(path)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        try:
            with redis.Redis.from_url(redis_url) as r:
                key = f"{{{cfg.get('queue_name', 'queue_job_task')}}}:executors"
                deadline = time.monotonic() + 15
                while r.zscore(key, cfg["executor_id"]) is None:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((Path(tmp) / "log").read_text())
                    time.sleep(0.01)
            yield proc
        finally:
            stop(proc, 60)
            log.close()


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM:")


def rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS:")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FINAL = {b"succeeded", b"failed", b"timeout", b"killed", b"cancelled", b"lost", b"rejected"}


def wait_final(r: redis.Redis, task_id: str, queue: str = "queue_job_task", timeout: float = 600) -> bytes:
    """Poll the task's state until final: finish.lua sets it in the same step that writes the
    done record, so this is exact, and costs one HGET instead of re-reading the records."""
    key = f"{{{queue}}}:task:{task_id}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = r.hget(key, "status")
        if status in FINAL:
            return status
        time.sleep(0.0005)
    raise TimeoutError(task_id)


def wait_done(r: redis.Redis, logs: str, task_id: str, start: int, timeout: float = 60) -> tuple[dict, int]:
    """Scan the logs list from `start` for task_id's done record; returns (record, next index)."""
    deadline = time.monotonic() + timeout
    index = start
    while time.monotonic() < deadline:
        for raw in r.lrange(logs, index, -1):
            index += 1
            rec = json.loads(raw)
            if rec["id"] == task_id and rec["msg_type"] == "done":
                return rec, index
        time.sleep(0.0005)
    raise TimeoutError(task_id)


@contextmanager
def rq_worker(redis_url: str, queue: str, worker_class: str | None = None
              ) -> Iterator[subprocess.Popen[bytes]]:
    """An `rq worker` (not burst) as a subprocess, yielded once it has registered; jobs are
    imported from bench/ (rq_jobs.py). Stopped by its pid."""
    import rq

    bench = str(Path(__file__).resolve().parent)
    name = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    args = [sys.executable, "-c", "from rq.cli import main; main()", "worker", "--url", redis_url,
            "--name", name, "--logging_level", "WARNING", queue]
    if worker_class:
        args += ["--worker-class", worker_class]
    proc = subprocess.Popen(args, cwd=bench, env={**os.environ, "PYTHONPATH": bench},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with redis.Redis.from_url(redis_url) as r:
            deadline = time.monotonic() + 30
            while not any(w.name == name for w in rq.Worker.all(connection=r)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rq worker did not start (exit {proc.poll()})")
                time.sleep(0.01)
        yield proc
    finally:
        stop(proc, 30)


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM by pid, SIGKILL if it outlives `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def have_rq() -> bool:
    try:
        import rq  # noqa: F401
    except ImportError:
        return False
    return True


def machine() -> str:
    """One line: cores, Python, Redis version of the server the benchmark started."""
    import platform

    version = subprocess.run([find_redis(), "--version"], capture_output=True, text=True).stdout
    redis_v = next((w.split("=")[1] for w in version.split() if w.startswith("v=")), "?")
    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, "
            f"redis-server {redis_v}, {platform.system()} {platform.release()}")


def find_redis() -> str:
    from task_job.embedded import find_redis_server

    return str(find_redis_server())


def guard_of(pid: int) -> int | None:
    """The executor's guard process: its child whose command line carries the guard's code."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid and b"killpg" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except (OSError, IndexError, ValueError):
                continue
    return None
