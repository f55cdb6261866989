"""Spawn, stream, time out and kill one task's process group (confine.py decides what may run).

Knows nothing of Redis: output goes to a callback, the outcome is returned.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from task_job.protocol import MsgType

_log = logging.getLogger(__name__)

# One read takes what the pipe holds (a pipe holds 64 KiB); records are cut at line ends.
# Kept below the 128 KiB mmap threshold (cli._bound_heap): bigger reads would page-fault.
READ_CHUNK = 64 << 10
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031  # Linux fcntl
# After the task's main process exits, how long its leftovers may keep the pipes open
# before the rest of the group is killed (a backgrounded child must not hang the task).
ORPHAN_GRACE = 2.0

class Ending(Enum):
    EXITED = "exited"
    TIMEOUT = "timeout"
    KILLED = "killed"


@dataclass(frozen=True, slots=True)
class RunResult:
    """What happened to a process: the runner's facts, not yet a `done` record."""

    ending: Ending
    returncode: int
    started_at: float
    finished_at: float
    duration: float
    kill_signal: str | None = None
    kill_reason: str = ""
    usage: dict[str, float | int] | None = None

    @property
    def exit_code(self) -> int | None:
        return self.returncode if self.returncode >= 0 else None

    @property
    def signal(self) -> str | None:
        return signal.Signals(-self.returncode).name if self.returncode < 0 else None


OutputCallback = Callable[[MsgType, bytes], Awaitable[None]]


