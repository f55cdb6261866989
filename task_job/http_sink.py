"""The HTTP sink (`logs_http`): records POSTed as JSON arrays, batched by size and linger,
retried with back-off, spooled to disk while the receiver is away.

Receives records already built (and seq-numbered) by the Redis sink, in order; imports aiohttp
only when configured. A 4xx answer (other than 429) dead-letters the batch to a file.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from task_job.config import redact_url
from task_job.files import DiskErrors
from task_job.spool import SPILL_RETRY, Call, SpoolFile, leftover_spools, spool_name

log = logging.getLogger(__name__)

RETRY_CAP = 10.0
HTTP_SUFFIX = ".httpspool"


class HttpRejected(Exception):
    """The receiver refused a batch for good (4xx other than 429)."""


class HttpSink:
    """POSTs records in order; bounded by buffer_bytes, then spooled under spool_dir."""

    def __init__(self, url: str, *, executor: str, buffer_bytes: int, batch_bytes: int,
                 linger: float, timeout: float, headers: dict[str, str], state_dir: Path) -> None:
        self.url = url
        self.executor = executor
        self.buffer_bytes = buffer_bytes
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **headers}
        self.spool_dir = state_dir / "spool"
        self.dead_dir = state_dir / "http-dead"
        self._records: list[bytes] = []
        self._buffered = 0
        self._wakeup = asyncio.Event()
        self._space = asyncio.Event()
        self._pressure = asyncio.Event()
        self._idle = asyncio.Event()
        self._closing = False
        self._spool: SpoolFile | None = None
        self._disk_errors = DiskErrors("the http spool")
        self._lost_at_close = 0
        self._spool_active = False
        self._down_since: float | None = None
        self.posted_batches = 0
        self.posted_records = 0  # these three for /metrics
        self.posted_bytes = 0
        self.failed_batches = 0
        self.dead_batches = 0
        self._session: aiohttp.ClientSession | None = None

    # -- producers (called by the Redis sink, in record order) -----------------------------

    def has_room(self, size: int) -> bool:
        return not self._buffered or self._buffered + size <= self.buffer_bytes

    async def wait_room(self) -> None:
        self._pressure.set()
        self._space.clear()
        await self._space.wait()

    def add(self, record: bytes) -> None:
        self._records.append(record)
        self._buffered += len(record)
        self._wakeup.set()

    # -- the writer ------------------------------------------------------------------------

    @property
    def spooling(self) -> bool:
        return self._spool_active

    def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        self._pressure.set()

    async def drained(self) -> None:
        while self._records or self._spool_active or not self._idle.is_set():
            self._idle.clear()
            await self._idle.wait()

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            await self._replay_leftovers()
            while True:
                if self._spool_active:
                    if not await self._spool_step():
                        return
                    continue
                if not self._records:
                    self._idle.set()
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._idle.clear()
                await self._linger()
                batch = self._take()
                try:
                    await self._deliver(batch)
                finally:
                    self._buffered -= sum(len(r) for r in batch)
                    self._space.set()
                if self._lost_at_close:
                    log.error("closing with the http sink unreachable and the spool unwritable: "
                              "records lost", extra={"records": self._lost_at_close})
                    return
        finally:
            await self._session.close()
            if self._spool is not None:
                try:
                    await asyncio.to_thread(self._spool.remove_if_empty)
                except OSError as exc:
                    self._disk_errors.failed(exc, self._spool.path)

    async def _linger(self) -> None:
        """Let a batch fill for up to `linger` seconds, unless it is full already."""
        deadline = time.monotonic() + self.linger
        while (self._buffered < self.batch_bytes and not self._closing
               and (left := deadline - time.monotonic()) > 0):
            self._wakeup.clear()
            try:
                async with asyncio.timeout(left):
                    await self._wakeup.wait()
            except TimeoutError:
                break

    def _take(self) -> list[bytes]:
        size = count = 0
        for record in self._records:
            if count and size + len(record) > self.batch_bytes:
                break
            size += len(record)
            count += 1
        batch = self._records[:count]
        del self._records[:count]
        return batch

    async def _post(self, batch: list[bytes]) -> None:
        """One POST; raises OSError-like errors to retry, HttpRejected to give up."""
        assert self._session is not None
        body = b"[" + b",".join(batch) + b"]"
        try:
            async with self._session.post(self.url, data=body, headers=self.headers) as resp:
                if resp.status < 300:
                    self.posted_batches += 1
                    self.posted_records += len(batch)
                    self.posted_bytes += len(body)
                    return
                self.failed_batches += 1
                if resp.status == 429 or resp.status >= 500:
                    raise ConnectionError(f"HTTP {resp.status}")
                raise HttpRejected(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.failed_batches += 1
            raise ConnectionError(str(exc) or type(exc).__name__) from exc

    async def _deliver(self, batch: list[bytes]) -> None:
        attempt = 0
        while True:
            try:
                await self._post(batch)
                self._note_up()
                return
            except HttpRejected as exc:
                await self._dead_letter(batch, str(exc))
                return
            except ConnectionError as exc:
                self._note_down(exc)
                if self._pressure.is_set() or self._closing:
                    await self._spill(batch)
                    return
                attempt += 1
                await self._pause(attempt)

    async def _pause(self, attempt: int) -> None:
        delay = min(RETRY_CAP, 0.05 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)
        try:
            async with asyncio.timeout(delay):
                await self._pressure.wait()
        except TimeoutError:
            pass

    async def _dead_letter(self, batch: list[bytes], reason: str) -> None:
        self.dead_batches += 1
        path = self.dead_dir / f"{time.time():.6f}-{self.dead_batches}.json"

        def write() -> None:
            self.dead_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b'{"reason":' + _json_str(reason) + b',"url":' + _json_str(redact_url(self.url))
                             + b',"records":[' + b",".join(batch) + b"]}")

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            self._disk_errors.failed(exc, path)
            log.error("http sink refused a batch and it cannot be kept on disk: dropped",
                      extra={"reason": reason, "records": len(batch)})
            return
        log.error("http sink refused a batch; it is kept in a file and not retried",
                  extra={"reason": reason, "file": str(path), "records": len(batch)})

    # -- spool -----------------------------------------------------------------------------

    def _open_spool(self) -> SpoolFile:
        if self._spool is None:
            self._spool = SpoolFile(self.spool_dir / spool_name(self.executor, HTTP_SUFFIX))
        return self._spool

    async def _spill(self, batch: list[bytes]) -> None:
        queued = self._records
        self._records = []
        calls: list[Call] = [("http", "", [], [r]) for r in (*batch, *queued)]
        try:
            spool = await asyncio.to_thread(self._open_spool)
            await asyncio.to_thread(spool.append, calls)
        except OSError as exc:
            # Nothing written: the records go back, in order, and wait in memory (tasks are
            # slowed by back-pressure) until the receiver or the disk takes them.
            self._disk_errors.failed(exc, self.spool_dir)
            self._records = [*batch, *queued, *self._records]
            self._buffered += sum(len(r) for r in batch)
            if self._closing:
                self._lost_at_close = len(self._records)
                return
            await asyncio.sleep(SPILL_RETRY)
            return
        self._disk_errors.ok()
        if not self._spool_active:
            log.warning("http sink unreachable and the buffer is full: spooling to disk",
                        extra={"spool": str(spool.path)})
        self._spool_active = True
        self._buffered -= sum(len(r) for r in queued)
        self._pressure.clear()
        self._space.set()

    async def _spool_step(self) -> bool:
        spool = self._open_spool()
        if self._records:
            await self._spill([])
        if spool.pending == 0:
            await asyncio.to_thread(spool.remove)
            self._spool = None
            self._spool_active = False
            log.warning("http spool delivered; records flow directly again")
            return True
        calls, offset = await asyncio.to_thread(spool.read, self.batch_bytes)
        if not calls:
            return True  # a torn end was set aside: nothing is pending at the next step
        batch = [call[3][0] for call in calls if call[3] and isinstance(call[3][0], bytes)]
        try:
            await self._post(batch)
            self._note_up()
        except HttpRejected as exc:
            await self._dead_letter(batch, str(exc))
        except ConnectionError as exc:
            self._note_down(exc)
            if self._closing:
                if self._records:  # added while that attempt was under way (done records too)
                    await self._spill([])
                return False
            await self._pause(3)
            return True
        await asyncio.to_thread(spool.commit, offset)
        return True

    async def _replay_leftovers(self) -> None:
        """Deliver HTTP spools that earlier runs left in this state_dir (any executor id)."""
        for path in leftover_spools(self.spool_dir, HTTP_SUFFIX):
            spool = await asyncio.to_thread(SpoolFile, path)
            if not spool.locked:
                await asyncio.to_thread(spool.close)
                continue
            self._spool = spool
            self._spool_active = spool.pending > 0
            if self._spool_active:
                log.warning("replaying an http spool left by an earlier run",
                            extra={"spool": str(path)})
            while self._spool_active:
                if not await self._spool_step():
                    return
            if self._spool is not None:
                await asyncio.to_thread(self._spool.remove)
                self._spool = None

    def _note_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("http sink unreachable; records wait", extra={"error": str(exc)})

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.warning("http sink reachable again",
                        extra={"down_s": round(time.monotonic() - self._down_since, 3)})
            self._down_since = None


def _json_str(text: str) -> bytes:
    return orjson.dumps(text)


def make_http_sink(config: Any, executor: str) -> HttpSink:
    return HttpSink(
        config.logs_http, executor=executor, buffer_bytes=config.buffer_bytes,
        batch_bytes=config.http_batch_bytes, linger=config.http_linger_ms / 1000,
        timeout=config.http_timeout, headers=dict(config.logs_http_headers),
        state_dir=Path(config.state_dir))
