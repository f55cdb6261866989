"""The fleet side of an executor: registry, heartbeats, takeover of dead executors, and
settling of claims whose run was interrupted. Never runs a task itself."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from task_job import __version__
from task_job.broker import TRANSIENT_ERRORS, Broker
from task_job.config import Config
from task_job.errors import ProtocolError
from task_job.protocol import Outcome, RecordHead, Status, Task, parse_task, peek_id
from task_job.sinks import RedisSink

log = logging.getLogger(__name__)

NETWORK_ERRORS = TRANSIENT_ERRORS
STOP_DEADLINE = 2.0  # seconds each registry update at shutdown may wait for a silent Redis
MARK_TTL = 7 * 86400  # a takeover mark waits this long for its executor to come back


class Link:
    """What this executor knows of its own connection to Redis.

    An executor that was cut off must not judge others by heartbeats that went stale while
    Redis was away from everyone: it reaps only after `connected_for() >= dead_after`.
    """

    def __init__(self) -> None:
        self._since: float | None = None
        self._failing: dict[str, bool] = {}
        self.reconnects = 0  # for /metrics
        self._was_down = False

    def up(self, what: str) -> None:
        if self._since is None:
            self._since = time.monotonic()
            if self._was_down:
                self.reconnects += 1
                self._was_down = False
        if self._failing.pop(what, False):
            log.warning(f"{what}: redis reachable again")

    def down(self, what: str, exc: BaseException) -> None:
        self._since = None
        self._was_down = True
        if not self._failing.get(what):
            self._failing[what] = True
            log.warning(f"{what}: redis unreachable; retrying", extra={"error": repr(exc)})

    def connected_for(self) -> float:
        return 0.0 if self._since is None else time.monotonic() - self._since


async def backoff(attempt: int) -> None:
    """Capped exponential back-off with jitter."""
    await asyncio.sleep(min(5.0, 0.05 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2))


def ip_address() -> str:
    """This host's address as its name resolves (registry records), or loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Fleet:
    """Registry entry, heartbeat and reaper of one executor."""

    def __init__(self, broker: Broker, sink: RedisSink, config: Config, link: Link,
                 running_count: Callable[[], int], on_taken_over: Callable[[], None],
                 on_data_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        self.broker = broker
        self.sink = sink
        self.config = config
        self.id = config.executor_id
        self.keys = broker.keys
        self.link = link
        self.running_count = running_count
        self.on_taken_over = on_taken_over
        self.on_data_lost = on_data_lost or _nothing
        self.server_ms = 0
        self.takeovers = 0
        self.dispatched = False  # a live dispatcher is registered (checked with each heartbeat)
        self.clock_offset = 0.0  # Redis' clock minus ours, seconds (due times are Redis')
        self.group_keys_for: Callable[[Task], list[str]] = lambda task: []
        self.on_beat: Callable[[], Awaitable[None]] = _nothing

    # -- registry --------------------------------------------------------------------------

    async def register(self) -> None:
        cfg = self.config
        info = {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__,
                "labels": orjson.dumps(cfg.labels).decode(), "slots": cfg.max_concurrency,
                "running": 0, "started_at": f"{time.time():.3f}", "status": "up",
                "dead_after": cfg.dead_after}  # readers judge it by its own, not theirs
        await self.broker.redis.hset(self.keys.executor(self.id), mapping=info)
        await self._beat("register")
        await self.publish(self.id, "UP")

    async def mark(self, status: str) -> None:
        try:
            async with asyncio.timeout(STOP_DEADLINE):
                await self.broker.redis.hset(self.keys.executor(self.id), "status", status)
        except NETWORK_ERRORS as exc:  # TimeoutError is an OSError
            log.warning("could not update the registry", extra={"error": repr(exc)})

    async def deregister(self) -> None:
        try:
            async with asyncio.timeout(STOP_DEADLINE):
                async with self.broker.redis.pipeline(transaction=True) as pipe:
                    pipe.zrem(self.keys.executors, self.id)
                    pipe.delete(self.keys.executor(self.id))
                    await pipe.execute()
                await self.publish(self.id, "DOWN")
        except NETWORK_ERRORS as exc:  # TimeoutError is an OSError
            log.warning("could not deregister", extra={"error": repr(exc)})

    async def publish(self, executor: str, status: str) -> None:
        """A Eureka-shaped instance event on <queue_name>_registry, for discovery listeners."""
        metadata = {"executor_id": executor, "inbox": self.keys.inbox(executor),
                    "control": self.keys.control_inbox(executor),
                    "queue": self.keys.queue, "version": __version__}
        event = {"instanceId": executor, "hostName": socket.gethostname(), "app": "task-job",
                 "ipAddr": ip_address(), "status": status, "metadata": metadata}
        if executor != self.id:
            event["hostName"] = event["ipAddr"] = ""  # someone else's: host unknown here
            metadata["taken_over_by"] = self.id  # it died: this executor settled its tasks
        await self.broker.redis.publish(self.keys.registry, orjson.dumps(event))

    async def _beat(self, mode: str) -> bool:
        now_ms, present = await self.broker.call(
            "heartbeat", [self.keys.executors, self.keys.executor(self.id),
                          self.keys.taken_over(self.id)],
            [self.id, self.running_count(), mode])
        self.server_ms = int(now_ms)
        self.clock_offset = self.server_ms / 1000 - time.time()
        live = await self.broker.redis.zcount(
            self.keys.dispatchers, self.server_ms - self.config.dead_after * 1000, "+inf")
        if bool(live) != self.dispatched:
            log.info("a dispatcher serves the fleet: waiting on this executor's own queue" if live
                     else "no dispatcher: waiting on the shared queue", extra={"executor": self.id})
        self.dispatched = bool(live)
        if present == 2:
            log.error("this executor's registry entry is gone without a takeover mark: redis "
                      "lost its data; registering again, running tasks go on",
                      extra={"executor": self.id})
            await self.register()
            await self.on_data_lost()
        return bool(present)

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                async with self.broker.deadline():
                    present = await self._beat("beat")
                    await self.on_beat()
                if not present:
                    log.error("this executor was declared dead and its tasks taken over while "
                              "it was away; stopping its running tasks and registering again",
                              extra={"executor": self.id})
                    self.on_taken_over()
                    async with self.broker.deadline():
                        await self.register()
                self.link.up("heartbeat")
            except NETWORK_ERRORS as exc:
                self.link.down("heartbeat", exc)
            except Exception:  # a bug must not stop the heartbeat
                log.exception("heartbeat failed")

    # -- takeover --------------------------------------------------------------------------

    async def reaper_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval * (0.5 + random.random()))
            if self.link.connected_for() < self.config.dead_after:
                continue
            try:
                async with self.broker.deadline(self.config.redis_timeout * 2):
                    await self.reap()
            except NETWORK_ERRORS as exc:
                self.link.down("takeover", exc)
            except Exception:
                log.exception("takeover failed; retrying later")

    async def reap(self) -> int:
        """Take over every executor whose heartbeat is older than dead_after."""
        cutoff = self.server_ms - int(self.config.dead_after * 1000)
        stale = await self.broker.redis.zrangebyscore(self.keys.executors, "-inf", cutoff)
        taken = 0
        for member in stale:
            dead = member.decode()
            if dead != self.id:
                taken += await self.take_over(dead)
        return taken

    async def take_over(self, dead: str) -> int:
        keys = self.keys
        for _ in range(5):
            raws: list[bytes] = await self.broker.redis.lrange(keys.processing(dead), 0, -1)
            task_keys = [keys.task(peek_id(raw) or "-") for raw in raws]
            result = await self.broker.call(
                "takeover", [keys.executors, keys.processing(dead), keys.processing(self.id),
                             keys.executor(dead), keys.taken_over(dead), keys.inbox(dead),
                             keys.dispatch if self.dispatched else keys.queue, *task_keys],
                [dead, self.id, int(self.config.dead_after * 1000), MARK_TTL, *raws])
            if result == b"alive":
                return 0
            if result != b"changed":
                break
        else:
            return 0
        self.takeovers += 1
        log.warning("took over a dead executor", extra={"executor": self.id, "dead": dead,
                                                        "tasks": len(raws)})
        await self.publish(dead, "DOWN")
        await self.settle(raws, reason=f"its executor {dead} died")
        return 1

    # -- settling claims whose run was interrupted -----------------------------------------

    async def settle(self, raws: Iterable[bytes], reason: str,
                     skip: Callable[[str], bool] = lambda _: False) -> None:
        """Settle claims in this executor's processing list that no running task owns.

        Never begun -> back to the head of the queue (it never ran). Begun here -> `lost`, or
        requeued when the task opted in. Settled elsewhere -> dropped from the list.
        """
        processing = self.keys.processing(self.id)
        for raw in raws:
            task_id = peek_id(raw)
            if task_id is not None and skip(task_id):
                continue
            if task_id is None:
                await self.sink.deliver_now(self.sink.dead_letter(raw, "not a task (settled)"))
                continue
            state = await self.broker.redis.hgetall(self.keys.task(task_id))
            status = state.get(b"status", b"").decode()
            owner = state.get(b"executor", b"").decode()
            if not status or status == "cancel_requested":
                await self.broker.call("unclaim", [processing, self.keys.queue], [raw])
                log.info("claim returned to the queue", extra={"task_id": task_id})
            elif status == "running" and owner == self.id:
                await self._settle_lost(raw, task_id, state, reason)
            else:
                await self.broker.redis.lrem(processing, 1, raw)

    async def _settle_lost(self, raw: bytes, task_id: str, state: dict[bytes, bytes],
                           reason: str) -> None:
        try:
            task: Task | None = parse_task(raw)
        except ProtocolError:
            task = None
        attempt = int(state.get(b"attempt", b"1"))
        requeue = task is not None and (task.on_lost == "requeue" or "lost" in task.retry_on)
        if task is not None and requeue and attempt <= max(task.retries, 1):
            group = self.group_keys_for(task)[:2]
            await self.broker.call("requeue", [self.keys.processing(self.id), self.keys.queue,
                                               self.keys.task(task_id), *group], [raw, self.id, task_id])
            log.info("lost task requeued", extra={"task_id": task_id, "attempt": attempt})
            return
        head = RecordHead.of(task, self.id) if task else RecordHead(task_id, None, None, self.id)
        stream = self.sink.open_stream(head, int(state.get(b"seq", b"-1")) + 1)
        outcome = Outcome(Status.LOST, f"lost: {reason} before the task finished",
                          started_at=_float(state.get(b"started_at")),
                          extra={"attempt": attempt})
        await self.sink.deliver_now(self.sink.finish(
            stream, outcome, raw=raw, group_keys=self.group_keys_for(task) if task else ()))
        log.info("task lost", extra={"task_id": task_id, "status": "lost", "reason": reason})


async def _nothing() -> None:
    return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
