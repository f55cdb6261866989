"""Per-task log files: <log_dir>/<YYYY-MM-DD>/<id>.log (the output as the task wrote it) and
<id>.json (its done record); date folders older than log_retention_days are removed.

Blocking file work; the executor calls it through asyncio.to_thread.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_DATE_DIR = re.compile(r"\d{4}-\d{2}-\d{2}")


_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
NAMESPACE_RULE = "1-100 letters, digits, '_', '.', '-', not a date (it is a folder name beside the date folders)"


def is_namespace(name: str) -> bool:
    """Whether a name may be a namespace folder of labelled tasks' files: a plain name that
    prune() cannot take for a date folder."""
    return bool(_NAMESPACE.fullmatch(name)) and not _DATE_DIR.fullmatch(name)


_UNSAFE = re.compile(rb"[^A-Za-z0-9_.@:-]|^\.")
STEM_MAX = 200  # + ".json": well within NAME_MAX (255)


def file_stem(task_id: str) -> str:
    """An injective file name for a task id, within NAME_MAX: bytes outside [A-Za-z0-9_.@:-]
    (and a leading dot) are %-escaped, '%' included, so two ids never share a name; a name
    that would be longer than STEM_MAX is cut and ends with '~' and a digest of the id ('~'
    never appears unescaped otherwise)."""
    raw = task_id.encode("utf-8", "surrogatepass")
    stem = _UNSAFE.sub(lambda m: b"".join(b"%%%02X" % c for c in m.group()), raw).decode("ascii")
    return _within_max(stem, raw)


def shared_label_stem(label: str, task_id: str) -> str:
    """The file name of a task whose label another task already has (that day): the label's
    stem, '+', the id's stem ('+' is always escaped inside a stem, so this never collides with
    a label's own name or another pair); cut with a digest of both past STEM_MAX."""
    return _within_max(f"{file_stem(label)}+{file_stem(task_id)}",
                       label.encode("utf-8", "surrogatepass") + b"\0" + task_id.encode("utf-8", "surrogatepass"))


def _within_max(stem: str, source: bytes) -> str:
    """`stem`, or past STEM_MAX its first 100 characters (not cut inside an escape), '~' and a
    digest of `source` (what the stem was made from)."""
    if len(stem) <= STEM_MAX:
        return stem
    head = stem[:100]
    cut = head.rfind("%", len(head) - 2)
    if cut >= 0:
        head = head[:cut]  # not in the middle of an escape
    return f"{head}~{hashlib.sha256(source).hexdigest()[:40]}"


class DiskErrors:
    """Counts file errors of one kind and logs once per change of state (failing <-> fine),
    so a full disk neither floods the log nor goes unnoticed."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.failing = False

    def failed(self, exc: OSError, path: object = None) -> None:
        self.count += 1
        if not self.failing:
            self.failing = True
            log.error(f"cannot write {self.what}; going on without", extra={
                "error": os.strerror(exc.errno) if exc.errno else repr(exc), "path": str(path),
                "errno": errno.errorcode.get(exc.errno or 0, "")})

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            log.warning(f"{self.what} writable again", extra={"failures": self.count})


LOG_FILE_ERRORS = DiskErrors("task log files")


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written; a short write is retried, an error raised."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class TaskLogFile:
    """The files of one task, opened when it starts. A file error (a full or read-only disk,
    a permission) never reaches the task: it is counted and logged, the task runs on."""

    def __init__(self, log_dir: str, task_id: str, started: float,
                 errors: DiskErrors = LOG_FILE_ERRORS, *, label: str | None = None,
                 namespace: str = "default") -> None:
        day = dt.datetime.fromtimestamp(started).strftime("%Y-%m-%d")
        # pueue-NATS' layout for a labelled task: <namespace>/<date>/<label>.log
        folder = Path(log_dir) / day if label is None else Path(log_dir) / namespace / day
        stem = file_stem(task_id if label is None else label)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self.errors = errors
        self._fd = -1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if label is not None:
                try:  # the label's own name, if no other task has it today
                    self._fd = os.open(folder / f"{stem}.log", flags | os.O_EXCL, 0o640)
                except FileExistsError:
                    stem = shared_label_stem(label, task_id)
            if self._fd < 0:
                self._fd = os.open(folder / f"{stem}.log", flags, 0o640)
        except OSError as exc:
            errors.failed(exc, folder / f"{stem}.log")
        self.path = folder / f"{stem}.log"
        self.done_path = folder / f"{stem}.json"

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            return
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self.errors.failed(exc, self.path)
            self._close()  # the rest of this task's output is not written (it stays in Redis)

    def _close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError as exc:  # e.g. EIO/ENOSPC reported at close on some filesystems
                self.errors.failed(exc, self.path)
            self._fd = -1

    def finish(self, done_record: bytes | None) -> None:
        wrote = self._fd >= 0
        self._close()
        if done_record is None:
            return
        try:
            fd = os.open(self.done_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                _write_all(fd, done_record)
            finally:
                os.close(fd)
        except OSError as exc:
            self.errors.failed(exc, self.done_path)
            return
        if wrote:
            self.errors.ok()


def prune(log_dir: str, keep_days: int, today: dt.date | None = None) -> int:
    """Remove date folders older than keep_days; returns how many went."""
    root = Path(log_dir)
    if not root.is_dir():
        return 0
    cutoff = (today or dt.date.today()) - dt.timedelta(days=keep_days)
    removed = 0
    # Date folders at the top, and inside namespace folders (labelled tasks' layout).
    folders = [f for f in root.iterdir() if f.is_dir()]
    folders += [f for ns in folders if not _DATE_DIR.fullmatch(ns.name) for f in ns.iterdir() if f.is_dir()]
    for folder in folders:
        if _DATE_DIR.fullmatch(folder.name):
            try:
                old = dt.date.fromisoformat(folder.name) < cutoff
            except ValueError:  # 2024-13-45: not a date folder of ours
                continue
            if old:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    if removed:
        log.info("old task logs removed", extra={"folders": removed, "log_dir": log_dir})
    return removed
