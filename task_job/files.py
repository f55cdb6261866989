"""Per-task log files: <log_dir>/<YYYY-MM-DD>/<id>.log (the output as the task wrote it) and
<id>.json (its done record); date folders older than log_retention_days are removed.

Blocking file work; the executor calls it through asyncio.to_thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_DATE_DIR = re.compile(r"\d{4}-\d{2}-\d{2}")


def _safe(task_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@:-]", "_", task_id).lstrip(".") or "_"


class TaskLogFile:
    """The files of one task, opened when it starts."""

    def __init__(self, log_dir: str, task_id: str, started: float) -> None:
        day = dt.datetime.fromtimestamp(started).strftime("%Y-%m-%d")
        folder = Path(log_dir) / day
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{_safe(task_id)}.log"
        self.done_path = folder / f"{_safe(task_id)}.json"
        self._file: BinaryIO | None = open(self.path, "ab")  # noqa: SIM115 - closed in finish

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)

    def finish(self, done_record: bytes | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if done_record is not None:
            self.done_path.write_bytes(done_record)


def prune(log_dir: str, keep_days: int, today: dt.date | None = None) -> int:
    """Remove date folders older than keep_days; returns how many went."""
    root = Path(log_dir)
    if not root.is_dir():
        return 0
    cutoff = (today or dt.date.today()) - dt.timedelta(days=keep_days)
    removed = 0
    for folder in root.iterdir():
        if folder.is_dir() and _DATE_DIR.fullmatch(folder.name):
            if dt.date.fromisoformat(folder.name) < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    if removed:
        log.info("old task logs removed", extra={"folders": removed, "log_dir": log_dir})
    return removed
