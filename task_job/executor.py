"""The executor: claims tasks into free slots, runs them, obeys kills, heartbeats, drains.

Wires broker, runner and sink together; holds no Redis key names and spawns nothing itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from task_job import __version__
from task_job.broker import Broker
from task_job.config import Config, cmd_dir_is_shared
from task_job.errors import ConfinementError, ProtocolError
from task_job.protocol import (
    MsgType,
    Outcome,
    RecordHead,
    Status,
    Task,
    parse_control,
    parse_task,
    peek_id,
)
from task_job.runner import Ending, Run, RunResult, confine
from task_job.sinks import RedisSink, TaskStream

log = logging.getLogger(__name__)

CLAIM_BLOCK = 1.0  # seconds a BLMOVE waits; bounds how long a stop waits for the claim loop
NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass
class TaskRun:
    """A claimed task on this executor: its stream, its process once started, its kill."""

    task: Task
    stream: TaskStream
    attempt: int
    run: Run | None = None
    kill_reason: str | None = None
    claimed_mono: float = field(default_factory=time.monotonic)

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.run is not None:
            self.run.kill(reason)


def outcome_of(result: RunResult, timeout: float | None) -> Outcome:
    """Turn what the runner saw into the status and summary of the done record."""
    common: dict[str, Any] = dict(
        exit_code=result.exit_code, signal=result.signal, started_at=result.started_at,
        finished_at=result.finished_at, duration=round(result.duration, 6),
    )
    if result.ending is Ending.TIMEOUT:
        return Outcome(Status.TIMEOUT,
                       f"killed by {result.kill_signal} after timeout of {timeout:g}s", **common)
    if result.ending is Ending.KILLED:
        return Outcome(Status.KILLED, f"killed by {result.kill_signal} ({result.kill_reason})",
                       **common)
    if result.returncode == 0:
        return Outcome(Status.SUCCEEDED, "exit status 0", **common)
    if result.returncode > 0:
        return Outcome(Status.FAILED, f"exit status {result.returncode}", **common)
    return Outcome(Status.FAILED, f"terminated by {result.signal}", **common)


class _OnceLogger:
    """Logs a failing background loop once per state change, not once per attempt."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            self.failing = True
            log.warning(f"{self.what} failing; retrying", extra={"error": repr(exc)})

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            log.warning(f"{self.what} working again")


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(min(5.0, 0.05 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2))