def _killpg(pgid: int, sig: int) -> bool:
    """Signal the whole group; False when it is already gone (ESRCH)."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:  # pragma: no cover - only if the pid was reused
        if exc.errno == errno.EPERM:
            return False
        raise


class Run:
    """One process group: start it, stream its output, end it by exit, timeout or kill."""

    def __init__(
        self, argv: Sequence[str], *, cwd: str, env: Mapping[str, str] | None, on_output: OutputCallback,
        stdin: str | None = None, timeout: float | None = None, kill_grace: float = 5.0,
        record_max_bytes: int = READ_CHUNK, guard: Guard | None = None,
        creds: Credentials | None = None, spawner: Any = None,
    ) -> None:
        self.creds = creds
        self.spawner = spawner  # spawner.Spawner of creds' user: posix_spawn speed as them
        self.argv = list(argv)
        self.cwd = cwd
        self.env = env
        self.on_output = on_output
        self.stdin = stdin
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.record_max_bytes = record_max_bytes
        self.proc: Child | None = None
        self.guard = guard
        self._stdin_fd = -1
        self.started_at = 0.0
        self._started_mono = 0.0
        self._kill_requested: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._kill_reason = ""
        self._ending = Ending.EXITED
        self._kill_signal: str | None = None
        self._fds: tuple[int, int] = (-1, -1)
        # Pipes being read: fd -> None while a callback watches it, its pump once it carries
        # output. _pipes_done resolves when the last one ends.
        self._pipes: dict[int, asyncio.Future[None] | None] = {}
        self._pipes_done: asyncio.Future[None] = self._kill_requested.get_loop().create_future()
        self._pipe_error: BaseException | None = None
        self._watch = _watcher()  # readiness of this run's pipes and pidfd

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        """Spawn in a new session (own process group); raises OSError if exec fails."""
        # Our own pipes, read directly; one that a task fills is deepened (see _pump).
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r = in_w = -1
        if self.stdin is not None:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
        try:
            if self.spawner is not None:
                self.proc = await self.spawner.spawn(
                    self.argv, self.cwd, dict(self.env or os.environ),
                    in_r if in_r >= 0 else _devnull_fd(), out_w, err_w)
            else:
                self.proc = spawn(self.argv, self.cwd, self.env,
                                  in_r if in_r >= 0 else subprocess.DEVNULL, out_w, err_w, self.creds)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                if fd >= 0:
                    os.close(fd)
        if self.guard is not None:
            self.guard.watch(self.proc.pid)
        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                os.set_blocking(fd, False)
        self._fds = (out_r, err_r)
        self._stdin_fd = in_w
        self.started_at = time.time()
        self._started_mono = time.monotonic()

    def kill(self, reason: str = "killed") -> None:
        """Ask for the group to be stopped: SIGTERM, then SIGKILL after kill_grace."""
        if not self._kill_requested.done():
            self._kill_reason = reason
            self._ending = Ending.KILLED
            self._kill_requested.set_result(None)

    def _watch_pipes(self) -> None:
        """Watch both pipes with a plain callback: a pipe that ends without output (most
        short tasks) costs no coroutine; one that carries output gets a pump task."""
        for fd, kind in zip(self._fds, (MsgType.STDOUT, MsgType.STDERR), strict=True):
            self._pipes[fd] = None
            self._watch.add_reader(fd, self._readable, fd, kind)
        self._fds = (-1, -1)

    def _readable(self, fd: int, kind: MsgType) -> None:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:  # cannot happen on a pipe we own; end it, report it
            self._pipe_error = exc
            chunk = b""
        self._watch.remove(fd)
        if not chunk:
            os.close(fd)
            self._pipe_ended(fd)
            return
        pump = asyncio.ensure_future(self._pump(fd, kind, chunk))
        self._pipes[fd] = pump
        pump.add_done_callback(functools.partial(self._pump_done, fd))

    def _pump_done(self, fd: int, pump: asyncio.Future[None]) -> None:
        if not pump.cancelled() and pump.exception() is not None:
            self._pipe_error = pump.exception()
        self._pipe_ended(fd)

    def _pipe_ended(self, fd: int) -> None:
        self._pipes.pop(fd, None)
        if not self._pipes and not self._pipes_done.done():
            self._pipes_done.set_result(None)

    def _stop_pipes(self) -> list[asyncio.Future[None]]:
        """Stop reading what is still open (closing the fds); returns the pumps cancelled."""
        cancelled = []
        for fd, pump in list(self._pipes.items()):
            if pump is None:
                self._watch.remove(fd)
                os.close(fd)
                self._pipe_ended(fd)
            elif not pump.done():
                pump.cancel()  # its own finally closes the fd
                cancelled.append(pump)
        return cancelled

    async def _pump(self, fd: int, kind: MsgType, chunk: bytes) -> None:
        """Hand on `chunk` and what follows it until EOF: whole lines in pieces of at most
        record_max_bytes, splitting only a line longer than that. Closes fd."""
        pending = b""
        cap = self.record_max_bytes
        emit = self.on_output
        grown = False
        try:
            while chunk:
                if not grown and len(chunk) == READ_CHUNK:
                    # A fast writer filled the pipe: 1 MiB deep where the kernel allows,
                    # it is drained in a tight loop instead of one event-loop round per
                    # 64 KiB. Only then: a quiet task keeps the default (and its memory).
                    grown = True
                    _grow_pipe(fd)
                data = pending + chunk if pending else chunk
                start = 0
                whole = data.rfind(b"\n") + 1  # end of the last complete line (0: none)
                while whole - start > cap:
                    cut = data.rfind(b"\n", start, start + cap) + 1
                    if cut <= start:  # one line longer than a record: split it
                        cut = start + _utf8_cut(data[start:start + cap + 1], cap)
                    await emit(kind, data[start:cut])
                    start = cut
                if whole > start:
                    await emit(kind, data[start:whole])
                    start = whole
                while len(data) - start >= cap:  # a partial line already longer than a record
                    cut = start + _utf8_cut(data[start:start + cap + 1], cap)
                    await emit(kind, data[start:cut])
                    start = cut
                pending = data[start:]
                while True:
                    try:
                        chunk = os.read(fd, READ_CHUNK)
                        break
                    except BlockingIOError:
                        # Watch the fd only while waiting: it stays readable while we are
                        # slowed by back-pressure, and a level-triggered watch would spin.
                        await _fd_ready(self._watch, fd)
            if pending:
                await emit(kind, pending)
        finally:
            os.close(fd)

    async def _feed_stdin(self) -> None:
        """Write task.stdin to the process and close it; a reader that goes away is fine."""
        assert self.stdin is not None
        fd, self._stdin_fd = self._stdin_fd, -1
        data = memoryview(self.stdin.encode("utf-8", "surrogateescape"))
        try:
            while data:
                try:
                    data = data[os.write(fd, data):]
                except BlockingIOError:
                    await _fd_ready(self._watch, fd, write=True)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            os.close(fd)

    async def _terminate(self, exited: asyncio.Future[None]) -> None:
        """SIGTERM the group, SIGKILL it after kill_grace if the leader still lives."""
        assert self.proc is not None
        pgid = self.proc.pid
        self._kill_signal = "SIGTERM"
        _killpg(pgid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self.kill_grace):
                await asyncio.shield(exited)
        except TimeoutError:
            self._kill_signal = "SIGKILL"
            _killpg(pgid, signal.SIGKILL)
            await exited

    async def wait(self) -> RunResult:
        """Stream output until the process group is done; return how it ended."""
        proc = self.proc
        assert proc is not None
        self._watch_pipes()
        feeder = asyncio.ensure_future(self._feed_stdin()) if self.stdin is not None else None
        # The leader's exit, not the pipes' EOF: a backgrounded grandchild can hold the pipes
        # open for ever.
        exited, release = _exit_future(proc, self._watch)
        try:
            await _first_of(exited, self._kill_requested, self.timeout)
            if not exited.done():
                if not self._kill_requested.done():
                    self._ending = Ending.TIMEOUT
                    self._kill_reason = f"timeout of {_fmt_seconds(self.timeout or 0)}"
                await self._terminate(exited)
            # The leader is gone. Leftovers holding the pipes get ORPHAN_GRACE, then the
            # group is killed; a member that left the group cannot keep the task open either.
            if self._pipes:
                await asyncio.wait([self._pipes_done], timeout=ORPHAN_GRACE)
            _killpg(proc.pid, signal.SIGKILL)
            if self._pipes:
                await asyncio.wait([self._pipes_done], timeout=ORPHAN_GRACE)
            stuck = self._stop_pipes()  # a member that left the group still holds a pipe
            if stuck:
                await asyncio.gather(*stuck, return_exceptions=True)
            elif self._pipe_error is not None:
                raise self._pipe_error
            if feeder is not None:
                await feeder
            await proc.reaped()  # at once: the pidfd said it exited
        finally:
            release()
            self._stop_pipes()
            for fut in (exited, *(f for f in (feeder,) if f)):
                if not fut.done():
                    fut.cancel()
            if proc.returncode is None:  # cancelled from outside: leave nothing running
                _killpg(proc.pid, signal.SIGKILL)
                await asyncio.shield(poll_until_reaped(proc))
            if self._stdin_fd >= 0:
                os.close(self._stdin_fd)
                self._stdin_fd = -1
            if self.guard is not None:
                self.guard.release(proc.pid)
        finished = time.time()
        returncode = proc.returncode
        assert returncode is not None
        return RunResult(
            ending=self._ending, returncode=returncode, started_at=self.started_at,
            finished_at=finished, duration=time.monotonic() - self._started_mono,
            kill_signal=self._kill_signal, kill_reason=self._kill_reason,
            usage=usage_of(proc.rusage),
        )


async def _first_of(a: asyncio.Future[None], b: asyncio.Future[None], timeout: float | None) -> None:
    """Return when a or b is done, or after timeout seconds (None: no limit). asyncio.wait
    for two futures, without its sets and copies: this is on every task's path."""
    if a.done() or b.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    a.add_done_callback(wake)
    b.add_done_callback(wake)
    timer = loop.call_later(timeout, wake) if timeout is not None else None
    try:
        await waiter
    finally:
        a.remove_done_callback(wake)
        b.remove_done_callback(wake)
        if timer is not None:
            timer.cancel()


