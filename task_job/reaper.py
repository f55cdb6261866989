"""Nothing outlives its task: the executor is a child subreaper, so a task's descendants that
leave its process group (`setsid`, a double fork) become the executor's children when their
parent dies; a sweep kills those of finished tasks. No Redis, no task logic.

Each task's environment carries `TASK_JOB_RUN=<token>`; a process the executor inherits is
attributed to its task by that variable (/proc/<pid>/environ). One that cleared its
environment cannot be attributed and is left alone (docs/security.md); cgroups close that.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

MARKER = "TASK_JOB_RUN"
PR_SET_CHILD_SUBREAPER = 36
SWEEP_INTERVAL = 0.5  # seconds between sweeps: how long a finished task's orphans may live
SETTLE = 3.0  # seconds of sweeps after a task ends or an orphan is killed


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux 3.4+)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def children_of(pid: int | str) -> list[int]:
    """A process's children, all its threads' (/proc/<pid>/task/*/children); [] when gone.
    Orphans re-parented to a subreaper are listed under it too."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return found


def tree(root: int) -> Iterator[int]:
    """The live processes of root's tree, root first, walked down through children_of (no
    scan of every process on the host)."""
    stack = [root]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.add(pid)
        yield pid
        stack.extend(children_of(pid))


def _marker_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    key = MARKER.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key):].decode("ascii", "replace")
    return None


class Reaper:
    """Sweeps the executor's inherited children: a process marked with the token of a task
    that has ended is killed (its whole group), and reaped; one of a running task is handed to
    the guard so that it dies with the executor too."""

    def __init__(self, prefix: str, running: Callable[[], set[str]],
                 task_pids: Callable[[], set[int]], guard: Any = None) -> None:
        self.prefix = prefix  # of this executor's tokens: another one in the process has its own
        self.running = running  # tokens of the tasks running now
        self.task_pids = task_pids  # pids the runner spawned and reaps itself
        self.guard = guard  # runner.Guard: inherited groups of running tasks die with us too
        self.enabled = False
        self._adopted: dict[int, str] = {}  # inherited pid -> token
        self._guarded: dict[int, int] = {}  # inherited pid -> the group the guard watches
        self._quiet_after = 0.0

    def start(self) -> None:
        self.enabled = become_subreaper()
        if not self.enabled:
            log.warning("cannot become a child subreaper: a task's setsid children may outlive it")

    def stop(self) -> None:
        """Kill what is left of finished tasks. The process stays a subreaper: another
        executor in it may still rely on that (the flag is the process's, not ours)."""
        self.sweep()

    def task_ended(self) -> None:
        """A task ended: its orphans appear now (when its group is killed); sweep a while."""
        self._quiet_after = time.monotonic() + SETTLE

    async def loop(self) -> None:
        """Sweep while tasks run and for a few seconds after one ends; an idle executor reads
        nothing."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            if not self._adopted and time.monotonic() > self._quiet_after and not self.running():
                continue
            try:
                if self.sweep():
                    self.task_ended()  # what it killed may leave orphans of its own
            except Exception:  # a bug must not stop the sweep
                log.exception("reaper sweep failed")

    def sweep(self) -> int:
        """Kill and reap what finished tasks left behind; returns how many were killed."""
        if not self.enabled:
            return 0
        running = self.running()
        known = self.task_pids()
        killed = 0
        for pid in set(children_of("self")) - known:
            token = self._adopted.get(pid) or _marker_of(pid)
            if token is None or not token.startswith(self.prefix):
                continue  # not a task's of ours (the guard, another executor in this process)
            self._adopted[pid] = token
            if token in running:
                if self.guard is not None and pid not in self._guarded:
                    try:
                        pgid = os.getpgid(pid)
                    except ProcessLookupError:
                        continue
                    if pgid != os.getpgrp() and pgid not in known:  # a task's own group is watched
                        self._guarded[pid] = pgid
                        self.guard.watch(pgid)
                continue
            killed += self._kill(pid)
        self._reap()
        return killed

    def _kill(self, pid: int) -> int:
        """SIGKILL the inherited process's group (it left its task's group by setsid), or the
        process alone where that group is the executor's own."""
        try:
            pgid = os.getpgid(pid)
            if pgid != os.getpgrp():
                os.killpg(pgid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            return 1
        except (ProcessLookupError, PermissionError):
            return 0

    def _reap(self) -> None:
        for pid in list(self._adopted):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                del self._adopted[pid]
                pgid = self._guarded.pop(pid, None)
                if pgid is not None and self.guard is not None:
                    self.guard.release(pgid)