class Executor:
    """One executor of the fleet; `run()` until `stop()` (or SIGTERM via the CLI)."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.id = config.executor_id
        self.broker = broker or Broker(config)
        self.keys = self.broker.keys
        self.sink = RedisSink(self.broker, self.id, config.buffer_bytes)
        self.running: dict[str, TaskRun] = {}
        self._finishing: set[asyncio.Future[Any]] = set()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._ready = asyncio.Event()
        self._env = dict(os.environ)
        self.claimed = 0

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running tasks get drain_timeout, then are killed and reported."""
        if not self._stopping.is_set():
            log.info("stopping: no more claims", extra={"executor": self.id,
                                                        "running": len(self.running)})
            self._stopping.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        cfg = self.config
        if cfg.confine == "strict" and cmd_dir_is_shared(cfg.cmd_dir):
            log.warning(
                "cmd_dir is writable by other users: anyone who can write there can run code "
                "as this executor; use a dedicated root-owned directory",
                extra={"cmd_dir": cfg.cmd_dir})
        if cfg.logs_http:
            log.warning("logs_http is not supported yet; records go to Redis only",
                        extra={"executor": self.id})
        await self.broker.start()
        await self._register()
        await self._settle_leftovers()
        log.info("executor started", extra={
            "executor": self.id, "queue": cfg.queue_name, "redis": cfg.redacted_redis_addr,
            "slots": cfg.max_concurrency, "cmd_dir": cfg.cmd_dir, "version": __version__})
        self._ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                sink = tg.create_task(self.sink.run())
                background = [tg.create_task(self._heartbeat_loop()),
                              tg.create_task(self._control_loop())]
                await self._claim_loop(tg)
                await self._mark("draining")
                await self._drain()
                self.sink.close()
                await sink
                for task in background:
                    task.cancel()
        finally:
            await self._deregister()
            await self.broker.close()
        log.info("executor stopped", extra={"executor": self.id, "claimed": self.claimed})

    async def _drain(self) -> None:
        if self.running:
            log.info("draining", extra={"running": len(self.running),
                                        "drain_timeout": self.config.drain_timeout})
            try:
                async with asyncio.timeout(self.config.drain_timeout):
                    while self.running:
                        await self._wait_slot()
            except TimeoutError:
                reason = f"executor shutdown after drain_timeout of {self.config.drain_timeout:g}s"
                for tr in list(self.running.values()):
                    log.info("killing at shutdown", extra={"task_id": tr.task.id})
                    tr.kill(reason)
                while self.running:
                    await self._wait_slot()
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    async def _wait_slot(self) -> None:
        self._slot_freed.clear()
        await self._slot_freed.wait()

    # -- registry --------------------------------------------------------------------------

    async def _register(self) -> None:
        cfg = self.config
        info = {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__,
                "labels": orjson.dumps(list(cfg.labels)).decode(), "slots": cfg.max_concurrency,
                "running": 0, "started_at": f"{time.time():.3f}", "status": "up"}
        async with self.broker.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.executor(self.id), mapping=info)
            pipe.zadd(self.keys.executors, {self.id: int(time.time() * 1000)})
            await pipe.execute()

    async def _mark(self, status: str) -> None:
        try:
            await self.broker.redis.hset(self.keys.executor(self.id), "status", status)
        except NETWORK_ERRORS as exc:
            log.warning("could not update the registry", extra={"error": repr(exc)})

    async def _deregister(self) -> None:
        try:
            async with self.broker.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys.executors, self.id)
                pipe.delete(self.keys.executor(self.id))
                await pipe.execute()
        except NETWORK_ERRORS as exc:
            log.warning("could not deregister", extra={"error": repr(exc)})

    async def _heartbeat_loop(self) -> None:
        health = _OnceLogger("heartbeat")
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                async with self.broker.redis.pipeline(transaction=True) as pipe:
                    pipe.zadd(self.keys.executors, {self.id: int(time.time() * 1000)})
                    pipe.hset(self.keys.executor(self.id), "running", len(self.running))
                    await pipe.execute()
                health.ok()
            except NETWORK_ERRORS as exc:
                health.failed(exc)

    # -- leftovers of an earlier life of this executor id ---------------------------------

    async def _settle_leftovers(self) -> None:
        """Settle what a previous process with this executor_id claimed and never finished."""
        processing = self.keys.processing(self.id)
        leftovers: list[bytes] = await self.broker.redis.lrange(processing, 0, -1)
        for raw in leftovers:
            task_id = peek_id(raw)
            if task_id is None:
                await self.sink.deliver_now(self.sink.dead_letter(raw, "not a task (found at start-up)"))
                continue
            state = await self.broker.redis.hgetall(self.keys.task(task_id))
            status = state.get(b"status", b"").decode()
            owner = state.get(b"executor", b"").decode()
            if not status or status == "cancel_requested":
                # Claimed but never begun: it never ran, so it may run now, in its place.
                await self.broker.call("unclaim", [processing, self.keys.queue], [raw])
                log.info("leftover returned to the queue", extra={"task_id": task_id})
            elif status == "running" and owner == self.id:
                await self._settle_lost(raw, task_id, state)
            else:
                await self.broker.redis.lrem(processing, 1, raw)

    async def _settle_lost(self, raw: bytes, task_id: str, state: dict[bytes, bytes]) -> None:
        try:
            task: Task | None = parse_task(raw)
        except ProtocolError:
            task = None
        attempt = int(state.get(b"attempt", b"1"))
        if task is not None and task.on_lost == "requeue" and attempt <= max(task.retries, 1):
            await self.broker.call("requeue", [self.keys.processing(self.id), self.keys.queue,
                                               self.keys.task(task_id)], [raw, self.id])
            log.info("lost task requeued", extra={"task_id": task_id, "attempt": attempt})
            return
        head = RecordHead.of(task, self.id) if task else RecordHead(task_id, None, None, self.id)
        stream = self.sink.open_stream(head, int(state.get(b"seq", b"-1")) + 1)
        outcome = Outcome(Status.LOST, "lost: its executor stopped before the task finished",
                          started_at=_float(state.get(b"started_at")))
        await self.sink.deliver_now(self.sink.finish(stream, outcome, raw=raw))
        log.info("task lost", extra={"task_id": task_id, "status": "lost"})

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self, tg: asyncio.TaskGroup) -> None:
        redis = self.broker.redis
        processing = self.keys.processing(self.id)
        health = _OnceLogger("claiming")
        attempt = 0
        while not self._stopping.is_set():
            if len(self.running) >= self.config.max_concurrency:
                stop = asyncio.ensure_future(self._stopping.wait())
                slot = asyncio.ensure_future(self._wait_slot())
                await asyncio.wait({stop, slot}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                slot.cancel()
                continue
            try:
                raw = await redis.blmove(self.keys.queue, processing, CLAIM_BLOCK, "LEFT", "RIGHT")
                if raw is not None and self._stopping.is_set():
                    # The claim was in flight when the stop came: give it back, in its place.
                    await self.broker.call("unclaim", [processing, self.keys.queue], [raw])
                elif raw is not None:
                    await self._claimed(raw, tg)
                health.ok()
                attempt = 0
            except NETWORK_ERRORS as exc:
                health.failed(exc)
                attempt += 1
                await _backoff(attempt)

    async def _claimed(self, raw: bytes, tg: asyncio.TaskGroup) -> None:
        self.claimed += 1
        try:
            task = parse_task(raw, self.config.max_message_bytes)
        except ProtocolError as exc:
            self._reject(raw, exc.reason, exc.task_id)
            return
        verdict, last_seq, attempt = await self.broker.call(
            "begin", [self.keys.task(task.id)], [self.id, f"{time.time():.6f}"])
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict == "duplicate":
            # The id already has (or will have) its one done record: no second one here.
            self._track(self.sink.dead_letter(raw, f"duplicate id {task.id!r}: already seen"))
            log.warning("rejected duplicate id", extra={"task_id": task.id, "status": "rejected"})
            return
        stream = self.sink.open_stream(RecordHead.of(task, self.id), int(last_seq) + 1)
        if verdict == "cancelled":
            self._track(self.sink.finish(stream, Outcome(Status.CANCELLED,
                        "cancelled before it started"), raw=raw, mode="cancel"))
            log.info("task cancelled", extra={"task_id": task.id, "status": "cancelled"})
            return
        tr = TaskRun(task, stream, int(attempt))
        self.running[task.id] = tr
        log.info("task claimed", extra={"task_id": task.id, "attempt": tr.attempt})
        tg.create_task(self._execute(tr))

    def _reject(self, raw: bytes, reason: str, task_id: str | None) -> None:
        log.warning("rejected message", extra={"task_id": task_id, "status": "rejected",
                                               "reason": reason})
        if task_id is None:
            self._track(self.sink.dead_letter(raw, reason))
            return
        stream = self.sink.open_stream(RecordHead(task_id, None, None, self.id))
        self._track(self.sink.finish(stream, Outcome(Status.REJECTED, f"rejected: {reason}"),
                                     raw=raw, mode="new", dead_reason=reason))

    def _track(self, future: asyncio.Future[Any]) -> None:
        self._finishing.add(future)
        future.add_done_callback(self._finishing.discard)

    # -- running ---------------------------------------------------------------------------

    async def _execute(self, tr: TaskRun) -> None:
        task = tr.task
        # Stands if the executor itself is cancelled mid-run; replaced on every other path.
        outcome = Outcome(Status.KILLED, "executor cancelled the task")
        try:
            outcome = await self._start_and_wait(tr)
        except ConfinementError as exc:
            outcome = Outcome(Status.REJECTED, f"rejected: {exc}")
        except OSError as exc:
            outcome = Outcome(Status.FAILED, f"cannot start: {exc.strerror or exc}")
        except Exception as exc:  # a bug must not lose the task: report it and go on
            log.exception("internal error running task", extra={"task_id": task.id})
            outcome = Outcome(Status.FAILED, f"internal error: {exc!r}")
        finally:
            # The done record must be queued whatever happened, cancellation included.
            fut = self.sink.finish(tr.stream, outcome, raw=task.raw)
            self._track(fut)
            del self.running[task.id]
            self._slot_freed.set()
            log.info("task finished", extra={
                "task_id": task.id, "executor": self.id, "status": outcome.status.value,
                "exit_code": outcome.exit_code, "duration_s": outcome.duration,
                "summary": outcome.summary})

    async def _start_and_wait(self, tr: TaskRun) -> Outcome:
        task = tr.task
        cfg = self.config
        env = self._env if not task.env else {**self._env, **task.env}
        argv, workdir = confine(task.argv, cmd_dir=cfg.cmd_dir, cwd=task.cwd,
                                interpreters=cfg.interpreters, mode=cfg.confine,
                                path_env=self._env.get("PATH"))
        if tr.kill_reason is not None:
            return Outcome(Status.KILLED, f"killed before it started ({tr.kill_reason})")
        limit = task.max_output if task.max_output is not None else cfg.max_output
        output = _OutputGate(self.sink, tr.stream, limit) if cfg.logs else None
        run = Run(argv, cwd=workdir, env=env, stdin=task.stdin, timeout=task.timeout,
                  kill_grace=cfg.kill_grace, record_max_bytes=cfg.record_max_bytes,
                  on_output=output.put if output else _discard)
        await run.start()
        tr.run = run
        if tr.kill_reason is not None:
            run.kill(tr.kill_reason)
        self.sink.note("HSET", tr.stream.state_key, "pid", run.pid, "started_at",
                       f"{run.started_at:.6f}")
        log.info("task started", extra={"task_id": task.id, "pid": run.pid})
        result = await run.wait()
        outcome = outcome_of(result, task.timeout)
        if output is not None and output.dropped:
            await output.report_dropped()
            outcome.extra["dropped_bytes"] = output.dropped
        return outcome

    # -- control ---------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        redis = self.broker.redis
        inbox = self.keys.inbox(self.id)
        health = _OnceLogger("control")
        attempt = 0
        while True:
            try:
                item = await redis.blpop([self.keys.control, inbox], CLAIM_BLOCK)
                health.ok()
                attempt = 0
            except NETWORK_ERRORS as exc:
                health.failed(exc)
                attempt += 1
                await _backoff(attempt)
                continue
            if item is None:
                continue
            key, raw = item
            try:
                await self._control(raw, routed=key.decode() == inbox)
            except NETWORK_ERRORS as exc:
                log.warning("control message not handled", extra={"error": repr(exc)})

    async def _control(self, raw: bytes, routed: bool) -> None:
        try:
            ctl = parse_control(raw, self.config.max_message_bytes)
        except ProtocolError as exc:
            log.warning("bad control message", extra={"reason": exc.reason})
            self._track(self.sink.dead_letter(raw, f"control: {exc.reason}"))
            return
        if self._kill_local(ctl.id):
            return
        if routed:
            log.info("kill for a task not running here: ignored", extra={"task_id": ctl.id})
            return
        where, detail = await self.broker.call(
            "kill", [self.keys.task(ctl.id)], [f"{time.time():.6f}", self.config.task_ttl])
        where = where.decode() if isinstance(where, bytes) else where
        detail = detail.decode() if isinstance(detail, bytes) else detail
        if where == "running":
            if detail == self.id:
                if not self._kill_local(ctl.id):
                    log.info("kill for a task that just finished", extra={"task_id": ctl.id})
                return
            await self.broker.redis.rpush(self.keys.inbox(detail), raw)
            log.info("kill routed", extra={"task_id": ctl.id, "to": detail})
        elif where == "marked":
            log.info("kill for a task not started: it will be cancelled", extra={"task_id": ctl.id})
        else:
            log.info("kill for a finished task: ignored", extra={"task_id": ctl.id,
                                                               "status": detail})

    def _kill_local(self, task_id: str) -> bool:
        tr = self.running.get(task_id)
        if tr is None:
            return False
        log.info("killing task", extra={"task_id": task_id})
        tr.kill("on request")
        return True


class _OutputGate:
    """Passes output to the sink up to max_output bytes (0 = no cap), counting the rest."""

    def __init__(self, sink: RedisSink, stream: TaskStream, limit: int) -> None:
        self.sink = sink
        self.stream = stream
        self.limit = limit
        self.kept = 0
        self.dropped = 0

    async def put(self, kind: MsgType, data: bytes) -> None:
        if self.limit:
            room = self.limit - self.kept
            if room <= 0:
                self.dropped += len(data)
                return
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            self.kept += len(data)
        await self.sink.put_output(self.stream, kind, data)

    async def report_dropped(self) -> None:
        note = (f"[task-job] {self.dropped} bytes of output dropped "
                f"(max_output {self.limit} bytes)\n").encode()
        await self.sink.put_output(self.stream, MsgType.STDERR, note)


async def _discard(kind: MsgType, data: bytes) -> None:
    return None


def _float(value: bytes | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
