"""Fast spawning as another user: a small spawner process per `run_as` user, running entirely
as that user, starts tasks with posix_spawn (vfork speed) on the executor's behalf and reports
each one's exit status and usage. No Redis, no task logic.

Why a process: the executor cannot take the user's ids itself, even for a moment, without
letting that user's processes signal it (docs/security.md). The spawner holds nothing a task
of its user could not have anyway, and the executor checks what it reports (the pid must be a
process of that user). Its tasks' orphans go to the executor, their subreaper.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import orjson

from task_job.runner import Child, Credentials, poll_until_reaped

log = logging.getLogger(__name__)

# The spawner: a batch of requests [[argv, env, cwd], ...] with fds 0-2 of each as SCM_RIGHTS
# -> a list of answers in the same order, ["spawned", pid] (its pidfd among the message's fds,
# in order) or ["error", errno, text]; children's ends, as many as have happened ->
# ["exit", [[pid, status, user s, system s, max rss KiB], ...]]. Exits when the executor's
# end of the socket closes. Ends are found by wait4(-1) when SIGCHLD's wakeup byte arrives
# (one call for a batch, no poll registration per child); requests land in one buffer.
_SPAWNER_SOURCE = r"""
import array, ctypes, json, os, select, signal, socket, sys
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: its user's tasks cannot ptrace it
sock = socket.socket(fileno=int(sys.argv[1]))
SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)
FDS = socket.CMSG_SPACE(3 * int(sys.argv[2]) * array.array("i").itemsize)
RIGHTS = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
signal.signal(signal.SIGCHLD, lambda *_: None)
buf = bytearray(int(sys.argv[3]))
poll = select.poll()
poll.register(sock.fileno(), select.POLLIN)
poll.register(wake_r, select.POLLIN)
def reap():
    ends = []
    while True:
        try:
            pid, status, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if not pid:
            break
        ends.append("[%d,%d,%r,%r,%d]" % (pid, status, ru.ru_utime, ru.ru_stime, ru.ru_maxrss))
    if ends:
        sock.send(('["exit",[' + ",".join(ends) + "]]").encode())
while True:
    for fd, _ in poll.poll():
        if fd == wake_r:
            while True:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    break
            reap()
            continue
        n, anc, _, _ = sock.recvmsg_into([buf], FDS)
        if not n:
            sys.exit(0)
        fds = array.array("i")
        for level, kind, payload in anc:
            if (level, kind) == RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        answers, pidfds = [], array.array("i")
        for i, (argv, env, cwd) in enumerate(json.loads(buf[:n])):
            try:
                os.chdir(cwd)
                pid = os.posix_spawn(argv[0], argv, env, file_actions=[
                    (os.POSIX_SPAWN_DUP2, fds[3 * i], 0), (os.POSIX_SPAWN_DUP2, fds[3 * i + 1], 1),
                    (os.POSIX_SPAWN_DUP2, fds[3 * i + 2], 2)], setsid=True, setsigdef=SIGDEF,
                    setsigmask=())
            except OSError as exc:
                answers.append(json.dumps(["error", exc.errno or 0, exc.strerror or str(exc)]))
            else:
                answers.append('["spawned",%d]' % pid)
                pidfds.append(os.pidfd_open(pid))  # a zombie at worst: not reaped before this
        for f in fds:
            os.close(f)
        sock.sendmsg([("[" + ",".join(answers) + "]").encode()], [(*RIGHTS, pidfds)] if pidfds else [])
        for f in pidfds:
            os.close(f)
