"""The on-disk spool: records and settling operations that Redis could not take yet, kept in
order in an append-only file under state_dir and replayed when Redis is back.

Owns the file format and its locking; knows nothing of what the operations mean. Every
operation written here is idempotent, so replaying from the last saved offset is safe.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

# One frame: 4-byte big-endian length, then JSON [kind, name, keys, args].
_HEADER = struct.Struct(">I")
Call = tuple[str, str, list[str], list[Any]]  # ("script", name, keys, args) or ("cmd", "", [], args)
SPILL_RETRY = 1.0  # seconds between attempts to spool to a disk that refused (both sinks)


def _encode_arg(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode("ascii")}
    return value


def _decode_arg(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["b"])
    return value


def encode(call: Call) -> bytes:
    kind, name, keys, args = call
    body = orjson.dumps([kind, name, keys, [_encode_arg(a) for a in args]])
    return _HEADER.pack(len(body)) + body


def spool_name(executor: str, suffix: str = ".spool") -> str:
    """File name of an executor's spool: Redis operations `.spool`, HTTP records `.httpspool`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", executor) + suffix


class SpoolFile:
    """One executor's spool: append at the end, read from the saved offset. Blocking I/O:
    call it through asyncio.to_thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_path = path.with_suffix(".offset")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.locked = _try_lock(self._fd)
        # Never past the end: a spool cut short below its saved offset has nothing pending.
        self.read_offset = min(self._saved_offset(), self.size)

    def _saved_offset(self) -> int:
        try:
            return max(0, int(self.offset_path.read_text()))
        except (OSError, ValueError):
            return 0

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    @property
    def pending(self) -> int:
        return self.size - self.read_offset

    def append(self, calls: list[Call]) -> None:
        """Append whole frames, or nothing: a failed or short write (a full or read-only
        disk) is cut back off before the error is raised, so no torn frame is left behind."""
        data = b"".join(encode(c) for c in calls)
        start = self.size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass  # the torn tail is set aside when the spool is read back
            raise

    def read(self, max_bytes: int) -> tuple[list[Call], int]:
        """Calls from the read offset, about max_bytes of them, and the offset after them.

        A frame that is cut short or does not decode (a crash mid-write, a damaged disk)
        ends what can be replayed: the rest of the file is set aside beside the spool
        (`.torn-<offset>`), logged, and the spool cut to what was whole."""
        calls: list[Call] = []
        offset = self.read_offset
        end = self.size
        torn = False
        with open(self.path, "rb") as f:
            f.seek(offset)
            while offset < end and (not calls or offset - self.read_offset < max_bytes):
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    torn = True
                    break
                (length,) = _HEADER.unpack(header)
                body = f.read(length) if length <= end - offset - _HEADER.size else b""
                if len(body) < length or not length:
                    torn = True
                    break
                try:
                    kind, name, keys, args = orjson.loads(body)
                    call = (str(kind), str(name), list(keys), [_decode_arg(a) for a in args])
                except (ValueError, TypeError, KeyError, binascii.Error):
                    torn = True
                    break
                calls.append(call)
                offset += _HEADER.size + length
        if torn:
            self._set_aside(offset, end)
        return calls, offset

    def _set_aside(self, offset: int, end: int) -> None:
        aside = self.path.with_name(f"{self.path.name}.torn-{offset}")
        try:
            with open(self.path, "rb") as src, open(aside, "wb") as dst:
                src.seek(offset)
                shutil.copyfileobj(src, dst)
        except OSError as exc:
            log.error("cannot keep the torn end of a spool", extra={"spool": str(self.path),
                                                                   "error": repr(exc)})
        os.ftruncate(self._fd, offset)
        log.error("spool ends in a torn or damaged frame: replaying what is whole, the rest set aside",
                  extra={"spool": str(self.path), "offset": offset, "bytes": end - offset,
                         "set_aside": str(aside)})

    def commit(self, offset: int) -> None:
        """Remember that everything before offset is delivered."""
        self.read_offset = offset
        tmp = self.offset_path.with_suffix(".offset.tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.offset_path)

    def remove(self) -> None:
        """Delete the spool (everything in it is delivered) and close it."""
        for path in (self.path, self.offset_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)

    def remove_if_empty(self) -> None:
        """Close; delete too if nothing is left to deliver."""
        if self.pending == 0:
            self.remove()
        else:
            os.close(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def leftover_spools(directory: Path, suffix: str = ".spool") -> Iterator[Path]:
    """Spool files of earlier runs, oldest first (the caller skips those still locked)."""
    if not directory.is_dir():
        return
    yield from sorted(directory.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime)