class Child:
    """A spawned process: its pid, and its exit status once reaped (by us alone: nothing
    in the executor waits for any child)."""

    __slots__ = ("pid", "returncode", "rusage", "pidfd")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = -1  # given when someone else opened it (a spawner); else opened on use
        self.returncode: int | None = None
        # wait4's account of the process and the children it waited for (accounting).
        self.rusage: Any = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = rusage
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status, self.rusage = os.wait4(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    async def reaped(self) -> int:
        """The exit status once it has exited (its pidfd said so): reaped here, at once."""
        return self.wait()


def usage_of(rusage: Any) -> dict[str, float | int] | None:
    """The `usage` of a done record: CPU seconds (user, system) and peak RSS in bytes of the
    task's main process and the children it waited for."""
    if rusage is None:
        return None
    return {"cpu_user": round(rusage.ru_utime, 6), "cpu_system": round(rusage.ru_stime, 6),
            "max_rss": rusage.ru_maxrss * 1024}


_home = -1  # the executor's own working directory, to come back to after a spawn
_devnull = -1
_SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)  # ignored by the interpreter: default for tasks
_POSIX_SPAWN = hasattr(os, "posix_spawn") and hasattr(os, "POSIX_SPAWN_DUP2")


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a task runs as: a user, its primary group and its groups from the user database."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def spawn(argv: list[str], cwd: str, env: Mapping[str, str] | None,
          stdin: int, stdout: int, stderr: int, creds: Credentials | None = None) -> Child:
    """Start argv (argv[0] an absolute path) in its own session (its own process group), in
    cwd, with these fds as 0, 1 and 2. Raises OSError when the exec fails.

    os.posix_spawn (glibc: a vfork-style clone), for a fraction of subprocess.Popen's own
    cost. posix_spawn has no working-directory action Python can reach, so the executor
    steps into cwd for the call and back out: the event loop runs nothing in between (and
    posix_spawn keeps the GIL), and the executor's other threads use absolute paths only. Every fd the executor opens is
    close-on-exec (PEP 446), so the task inherits only 0, 1 and 2. Signals the interpreter
    ignores are reset to their defaults and none is blocked, as Popen does.
    """
    global _home, _devnull
    if _home < 0:
        _home = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if stdin == subprocess.DEVNULL:
        if _devnull < 0:
            _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        stdin = _devnull
    if min(stdin, stdout, stderr) <= 2 or not _POSIX_SPAWN or creds is not None:
        # A closed 0-2 reused by our pipes, or no posix_spawn with setsid: Popen sorts it out.
        # Another user too: the ids change in the child, after fork (see the note below).
        ids: dict[str, Any] = {} if creds is None else dict(
            user=creds.uid, group=creds.gid, extra_groups=list(creds.groups))
        proc = subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True,
                                stdin=stdin, stdout=stdout, stderr=stderr, **ids)
        proc.returncode = 0  # the Child reaps it: keep Popen's __del__ from tracking it
        return Child(proc.pid)
    os.chdir(cwd)
    try:
        pid = os.posix_spawn(
            argv[0], argv, os.environ if env is None else env,
            file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
                          (os.POSIX_SPAWN_DUP2, stderr, 2)],
            setsid=True, setsigdef=_SIGDEF, setsigmask=())
    finally:
        os.fchdir(_home)
    return Child(pid)


