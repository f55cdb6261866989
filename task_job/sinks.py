"""Where records go: a bounded, ordered buffer drained into Redis in pipelined batches.

Owns delivery and back-pressure; knows nothing of processes. Every operation it sends is
idempotent (the scripts check seq and ownership), so a batch cut by a lost connection is
simply sent again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from task_job.broker import (
    TRANSIENT_ERRORS,
    WAIT_TIMEOUT_MS,
    Broker,
    Oversize,
    claim_ref,
    parked_member,
)
from task_job.files import DiskErrors
from task_job.protocol import (
    MsgType,
    Outcome,
    RecordHead,
    build_dead_entry,
    build_done_record,
    build_output_record,
    build_retry_record,
)
from task_job.spool import SPILL_RETRY, Call, SpoolFile, leftover_spools, spool_name

log = logging.getLogger(__name__)

BATCH_BYTES = 1 << 20
OP_OVERHEAD = 256  # bytes counted per operation beyond its payload
RETRY_CAP = 5.0
NETWORK_ERRORS = TRANSIENT_ERRORS  # RedisOutOfMemory among them (a ConnectionError)


@dataclass(slots=True)
class TaskStream:
    """Delivery state of one task: who it is and the next seq to hand out."""

    head: RecordHead
    state_key: str
    log_key: str
    next_seq: int = 0
    done: bytes | None = None  # the done record, once built
    started: _Command | None = None  # the queued note of its pid and start time
    pid: int | None = None
    started_at: str = ""


@dataclass(slots=True)
class _Records:
    stream: TaskStream
    first_seq: int
    payloads: list[bytes]
    size: int


@dataclass(slots=True)
class _Script:
    name: str
    keys: list[str]
    args: list[Any]
    size: int
    future: asyncio.Future[Any] | None = None


@dataclass(slots=True)
class _Command:
    args: list[Any]
    size: int
    taken: bool = False  # in a batch (sent, or on its way to the spool)
    dropped: bool = False  # folded into a later op: not to be sent


_Op = _Records | _Script | _Command


@dataclass
class RedisSink:
    """Records, done records and dead letters, in order, to Redis; bounded by buffer_bytes.

    While Redis is away, ops wait in memory; when memory is full (or at close) they go, in
    order, to the spool under `_spool_dir`, which is delivered first once Redis is back.
    """

    broker: Broker
    executor: str
    buffer_bytes: int
    batch_bytes: int = BATCH_BYTES
    _ops: list[_Op] = field(default_factory=list)
    _buffered: int = 0
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _space: asyncio.Event = field(default_factory=asyncio.Event)
    _spool_dir: Path | None = None
    tee: Any = None  # an HttpSink that gets every record too, in the same order
    _closing: bool = False
    _running: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _pressure: asyncio.Event = field(default_factory=asyncio.Event)
    _down_since: float | None = None
    _spool: SpoolFile | None = None
    _spool_active: bool = False
    _spool_attempt: int = 0
    _spool_errors: DiskErrors = field(default_factory=lambda: DiskErrors("the spool"))
    delivered_records: int = 0
    delivered_bytes: int = 0
    errors: int = 0  # batches that failed to reach Redis (and were retried or spooled)
    _lost_at_close: int = 0

    def open_stream(self, head: RecordHead, next_seq: int = 0) -> TaskStream:
        keys = self.broker.keys
        return TaskStream(head, keys.task(head.id), keys.log(head.id), next_seq)

    # -- producers -------------------------------------------------------------------------

    async def put_output(self, stream: TaskStream, kind: MsgType, data: bytes) -> None:
        """Queue one stdout/stderr record; waits while the buffer is full (back-pressure)."""
        need = len(data) + OP_OVERHEAD
        while True:
            if self._buffered and self._buffered + need > self.buffer_bytes:
                self._pressure.set()  # lets a sink waiting out an outage spool instead
                self._space.clear()
                await self._space.wait()
            elif self.tee is not None and not self.tee.has_room(need):
                await self.tee.wait_room()
            else:
                break
        # seq is taken only after the wait, with no await in between: seq order = queue order.
        seq = stream.next_seq
        stream.next_seq += 1
        payload = build_output_record(stream.head, kind, data, seq, time.time())
        if self.tee is not None:
            self.tee.add(payload)
        last = self._ops[-1] if self._ops else None
        size = len(payload) + OP_OVERHEAD
        if (isinstance(last, _Records) and last.stream is stream
                and last.size + size <= self.batch_bytes):
            last.payloads.append(payload)
            last.size += size
        else:
            self._ops.append(_Records(stream, seq, [payload], size))
        self._add(size)

    def note(self, stream: TaskStream, field: str, value: str) -> None:
        """Queue one more field of the task's state (e.g. who asked for its kill)."""
        op = _Command(["HSET", stream.state_key, field, value], OP_OVERHEAD)
        self._ops.append(op)
        self._add(OP_OVERHEAD)

    def note_started(self, stream: TaskStream, pid: int, started_at: float) -> None:
        """Queue the state record's pid and start time. A task that ends before this is sent
        (most short ones) has them written by its done record's script instead: one command
        less per task."""
        stream.pid, stream.started_at = pid, f"{started_at:.6f}"
        op = _Command(["HSET", stream.state_key, "pid", pid, "started_at", stream.started_at],
                      OP_OVERHEAD)
        stream.started = op
        self._ops.append(op)
        self._add(OP_OVERHEAD)

    def retry(self, stream: TaskStream, outcome: Outcome, *, raw: bytes, attempt: int,
              queue: str, due: float, group_keys: Sequence[str] = ()) -> asyncio.Future[Any]:
        """Queue the end of an attempt that will be retried: its retry record, and the task
        parked until `due` for `queue` (retry.lua); resolves to 1 once written."""
        cfg = self.broker.config
        keys = self.broker.keys
        seq = stream.next_seq
        stream.next_seq += 1
        record = build_retry_record(stream.head, outcome, seq, time.time(), attempt, due)
        if self.tee is not None:
            self.tee.add(record)
        member = parked_member(queue, stream.head.id, raw)
        exit_code = "" if outcome.exit_code is None else str(outcome.exit_code)
        args = [self.executor, seq, record, claim_ref(raw), member, repr(due), stream.head.id,
                outcome.status.value, exit_code, cfg.task_log_ttl, cfg.task_log_max_records,
                cfg.logs_max_len]
        script_keys = [keys.logs, stream.log_key, stream.state_key, keys.processing(self.executor),
                       keys.scheduled, keys.scheduled_ids, *group_keys]
        return self._script("retry", script_keys, args, len(record) + len(member))

    def finish(self, stream: TaskStream, outcome: Outcome, *, raw: bytes, mode: str = "own",
               dead_reason: str | None = None, group_keys: Sequence[str] = ()) -> asyncio.Future[Any]:
        """Queue the done record; the future resolves to 1 once written (0 if settled before)."""
        cfg = self.broker.config
        keys = self.broker.keys
        seq = stream.next_seq
        stream.next_seq += 1
        now = time.time()
        record = build_done_record(stream.head, outcome, seq, now)
        stream.done = record
        if self.tee is not None:
            self.tee.add(record)
        dead = build_dead_entry(raw, dead_reason, self.executor, now) if dead_reason else b""
        exit_code = "" if outcome.exit_code is None else str(outcome.exit_code)
        ref = claim_ref(raw)
        args = [mode, self.executor, seq, record, ref, dead, outcome.status.value, exit_code,
                f"{outcome.finished_at or now:.6f}", cfg.task_ttl, cfg.task_log_ttl,
                cfg.task_log_max_records, cfg.dead_max_len, cfg.logs_max_len, "", ""]
        started = stream.started
        if started is not None and not started.taken:
            started.dropped = True  # still queued: the done record's script writes them
            args[-2:] = [stream.pid, stream.started_at]
        args.append(stream.head.id)
        script_keys = [keys.logs, stream.log_key, stream.state_key,
                       keys.processing(self.executor), keys.dead, keys.recent(),
                       keys.recent(outcome.status.value), keys.recent_by(self.executor), keys.events,
                       *group_keys]
        return self._script("finish", script_keys, args, len(record) + len(ref) + len(dead))

    def dead_letter(self, raw: bytes | Oversize, reason: str, *, claimed: bool = True
                    ) -> asyncio.Future[Any]:
        """Move a claimed message (or, `claimed=False`, one that never was: a control
        message) to the dead-letter list with its reason; a big one is kept as a prefix, and
        one never read whole (Oversize) is found in the processing list by its digest."""
        keys = self.broker.keys
        if isinstance(raw, Oversize):
            entry = build_dead_entry(raw.prefix, reason, self.executor, time.time(), size=raw.size)
            ref = raw.ref
        else:
            entry = build_dead_entry(raw, reason, self.executor, time.time())
            ref = claim_ref(raw) if claimed else b""
        return self._script("dead_letter", [keys.processing(self.executor), keys.dead],
                            [ref, entry, self.broker.config.dead_max_len], len(ref) + len(entry))

    def _script(self, name: str, keys: list[str], args: list[Any], size: int) -> asyncio.Future[Any]:
        # Settling ops are small and never wait for space: they must not deadlock behind
        # the output that fills the buffer.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append(_Script(name, keys, args, size + OP_OVERHEAD, future))
        self._add(size + OP_OVERHEAD)
        return future

    def _add(self, size: int) -> None:
        self._buffered += size
        self._wakeup.set()

    # -- the writer ------------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def spooling(self) -> bool:
        return self._spool is not None and self._spool_active

    def close(self) -> None:
        """Deliver what is queued (or, while Redis is away, spool it), then let `run` return."""
        self._closing = True
        self._wakeup.set()
        self._pressure.set()

    async def run(self) -> None:
        self._running = True
        try:
            while True:
                if self.spooling:
                    if not await self._spool_step():
                        return  # closing while Redis is away: everything is on disk
                    continue
                if not self._ops:
                    self._idle.set()
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._idle.clear()
                await self._deliver_next()
                if self._lost_at_close:
                    log.error("closing with redis unreachable and the spool unwritable: "
                              "operations lost", extra={"operations": self._lost_at_close})
                    return
        finally:
            self._running = False
            if self._spool is not None:  # releases its lock; keeps it if anything is left
                try:
                    await asyncio.to_thread(self._spool.remove_if_empty)
                except OSError as exc:
                    self._spool_errors.failed(exc, self._spool.path)
                self._spool = None

    async def deliver_now(self, future: asyncio.Future[Any]) -> Any:
        """Wait until `future`'s op is delivered and return its result; before `run` has
        started (at start-up) deliver the queue directly."""
        while not future.done():
            if self._running:
                return await future
            await self._deliver_next()
        return future.result()

    async def drained(self) -> None:
        """Wait until everything queued so far has been delivered (spool included)."""
        while self._ops or self.spooling or not self._idle.is_set():
            self._idle.clear()
            await self._idle.wait()

    async def _deliver_next(self) -> None:
        batch, size = self._take()
        try:
            await self._deliver(batch)
        finally:
            self._buffered -= size
            self._space.set()

    def _take(self) -> tuple[list[_Op], int]:
        taken = 0
        count = 0
        for op in self._ops:
            if count and taken + op.size > self.batch_bytes:
                break
            taken += op.size
            count += 1
            if isinstance(op, _Command):
                op.taken = True
        batch = [op for op in self._ops[:count] if not (isinstance(op, _Command) and op.dropped)]
        del self._ops[:count]
        return batch, taken

    def _call(self, op: _Op) -> Call:
        cfg = self.broker.config
        keys = self.broker.keys
        if isinstance(op, _Records):
            s = op.stream
            return ("script", "push_records", [keys.logs, s.log_key, s.state_key],
                    [self.executor, op.first_seq, cfg.task_log_max_records, cfg.task_ttl,
                     cfg.logs_max_len, *op.payloads])
        if isinstance(op, _Script):
            return ("script", op.name, op.keys, op.args)
        return ("cmd", "", [], op.args)

    async def _send(self, calls: list[Call]) -> list[Any]:
        """One pipelined round trip; raises on network errors; reloads scripts if needed."""
        sha = self.broker.scripts.sha
        commands: list[tuple[Any, ...]] = [
            ("EVALSHA", sha[name], len(keys), *keys, *args) if kind == "script" else tuple(args)
            for kind, name, keys, args in calls]
        if self.broker.wait_replicas:  # replicated before it counts as delivered
            commands.append(("WAIT", self.broker.wait_replicas, WAIT_TIMEOUT_MS))
        results = await self.broker.send(self.broker.sink_lane, commands)
        if self.broker.wait_replicas:
            results = results[:-1]
        passing = next((r for r in results if isinstance(r, TRANSIENT_ERRORS)), None)
        if passing is not None:
            # e.g. READONLY during a failover, or OOM under maxmemory (the lane turns those
            # replies into RedisOutOfMemory): the batch is sent again (each script applies
            # whole or not at all, and is safe to repeat).
            raise passing
        self._note_up()
        for result in results:
            if isinstance(result, Exception):
                log.error("redis refused a record operation", extra={"error": str(result)})
        return results

    async def _deliver(self, batch: list[_Op]) -> None:
        """Send one batch, retrying while Redis is away; when the buffer fills meanwhile, or
        at close, the batch and everything queued behind it go to the spool instead."""
        calls = [self._call(op) for op in batch]
        attempt = 0
        while True:
            try:
                results = await self._send(calls)
            except NETWORK_ERRORS as exc:
                self.errors += 1
                self._note_down(exc)
                if self._spool_dir is not None and (self._pressure.is_set() or self._closing):
                    await self._spill(batch, calls)
                    return
                attempt += 1
                await self._pause(attempt)
                continue
            for op, result in zip(batch, results, strict=True):
                if isinstance(op, _Script) and op.future is not None and not op.future.done():
                    if isinstance(result, Exception):
                        op.future.set_exception(result)
                    else:
                        op.future.set_result(result)
            for op in batch:  # counted for /metrics once delivered
                if isinstance(op, _Records):
                    self.delivered_records += len(op.payloads)
                    self.delivered_bytes += sum(map(len, op.payloads))
                elif isinstance(op, _Script) and op.name == "finish":
                    self.delivered_records += 1
            return

    async def _pause(self, attempt: int) -> None:
        """Back off before a retry; cut short when producers wait for space (or at close)."""
        delay = min(RETRY_CAP, 0.05 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)
        try:
            async with asyncio.timeout(delay):
                await self._pressure.wait()
        except TimeoutError:
            pass

    # -- the spool -------------------------------------------------------------------------

    def _open_spool(self) -> SpoolFile:
        if self._spool is None:
            assert self._spool_dir is not None
            self._spool = SpoolFile(self._spool_dir / spool_name(self.executor))
        return self._spool

    async def _spill(self, batch: list[_Op], calls: list[Call]) -> None:
        """Write a failed batch and then every queued op to disk, in order; free the memory."""
        queued = self._ops
        self._ops = []
        for op in queued:
            if isinstance(op, _Command):
                op.taken = True
        all_calls = calls + [self._call(op) for op in queued
                             if not (isinstance(op, _Command) and op.dropped)]
        try:
            spool = await asyncio.to_thread(self._open_spool)
            await asyncio.to_thread(spool.append, all_calls)
        except OSError as exc:
            # A full or read-only state_dir: nothing was written. The ops go back, in order,
            # and stay in memory (producers wait on back-pressure) until Redis or the disk
            # takes them; at close, with neither, they are lost and that is logged.
            self._spool_errors.failed(exc, self._spool_dir)
            self._ops = [*batch, *queued, *self._ops]
            self._buffered += sum(op.size for op in batch)
            if self._closing:
                self._lost_at_close = len(self._ops)
                return
            await asyncio.sleep(SPILL_RETRY)
            return
        self._spool_errors.ok()
        if not self._spool_active:
            log.warning("redis unreachable and the buffer is full: spooling records to disk",
                        extra={"spool": str(spool.path)})
        self._spool_active = True
        self._buffered -= sum(op.size for op in queued)
        for op in (*batch, *queued):
            if isinstance(op, _Script) and op.future is not None and not op.future.done():
                op.future.set_result(None)  # durable on disk: delivered when Redis returns
        self._pressure.clear()
        self._space.set()

    async def _spool_step(self) -> bool:
        """Spill what is queued, then deliver the oldest spooled batch. False at close when
        Redis is still away (all is on disk, replayed by the next start)."""
        spool = self._open_spool()
        if self._ops:
            await self._spill([], [])
        if spool.pending == 0:
            await asyncio.to_thread(spool.remove)
            self._spool = None
            self._spool_active = False
            log.warning("spool delivered; records flow directly again")
            return True
        calls, offset = await asyncio.to_thread(spool.read, self.batch_bytes)
        if not calls:
            return True  # a torn end was set aside: pending is 0 at the next step
        try:
            await self._send(calls)
        except NETWORK_ERRORS as exc:
            self._note_down(exc)
            if self._closing:
                if self._ops:  # queued while that attempt was under way (done records too)
                    await self._spill([], [])
                return False
            self._spool_attempt += 1
            await self._pause(self._spool_attempt)
            return True
        self._spool_attempt = 0
        await asyncio.to_thread(spool.commit, offset)
        return True

    async def replay_spools(self) -> int:
        """At start-up: deliver spools left by earlier runs (any executor id) that no live
        executor holds, oldest first. Returns the number of operations replayed."""
        if self._spool_dir is None:
            return 0
        replayed = 0
        for path in leftover_spools(self._spool_dir):
            spool = await asyncio.to_thread(SpoolFile, path)
            if not spool.locked:
                await asyncio.to_thread(spool.close)
                continue
            if spool.pending:
                log.warning("replaying a spool left by an earlier run", extra={"spool": str(path)})
            attempt = 0
            while spool.pending:
                calls, offset = await asyncio.to_thread(spool.read, self.batch_bytes)
                if not calls:
                    break  # a torn frame was set aside: nothing more is whole
                try:
                    await self._send(calls)
                except NETWORK_ERRORS as exc:
                    self._note_down(exc)
                    attempt += 1
                    await self._pause(attempt)
                    continue
                replayed += len(calls)
                await asyncio.to_thread(spool.commit, offset)
            await asyncio.to_thread(spool.remove)
        return replayed

    def _note_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unreachable; records wait in the buffer",
                        extra={"error": str(exc), "buffered_bytes": self._buffered})

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.warning("redis reachable again; delivering buffered records",
                        extra={"down_s": round(time.monotonic() - self._down_since, 3)})
            self._down_since = None
