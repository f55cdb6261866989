"""Who tasks run as: `run_as`, `task.user` within `allowed_users`, looked up in the user
database once per user. Pure but for that lookup."""

from __future__ import annotations

import os
import pwd

from task_job.errors import ConfigError, ConfinementError
from task_job.runner import Credentials


def lookup(user: str) -> Credentials:
    """A user's uid, primary gid, supplementary groups (from the group database) and home."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfinementError(f"user {user!r} is not in the user database") from None
    groups = tuple(sorted({entry.pw_gid, *os.getgrouplist(user, entry.pw_gid)}))
    return Credentials(user, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def check_run_as(run_as: str, euid: int) -> None:
    """At start-up: only root can run tasks as another user. One line naming the fix."""
    if not run_as:
        return
    try:
        uid = pwd.getpwnam(run_as).pw_uid
    except KeyError:
        raise ConfigError(f"run_as: user {run_as!r} is not in the user database") from None
    if euid != 0 and uid != euid:
        raise ConfigError(f"run_as: running tasks as {run_as!r} needs the executor to run as "
                          f"root (it runs as uid {euid})")


class Users:
    """The credentials a task runs with: task.user if allowed, else run_as, else None (the
    executor's own). Lookups are kept for the executor's life (a changed user database is
    read again at the next start)."""

    def __init__(self, run_as: str, allowed: tuple[str, ...]) -> None:
        self.run_as = run_as
        self.allowed = frozenset(allowed) | ({run_as} if run_as else set())
        self._known: dict[str, Credentials] = {}

    def for_task(self, user: str | None) -> Credentials | None:
        if user is not None and user not in self.allowed:
            raise ConfinementError(f"task.user {user!r} is not in allowed_users")
        name = user or self.run_as
        if not name:
            return None
        creds = self._known.get(name)
        if creds is None:
            creds = self._known[name] = lookup(name)
        if creds.uid == os.geteuid():
            return None  # already that user: nothing to change
        if os.geteuid() != 0:
            raise ConfinementError(f"task.user {name!r} needs the executor to run as root")
        return creds