# Why another user's task is not started by posix_spawn with the executor's real ids switched
# to that user's for the call (POSIX_SPAWN_RESETIDS would then hand them to the child at no
# cost, measured at 1.01x throughput): while its real uid is the user's, any process of that
# user (a running task: the executor is its parent, its pid is getppid()) may signal the
# executor, SIGKILL included; a thread-local switch leaves the same door open through tgkill.
# Popen forks and changes the ids in the child, so the executor's own ids never change.



def _devnull_fd() -> int:
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull


def _exit_future(proc: Child, watcher: _Watcher | _LoopWatcher) -> tuple[asyncio.Future[None], Callable[[], None]]:
    """A future done when the process exits (pipes or not), and a release for its fd.

    A pidfd becomes readable at exit; where pidfds are missing, poll the process.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def mark() -> None:
        if not fut.done():
            fut.set_result(None)

    try:
        fd = proc.pidfd if proc.pidfd >= 0 else os.pidfd_open(proc.pid)
    except ProcessLookupError:
        mark()  # already exited and reaped
        return fut, lambda: None
    except (AttributeError, OSError):
        poller = asyncio.ensure_future(poll_until_reaped(proc))
        poller.add_done_callback(lambda _: mark())
        return fut, lambda: None if poller.cancel() else None
    watcher.add_reader(fd, mark)

    def release() -> None:
        watcher.remove(fd)
        os.close(fd)

    return fut, release


async def poll_until_reaped(proc: Child) -> None:
    """Wait for a process without a pidfd or a thread: poll it."""
    delay = 0.001
    while proc.poll() is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _fd_ready(watcher: _Watcher | _LoopWatcher, fd: int, *, write: bool = False) -> None:
    """Wait until fd is readable (or writable), watching it only for as long as we wait."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    (watcher.add_writer if write else watcher.add_reader)(fd, _resolve, ready)
    try:
        await ready
    finally:
        watcher.remove(fd)


