"""`Client`: submit tasks, kill them, read and follow their records. Used by the CLI.

Talks to Redis through `Broker`'s key names; never runs tasks itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from task_job.broker import BLOCK_MAX, Broker
from task_job.config import Config
from task_job.errors import ProtocolError
from task_job.protocol import Record, build_control, build_task, parse_record, parse_task


class Client:
    """Producer-side API of one queue.

    >>> async with Client(Config(redis_addr="127.0.0.1:6379")) as c:   # doctest: +SKIP
    ...     task_id = await c.submit("install.sh", ["feature/homestead"], timeout=3600)
    ...     done = await c.wait(task_id)
    """

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        config = config or Config()
        if overrides:
            from dataclasses import replace
            config = replace(config, **overrides)
        self.config = config
        # Retries, unlike the executor: a push repeated after a lost reply at worst makes a
        # duplicate id, which executors dead-letter and never run twice.
        self.broker = Broker(config, retries=3, socket_timeout=config.redis_timeout + BLOCK_MAX)
        self.keys = self.broker.keys

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.broker.close()

    async def submit(
        self, cmdline: str, cmd_args: Sequence[str] = (), *, task_id: str | None = None,
        timeout: float | None = None, env: dict[str, str] | None = None, cwd: str | None = None,
        stdin: str | None = None, type: str | None = "start", tube: str | None = None,
        on_lost: str | None = None,
    ) -> str:
        """Push a task (RPUSH onto the queue); returns its id."""
        task_id = task_id or uuid.uuid4().hex
        message = build_task(task_id, cmdline, tuple(cmd_args), type=type, tube=tube, timeout=timeout,
                             env=env, cwd=cwd, stdin=stdin, on_lost=on_lost)
        # The executor's own checks, before anything is pushed: a message it would reject
        # (an id too long or with control characters, an oversize message) never leaves here.
        parse_task(message, self.config.max_message_bytes, self.config.label_max_bytes)
        status = await self.broker.redis.hget(self.keys.task(task_id), "status")
        if status is not None and status != b"cancel_requested":  # a kill waiting for it is fine
            raise ProtocolError(f"task id {task_id!r} is already known ({status.decode()}): "
                                "an id runs at most once; choose another", task_id)
        await self.broker.redis.rpush(self.keys.queue, message)
        return task_id

    async def push_raw(self, message: bytes | str) -> None:
        """Push a message exactly as given (for compatibility tests and tools)."""
        await self.broker.redis.rpush(self.keys.queue, message)

    async def kill(self, task_id: str) -> None:
        """Ask the fleet to kill a task (or cancel it if it has not started)."""
        await self.broker.redis.rpush(self.keys.control, build_control(task_id))

    async def whereabouts(self, task_id: str) -> tuple[str, str]:
        """(kind, status) of an id: ('unknown', ''), ('pending', 'cancel_requested'),
        ('running', 'running'), ('finished', status)."""
        status = (await self.state(task_id)).get("status", "")
        if not status:
            return "unknown", ""
        if status in ("cancel_requested", "requeued"):
            return "pending", status
        if status == "running":
            return "running", status
        return "finished", status

    async def state(self, task_id: str) -> dict[str, str]:
        raw = await self.broker.redis.hgetall(self.keys.task(task_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def records(self, task_id: str, *, follow: bool = False,
                      block: float = 1.0) -> AsyncIterator[Record]:
        """A task's records from its stream; with follow, until (and including) `done`."""
        key = self.keys.log(task_id)
        last = b"0-0"
        while True:
            reply = await self.broker.redis.xread({key: last}, count=1000,
                                                  block=int(block * 1000) if follow else None)
            if not reply:
                if not follow:
                    return
                continue
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    record = parse_record(fields[b"r"])
                    yield record
                    if record.is_done:
                        return

    async def wait(self, task_id: str, timeout: float | None = None) -> Record:
        """Wait for a task's done record and return it."""
        async with asyncio.timeout(timeout):
            async for record in self.records(task_id, follow=True):
                if record.is_done:
                    return record
        raise AssertionError("unreachable")  # pragma: no cover

    async def executors(self) -> list[dict[str, Any]]:
        """The registered executors with the age of their last heartbeat."""
        redis = self.broker.redis
        now_ms = time.time() * 1000
        out = []
        for member, score in await redis.zrange(self.keys.executors, 0, -1, withscores=True):
            ident = member.decode()
            info = await redis.hgetall(self.keys.executor(ident))
            row: dict[str, Any] = {k.decode(): v.decode() for k, v in info.items()}
            row["id"] = ident
            row["heartbeat_age_s"] = round((now_ms - score) / 1000, 3)
            if row["heartbeat_age_s"] > self.config.dead_after:
                row["status"] = "dead"
            out.append(row)
        return out
