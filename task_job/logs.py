"""Structured JSON logging for the executor and the CLI (python-json-logger).

One line per event; fields task_id, executor, status, exit_code, duration_s. Never secrets.
"""

from __future__ import annotations

import logging
import os
import sys

from pythonjsonlogger.json import JsonFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(level: str = "info", log_dir: str = "", to_stderr: bool = True) -> None:
    """JSON lines to stderr and/or to <log_dir>/task-job.log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = JsonFormatter(FORMAT, rename_fields={"levelname": "level", "asctime": "time"})
    handlers: list[logging.Handler] = []
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(log_dir, "task-job.log")))
    if to_stderr or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("asyncio").setLevel(logging.WARNING)
