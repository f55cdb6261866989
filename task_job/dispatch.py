"""The dispatcher (`task-job dispatch`): takes tasks from the dispatcher queue through a
processing list of its own and places each on the queue of the least-loaded live executor
whose labels match (place.lua: one atomic step per placement); re-routes the tasks waiting on
executors that drain or die; rejects what no executor matches after `unroutable_after`.
Runs no task; several may run at once (docs/routing.md)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from task_job.broker import Broker, Oversize
from task_job.config import Config
from task_job.deps import end_waiting
from task_job.errors import ProtocolError
from task_job.fleet import NETWORK_ERRORS, backoff
from task_job.protocol import Outcome, RecordHead, Status, build_dead_entry, parse_task, peek_id
from task_job.schedule import Scheduler
from task_job.sinks import RedisSink

log = logging.getLogger(__name__)

BATCH = 256  # tasks taken and placed per round trip at most
CLAIM_BLOCK = 1.0
CANDIDATES_TTL = 0.25  # seconds the executor list is reused between placements
MAINTENANCE = 0.5  # seconds between passes over unroutable tasks and draining executors


class Dispatcher:
    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.id = config.executor_id if config.executor_id else f"{socket.gethostname()}:{os.getpid()}"
        self.broker = broker or Broker(config)
        self.keys = self.broker.keys
        self.mine = self.keys.dispatching(self.id)
        self.sink = RedisSink(self.broker, self.id, config.buffer_bytes,
                              _spool_dir=Path(config.state_dir) / "spool-dispatch")
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._candidates: list[str] = []
        self._candidates_at = 0.0
        self.placed = 0
        self.unroutable = 0
        self.scheduler = Scheduler(self.broker, dispatched=lambda: True, state_ttl=config.task_ttl)

    def stop(self) -> None:
        self._stopping.set()

    async def _end_waiting(self) -> None:
        await end_waiting(self.broker, self.sink, self.id)

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        await self.broker.start()
        # A previous process with this id left tasks it took: they go back first.
        while await self.broker.redis.lmove(self.mine, self.keys.dispatch, "RIGHT", "LEFT"):
            pass
        await self._beat()
        log.info("dispatcher started", extra={"dispatcher": self.id, "queue": self.keys.dispatch})
        self._ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                sink = tg.create_task(self.sink.run())
                background = [tg.create_task(self._beat_loop()),
                              tg.create_task(self._maintenance_loop()),
                              tg.create_task(self.broker.move_due_forever(self.scheduler.fire_due, self._end_waiting))]
                await self._place_loop()
                for task in background:
                    task.cancel()
                self.sink.close()
                await sink
        finally:
            try:
                async with asyncio.timeout(2):
                    # Whatever is still ours goes back for another dispatcher, then we leave.
                    while await self.broker.redis.lmove(self.mine, self.keys.dispatch, "RIGHT", "LEFT"):
                        pass
                    await self.broker.redis.zrem(self.keys.dispatchers, self.id)
            except NETWORK_ERRORS:  # TimeoutError is an OSError
                log.warning("dispatcher stopped without deregistering", extra={"dispatcher": self.id})
            await self.broker.close()
        log.info("dispatcher stopped", extra={"dispatcher": self.id, "placed": self.placed})

    async def _beat(self) -> None:
        back = await self.broker.call(
            "dispatcher_beat", [self.keys.dispatchers, self.keys.dispatch, self.keys.dispatch_stats],
            [self.id, int(self.config.dead_after * 1000), f"{self.keys.tag}:"])
        if back:
            log.warning("tasks of a dead dispatcher given back to the dispatcher queue",
                        extra={"dispatcher": self.id, "tasks": back})

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                await self._beat()
            except NETWORK_ERRORS as exc:
                log.warning("dispatcher heartbeat failed", extra={"error": repr(exc)})

    async def _place_loop(self) -> None:
        attempt = 0
        busy = False
        while not self._stopping.is_set():
            try:
                raws: list[bytes | Oversize] = []
                if busy:
                    (raws,) = await self.broker.claim_from([self.keys.dispatch], self.mine, BATCH)
                if not raws:
                    raw = await self.broker.claim_wait(self.keys.dispatch, self.mine, CLAIM_BLOCK)
                    raws = [raw] if raw is not None else []
                busy = bool(raws)
                if raws:
                    took = time.perf_counter()
                    await self._place(raws)
                    pipe = self.broker.redis.pipeline(transaction=False)  # one round trip
                    pipe.hincrbyfloat(self.keys.dispatch_stats, "place_seconds",
                                      (time.perf_counter() - took) * len(raws))
                    pipe.hincrby(self.keys.dispatch_stats, "placed_count", len(raws))
                    await pipe.execute()
                attempt = 0
            except NETWORK_ERRORS as exc:
                attempt += 1
                log.warning("dispatcher: redis unreachable; retrying", extra={"error": repr(exc)})
                busy = False
                await backoff(attempt)
            except Exception:  # a bug must not stop placing: what we took stays in our list
                log.exception("placement failed")
                busy = False
                attempt += 1
                await backoff(attempt)

    async def candidates(self) -> list[str]:
        now = time.monotonic()
        if now - self._candidates_at > CANDIDATES_TTL:
            members = await self.broker.redis.zrange(self.keys.executors, 0, -1)
            self._candidates = [m.decode() for m in members]
            self._candidates_at = now
        return self._candidates

    def _place_call(self, raw: bytes, source: str, kind: str, executors: list[str]) -> tuple[Any, ...]:
        selectors, target = "", ""
        try:
            task = parse_task(raw, self.config.max_message_bytes, self.config.label_max_bytes)
            selectors = orjson.dumps(task.labels).decode() if task.labels else ""
            target = task.executor or ""
        except ProtocolError:
            pass  # placed anywhere: the executor rejects it with a done record, as ever
        keys = [source, self.keys.executors, self.keys.unroutable, self.keys.dispatch_stats]
        for ident in executors:
            keys += [self.keys.executor(ident), self.keys.processing(ident), self.keys.inbox(ident)]
        return ("EVALSHA", self.broker.scripts.sha["place"], len(keys), *keys,
                raw, selectors, target, kind, random.random(), *executors)

    async def _place(self, raws: list[bytes | Oversize]) -> None:
        executors = await self.candidates()
        calls, whole = [], []
        for raw in raws:
            if isinstance(raw, Oversize):
                entry = build_dead_entry(raw.prefix, f"message of {raw.size} bytes exceeds the limit of "
                                         f"{self.config.max_message_bytes}", self.id, time.time(), size=raw.size)
                await self.broker.call("dead_letter", [self.mine, self.keys.dead],
                                       [raw.ref, entry, self.config.dead_max_len])
                continue
            whole.append(raw)
            calls.append(self._place_call(raw, self.mine, "list", executors))
        if not calls:
            return
        results = await self.broker.send(self.broker.claim_lane, calls)
        for raw, result in zip(whole, results, strict=True):
            if isinstance(result, Exception):
                raise result
            where = result.decode() if isinstance(result, bytes) else str(result)
            if where == "":
                self.unroutable += 1
                log.warning("no live executor matches the task: waiting", extra={
                    "task_id": peek_id(raw), "dispatcher": self.id})
            elif where != "gone":
                self.placed += 1
        if any(r in (b"", "") for r in results):
            self._candidates_at = 0.0  # look for new executors at the next placement

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE)
            try:
                await self._reroute()
                await self._retry_unroutable()
            except NETWORK_ERRORS as exc:
                log.warning("dispatcher maintenance: redis unreachable", extra={"error": repr(exc)})
            except Exception:
                log.exception("dispatcher maintenance failed")

    async def _reroute(self) -> None:
        """Tasks waiting on executors that drain, or stopped beating, go back to be placed."""
        for ident in await self.candidates():
            moved = await self.broker.call(
                "reroute", [self.keys.executors, self.keys.executor(ident), self.keys.inbox(ident),
                            self.keys.dispatch, self.keys.dispatch_stats],
                [ident, int(self.config.dead_after * 1000)])
            if moved:
                log.info("tasks re-routed", extra={"executor": ident, "tasks": int(moved)})

    async def _retry_unroutable(self) -> None:
        redis = self.broker.redis
        waiting = await redis.zrange(self.keys.unroutable, 0, BATCH - 1, withscores=True)
        if not waiting:
            return
        now = float((await redis.time())[0])
        executors = await self.candidates()
        for raw, since in waiting:
            if now - since > self.config.unroutable_after:
                await self._reject(raw, since)
                continue
            where = await self.broker.send(self.broker.claim_lane, [
                self._place_call(raw, self.keys.unroutable, "zset", executors)])
            if where and where[0] not in (b"", b"gone"):
                self.placed += 1
                log.info("unroutable task placed", extra={"task_id": peek_id(raw)})

    async def _reject(self, raw: bytes, since: float) -> None:
        """Past unroutable_after: the one dispatcher that removes it writes its done record."""
        if not await self.broker.redis.zrem(self.keys.unroutable, raw):
            return
        task_id = peek_id(raw)
        try:
            task = parse_task(raw, self.config.max_message_bytes, self.config.label_max_bytes)
            wanted = f"executor {task.executor!r}" if task.executor else \
                f"labels {orjson.dumps(task.labels).decode()}"
        except ProtocolError:
            wanted = "its placement"
        reason = (f"no live executor matched {wanted} for {self.config.unroutable_after:g}s "
                  "(unroutable_after)")
        log.warning("unroutable task rejected", extra={"task_id": task_id, "reason": reason})
        if task_id is None:
            await self.broker.redis.rpush(self.keys.dead, build_dead_entry(raw, reason, self.id, time.time()))
            return
        stream = self.sink.open_stream(RecordHead(task_id, None, None, self.id))
        await self.sink.finish(stream, Outcome(Status.REJECTED, f"rejected: {reason}"), raw=raw, mode="new")