class _Watcher:
    """Readiness of the runner's own fds (task pipes, pidfds) through an epoll set of its own,
    which the event loop watches as one fd. Registering an fd is one C call here, where the
    loop's selector spends about 10 microseconds of Python per add and remove, and a task
    has three of each. Level-triggered, like the loop's own readers; callbacks run in the
    loop, in the order epoll reports their fds."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # weak: the loop holds this watcher, not the reverse
        self._epoll = select.epoll()  # close-on-exec
        self._callbacks: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def add_reader(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self._add(fd, select.EPOLLIN, callback, args)

    def add_writer(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self._add(fd, select.EPOLLOUT, callback, args)

    def _add(self, fd: int, events: int, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        if fd in self._callbacks:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
        self._callbacks[fd] = (callback, args)

    def remove(self, fd: int) -> None:
        """Stop watching fd; call before closing it."""
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _dispatch(self) -> None:
        # An fd is never closed and reopened between this poll and its callback: callbacks
        # only read, close and schedule; new fds are opened by tasks, which run later.
        for fd, _ in self._epoll.poll(0):
            entry = self._callbacks.get(fd)
            if entry is None:
                continue  # removed by an earlier callback of this round
            try:
                entry[0](*entry[1])
            except Exception as exc:  # reported as the loop reports its own callbacks'
                loop = self._loop()
                if loop is not None:
                    loop.call_exception_handler(
                        {"message": "exception in a runner fd callback", "exception": exc})


class _LoopWatcher:
    """The same interface on the loop's own readers and writers, where epoll is missing."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._writers: set[int] = set()

    def add_reader(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        asyncio.get_running_loop().add_reader(fd, callback, *args)

    def add_writer(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        asyncio.get_running_loop().add_writer(fd, callback, *args)
        self._writers.add(fd)

    def remove(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        if fd in self._writers:
            self._writers.discard(fd)
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


_EPOLL = hasattr(select, "epoll")
_current: _Watcher | _LoopWatcher | None = None  # the last loop's: one loop runs in practice
_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watcher | _LoopWatcher] = \
    weakref.WeakKeyDictionary()


def _watcher() -> _Watcher | _LoopWatcher:
    """The running loop's watcher, made on first use; its epoll fd is closed with the loop."""
    global _current
    loop = asyncio.get_running_loop()
    watcher = _current
    if watcher is not None and watcher._loop() is loop:
        return watcher
    watcher = _watchers.get(loop)
    if watcher is None and not _EPOLL:
        watcher = _watchers[loop] = _LoopWatcher(loop)
    elif watcher is None:
        watcher = _watchers[loop] = epoll_watcher = _Watcher(loop)
        weakref.finalize(loop, epoll_watcher._epoll.close)
    _current = watcher
    return watcher


def _grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size, or not Linux: the default depth will do


def _utf8_cut(data: bytes, limit: int) -> int:
    """A cut at or below limit that does not split a UTF-8 sequence (if one is near)."""
    cut = min(limit, len(data) - 1)
    for _ in range(3):
        if cut > 0 and (data[cut] & 0xC0) == 0x80:
            cut -= 1
        else:
            break
    return cut if cut > 0 and (data[cut] & 0xC0) != 0x80 else limit


def _fmt_seconds(value: float) -> str:
    return f"{value:g}s"


# The guard: a small process that makes the process groups of running tasks die with the
# executor, however it dies (SIGKILL, OOM). It holds the read end of a pipe from the executor
# and a shared memory table (a memfd) of running groups, one slot per task slot; the executor
# fills and clears slots with plain memory writes, so a task costs no syscall and no wakeup.
# When the executor dies the pipe reaches EOF and the guard SIGKILLs every group in the table,
# the tasks' own children included. It ignores SIGINT/SIGTERM: only EOF ends it.
_GUARD_SOURCE = """
import mmap, os, signal, struct, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
table = int(sys.argv[1])
while os.read(0, 4096):
    pass
size = os.fstat(table).st_size
if size:
    for (pgid,) in struct.iter_unpack("q", mmap.mmap(table, size, access=mmap.ACCESS_READ)):
        if pgid > 0:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
"""


class Guard:
    """Makes the process groups of running tasks die with the executor (see _GUARD_SOURCE)."""

    SLOT = struct.Struct("q")

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipe = -1
        self._table_fd = -1
        self._table: mmap.mmap | None = None
        self._slot_of: dict[int, int] = {}
        self._free: list[int] = []
        self._watch_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        if self._table is None:
            self._table_fd = os.memfd_create("task-job-guard", os.MFD_CLOEXEC)
            os.ftruncate(self._table_fd, self.slots * self.SLOT.size)
            self._table = mmap.mmap(self._table_fd, self.slots * self.SLOT.size)
            self._free = list(range(self.slots - 1, -1, -1))
        read_end, self._pipe = os.pipe2(os.O_CLOEXEC)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _GUARD_SOURCE, str(self._table_fd)],
                stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True,
                pass_fds=(self._table_fd,))
        finally:
            os.close(read_end)
        try:  # if the guard dies, start another one (it reads the same table)
            self._loop = asyncio.get_running_loop()
            self._watch_fd = os.pidfd_open(self._proc.pid)
            self._loop.add_reader(self._watch_fd, self._restart)
        except (AttributeError, OSError, RuntimeError):  # no pidfd, or no loop (tests)
            self._watch_fd = -1

    def watch(self, pgid: int) -> None:
        if self._table is None:
            return
        if not self._free:  # more groups than slots: grow the table (the guard reads its size)
            old = self.slots
            self.slots *= 2
            os.ftruncate(self._table_fd, self.slots * self.SLOT.size)
            self._table.resize(self.slots * self.SLOT.size)
            self._free = list(range(self.slots - 1, old - 1, -1))
        slot = self._free.pop()
        self._slot_of[pgid] = slot
        self.SLOT.pack_into(self._table, slot * self.SLOT.size, pgid)

    def release(self, pgid: int) -> None:
        slot = self._slot_of.pop(pgid, None)
        if slot is not None and self._table is not None:
            self.SLOT.pack_into(self._table, slot * self.SLOT.size, 0)
            self._free.append(slot)

    def _restart(self) -> None:
        _log.warning("task guard exited: starting a new one",
                     extra={"returncode": self._proc.poll() if self._proc else None})
        self._stop_guard()
        self.start()

    def _stop_guard(self, timeout: float = 5.0) -> None:
        if self._watch_fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._watch_fd)
            os.close(self._watch_fd)
            self._watch_fd = -1
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """End the guard: on EOF it kills what is still in the table (normally nothing)."""
        self._stop_guard()
        if self._table is not None:
            self._table.close()
            os.close(self._table_fd)
            self._table = None