"""
# SCM_RIGHTS carries at most 253 fds: 3 per request. A batch stays well below the socket's
# send buffer too (a message that does not fit fails whole, with EMSGSIZE).
MAX_BATCH = 32
BATCH_BYTES = 64 * 1024
# A request bigger than this (arguments and environment: the exec's own limit is about 2 MiB
# on most hosts) is refused before it is sent; the socket's buffer is sized to carry it.
REQUEST_MAX = 4 << 20

REPLY_WAIT = 0.05  # seconds a spawn waits for its answer in place before awaiting it
REPLY_TIMEOUT = 10.0  # seconds before a spawner that does not answer is replaced


class RemoteChild(Child):
    """A task the spawner started: its exit status and usage arrive from the spawner."""

    __slots__ = ("_done",)

    def __init__(self, pid: int, pidfd: int) -> None:
        super().__init__(pid)
        self.pidfd = pidfd  # from the spawner, opened before the pid could be reused
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ended(self, returncode: int, rusage: Any) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self.rusage = rusage
        if not self._done.done():
            self._done.set_result(None)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        raise RuntimeError("a remote child is waited for with `await reaped()`")

    async def reaped(self) -> int:
        await self._done
        assert self.returncode is not None
        return self.returncode


class _Usage:
    __slots__ = ("ru_utime", "ru_stime", "ru_maxrss")

    def __init__(self, utime: float, stime: float, maxrss: int) -> None:
        self.ru_utime, self.ru_stime, self.ru_maxrss = utime, stime, maxrss


class Spawner:
    """The spawner process of one user, started at the first spawn and again if it dies."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._batch: list[tuple[bytes, tuple[int, int, int], asyncio.Future[RemoteChild | list[Any]]]] = []
        self._batch_bytes = 0
        self._replies: list[list[asyncio.Future[RemoteChild | list[Any]]]] = []  # per batch sent
        self._children: dict[int, RemoteChild] = {}

    def _start(self) -> None:
        python = interpreter_for(self.creds)
        if python is None:
            raise OSError(0, f"no python that {self.creds.user} may run for its spawner")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [python, "-I", "-S", "-c", _SPAWNER_SOURCE, str(theirs.fileno()), str(MAX_BATCH),
                 str(REQUEST_MAX + BATCH_BYTES)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/", env={},
                user=self.creds.uid, group=self.creds.gid, extra_groups=list(self.creds.groups),
                start_new_session=True)
        finally:
            theirs.close()
        for option in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:  # a request must fit in one message; root may exceed net.core.wmem_max
                ours.setsockopt(socket.SOL_SOCKET, option, REQUEST_MAX + BATCH_BYTES)
                break
            except OSError:
                continue
        ours.setblocking(False)
        self._sock = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable)

    async def spawn(self, argv: list[str], cwd: str, env: dict[str, str],
                    stdin: int, stdout: int, stderr: int) -> RemoteChild:
        """Start a task through the spawner. Requests made in one turn of the event loop go
        in one message, answered by one: a turn that frees several slots wakes the spawner
        once (each wake-up costs more here than a spawn). The fds stay open until sent."""
        if self._sock is None:
            self._start()
        request = orjson.dumps([argv, env, cwd])
        if len(request) > REQUEST_MAX:
            raise OSError(errno.E2BIG, f"arguments and environment of {len(request)} bytes are "
                          f"too big to start as {self.creds.user} (at most {REQUEST_MAX})")
        if self._batch and (len(self._batch) >= MAX_BATCH or
                            self._batch_bytes + len(request) > BATCH_BYTES):
            self._flush()
        reply: asyncio.Future[RemoteChild | list[Any]] = asyncio.get_running_loop().create_future()
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append((request, (stdin, stdout, stderr), reply))
        self._batch_bytes += len(request)
        try:
            # A spawner stopped by one of its user's tasks (SIGSTOP) must not hold slots.
            answer = await asyncio.wait_for(asyncio.shield(reply), REPLY_TIMEOUT)
        except TimeoutError:
            log.error("the spawner of a run_as user did not answer; starting another",
                      extra={"user": self.creds.user})
            if self._proc is not None:
                self._proc.kill()
            self._lost()
            answer = await reply
        if not isinstance(answer, RemoteChild):
            raise OSError(answer[1] or None, answer[2])
        if not self._is_theirs(answer.pid):  # never act as root on a pid it made up
            self._children.pop(answer.pid, None)
            if answer.pidfd >= 0:
                os.close(answer.pidfd)
            raise OSError(0, f"the spawner of {self.creds.user} named a process not its own")
        return answer

    def _flush(self) -> None:
        """Send the batch, then wait for its answer in place, as the executor's own
        posix_spawn blocks for the exec: the event loop then handles the events that piled up
        in few turns (awaiting it instead made 18x the loop turns and cost more than the
        spawn itself). Answers come in order and are matched to requests by position."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch:
            return
        replies = [reply for _, _, reply in batch]
        if self._sock is None:
            for reply in replies:
                reply.set_result(["error", 0, "the spawner exited"])
            return
        fds = array.array("i", [fd for _, three, _ in batch for fd in three])
        try:
            self._sock.sendmsg([b"[" + b",".join(request for request, _, _ in batch) + b"]"],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:  # EMSGSIZE for a request too big to send, or a dead spawner
            for reply in replies:
                reply.set_result(["error", exc.errno or 0, f"the spawner: {exc.strerror or exc}"])
            return
        self._replies.append(replies)
        deadline = time.monotonic() + REPLY_WAIT
        while not replies[-1].done() and self._sock is not None and \
                (left := deadline - time.monotonic()) > 0:
            if select.select([self._sock], [], [], left)[0]:
                self._readable()

    def _is_theirs(self, pid: int) -> bool:
        """The process's real, effective, saved and file uids are all the user's (its
        /proc/<pid>/status; the owner of /proc/<pid> is root's while it is not dumpable)."""
        try:
            fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                status = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError:
            return True  # already gone (a fast exit): nothing to act on but its status
        start = status.find(b"\nUid:")
        if start < 0:
            return False
        return all(int(u) == self.creds.uid for u in status[start + 5:status.index(b"\n", start + 1)].split())

    def _readable(self) -> None:
        """Every message waiting (under load, several per wake-up)."""
        while self._sock is not None and self._receive():
            pass

    def _receive(self) -> bool:
        assert self._sock is not None
        fds = array.array("i")
        try:
            data, anc, _, _ = self._sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_BATCH * fds.itemsize))
        except BlockingIOError:
            return False
        except OSError:
            data, anc = b"", []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not data:
            self._lost()
            return False
        msg = orjson.loads(data)
        if msg and msg[0] == "exit":
            for pid, status, utime, stime, maxrss in msg[1]:
                child = self._children.pop(int(pid), None)
                if child is not None:
                    child.ended(os.waitstatus_to_exitcode(int(status)),
                                _Usage(float(utime), float(stime), int(maxrss)))
            return True
        pidfds = iter(fds)
        replies = self._replies.pop(0) if self._replies else []
        for reply, answer in zip(replies, msg, strict=False):
            if answer[0] == "spawned":
                # Known from this moment: its exit may be the very next message.
                child = RemoteChild(int(answer[1]), next(pidfds, -1))
                self._children[child.pid] = child
                reply.set_result(child)
            else:
                reply.set_result(answer)
        for reply in replies[len(msg):]:  # cannot happen with our spawner; never hang on it
            reply.set_result(["error", 0, "the spawner gave no answer"])
        for fd in pidfds:
            os.close(fd)
        return True

    def _lost(self) -> None:
        """The spawner died (a task of its user may kill it): its tasks are now the executor's
        children (their subreaper) and are waited for directly; the next spawn starts a new
        spawner."""
        log.warning("the spawner of a run_as user exited; tasks it started are waited for "
                    "directly", extra={"user": self.creds.user})
        self.close()
        for replies in self._replies:
            for reply in replies:
                if not reply.done():
                    reply.set_result(["error", 0, "the spawner exited"])
        self._replies.clear()
        for child in list(self._children.values()):
            asyncio.ensure_future(_adopt(child))
        self._children.clear()

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _may_run(path: str, creds: Credentials) -> bool:
    """Whether `creds` may execute `path`: every directory on the way searchable by it, the
    file executable by it (by mode bits; the path and its real path both)."""
    def allowed(st: os.stat_result, bit: int) -> bool:
        if st.st_uid == creds.uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in creds.groups or st.st_gid == creds.gid:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    for candidate in (os.path.abspath(path), os.path.realpath(path)):
        parts = candidate.split("/")
        try:
            for i in range(1, len(parts) - 1):
                if not allowed(os.stat("/".join(parts[:i + 1]) or "/"), 0o1):
                    return False
            if not allowed(os.stat(candidate), 0o1):
                return False
        except OSError:
            return False
    return True


def interpreter_for(creds: Credentials) -> str | None:
    """A Python that the user may run (the spawner needs the standard library only): this
    one, or the system's (this one may live where the user cannot reach, e.g. under /root)."""
    for path in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if path and _may_run(path, creds):
            return path
    return None


async def _adopt(child: RemoteChild) -> None:
    """Wait for a task whose spawner died: it was re-parented to the executor, its
    subreaper, and is waited for as the executor's own children are (polled)."""
    own = Child(child.pid)
    try:
        await poll_until_reaped(own)
    except ChildProcessError:  # reaped by someone else: its status is lost
        own.returncode = own.returncode if own.returncode is not None else 0
    assert own.returncode is not None
    child.ended(own.returncode, own.rusage)
