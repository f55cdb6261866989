"""`AsyncClient`: submit tasks, kill them, read and follow their records. Used by the CLI.

Talks to Redis through `Broker`'s key names; never runs tasks itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any

import orjson

from task_job.broker import BLOCK_MAX, Broker
from task_job.config import Config
from task_job.deps import hold, hold_values, refuse
from task_job.errors import ProtocolError
from task_job.protocol import (
    Dag,
    Record,
    Status,
    Task,
    build_control,
    build_task,
    parse_dag,
    parse_record,
    parse_task,
    peek_id,
    with_due,
)
from task_job.schedule import Scheduler

FINISHED = tuple(s.value for s in Status)
TASK_STATUSES = ("queued", "scheduled", "waiting", "unroutable", "running", *FINISHED)
PENDING = ("queued", "scheduled", "waiting", "unroutable")  # listed from their own keys
PAGE_MAX = 1000
RECENT_WINDOW = 10_000  # finished tasks examined for filters without an index (labels, time)


class AsyncClient:
    """Producer-side API of one queue.

    >>> async with AsyncClient(Config(redis_addr="127.0.0.1:6379")) as c:   # doctest: +SKIP
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
        self._pushes: list[tuple[str, bytes, str, float | None, asyncio.Future[Any], str | None]] = []
        self._flusher: asyncio.Future[None] | None = None
        self.scheduler = Scheduler(self.broker, state_ttl=config.task_ttl)  # schedules in Redis

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.broker.close()

    async def submit(
        self, cmdline: str, cmd_args: Sequence[str] = (), *, task_id: str | None = None,
        timeout: float | None = None, env: dict[str, str] | None = None, cwd: str | None = None,
        stdin: str | None = None, type: str | None = "start", tube: str | None = None,
        on_lost: str | None = None, labels: dict[str, Any] | None = None,
        executor: str | None = None, at: float | None = None, delay: float | None = None,
        depends_on: Sequence[str] | None = None, depends_timeout: float | None = None,
        group: str | None = None, name: str | None = None,
    ) -> str:
        """Push a task; returns its id. With `labels` it goes to the dispatcher queue, with
        `executor` to that executor's own queue, else onto the shared queue; with `at` (unix
        seconds) or `delay` (seconds, by Redis' clock) it is parked until then."""
        task_id = task_id or uuid.uuid4().hex
        if delay is not None:
            at = await self.server_time() + delay
        message = build_task(task_id, cmdline, tuple(cmd_args), type=type, tube=tube, timeout=timeout,
                             env=env, cwd=cwd, stdin=stdin, on_lost=on_lost, labels=labels,
                             executor=executor, enqueue_at=at, depends_on=depends_on,
                             depends_timeout=depends_timeout, group=group, name=name)
        # The executor's own checks, before anything is pushed: a message it would reject
        # (an id too long or with control characters, an oversize message) never leaves here.
        task = parse_task(message, self.config.max_message_bytes, self.config.label_max_bytes)
        await self._send(task, message, at)
        return task_id

    async def _send(self, task: Task, message: bytes, due: float | None) -> None:
        """A checked task on its way: held when it depends on others, else pushed (or parked
        until `due`) unless its id is known."""
        if task.depends_on:
            await self._hold(task, message, due)
        else:
            await self._push_new(task.id, message, await self.destination(task), due, task.group)

    async def _hold(self, task: Task, message: bytes, due: float | None) -> None:
        """A task with depends_on waits in the waiting set (hold.lua), never on a queue where
        an executor that does not know the field would run it at once."""
        verdict, detail = await hold(self.broker, [hold_values(
            task, await self.destination(task), await self.server_time(), self.config.depends_timeout,
            due=due, message=message)])
        refuse(verdict, detail, task.id)

    async def submit_dag(self, message: dict[str, Any], by: str | None = None) -> Dag:
        """A whole DAG (`{"id", "tasks": [...]}`), all-or-nothing: refused whole (naming the
        cycle, the id taken, or the dependency neither in it nor known) or held whole."""
        if by is not None:
            message = {**message, "submitted_by": by}
        dag = parse_dag(orjson.dumps(message), self.config.max_message_bytes, self.config.label_max_bytes)
        now = await self.server_time()
        values = []
        for task in dag.tasks:
            due, raw = task.enqueue_at, task.raw
            if task.delay is not None:
                due = now + task.delay
                raw = with_due(orjson.loads(task.raw), due)
            values.append(hold_values(task, await self.destination(task), now,
                                      self.config.depends_timeout, due=due, message=raw))
        verdict, detail = await hold(self.broker, values, dag=dag.id, dag_ids=[t.id for t in dag.tasks])
        refuse(verdict, detail, dag.id)
        return dag

    async def server_time(self) -> float:
        """Redis' clock: the one the fleet's due times are judged by."""
        sec, usec = await self.broker.redis.time()
        return float(sec) + float(usec) / 1e6

    async def destination(self, task: Task) -> str:
        """Where a task goes: a targeted one to its executor's own queue (or, that executor
        not registered, to the dispatcher queue, where it ends rejected after
        unroutable_after unless it registers; with no dispatcher either, refused here), a
        labelled one to the dispatcher queue; never onto the shared queue, where an executor
        that does not know these fields (an older one, the original) would run it anywhere."""
        if task.executor:
            redis = self.broker.redis
            if await redis.zscore(self.keys.executors, task.executor) is not None:
                return self.keys.inbox(task.executor)
            if not await redis.zcard(self.keys.dispatchers):
                raise ProtocolError(f"executor {task.executor!r} is not registered (and no "
                                    "dispatcher runs to wait for it)", task.id)
            return self.keys.dispatch
        if task.labels:
            return self.keys.dispatch
        return self.keys.queue

    async def _push_new(self, task_id: str, message: bytes, queue: str, due: float | None = None,
                        group: str | None = None) -> None:
        """Push unless the id is known (submit.lua: the check and the push in one script).
        Pushes made while one batch is on its way go together in the next (one round trip
        for many concurrent API submissions), each script applied on its own."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pushes.append((task_id, message, queue, due, future, group))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_pushes())
        known = await future
        if known:
            status = known.decode() if isinstance(known, bytes) else str(known)
            raise ProtocolError(f"task id {task_id!r} is already known ({status}): "
                                "an id runs at most once; choose another", task_id)

    async def submit_message(self, message: dict[str, Any], by: str | None = None) -> Task:
        """Validate a whole task message (the queue's JSON) as an executor will, refuse a
        known id, and push it; `by` (who submitted it) is written into the message."""
        if by is not None:
            message = {**message, "submitted_by": by}
        raw = orjson.dumps(message)
        task = parse_task(raw, self.config.max_message_bytes, self.config.label_max_bytes)
        due = task.enqueue_at
        if task.delay is not None:  # fixed now, by Redis' clock, so it is parked only once
            due = await self.server_time() + task.delay
            raw = with_due(message, due)
            task = parse_task(raw, self.config.max_message_bytes, self.config.label_max_bytes)
        await self._send(task, raw, due)
        return task

    async def _flush_pushes(self) -> None:
        """Send what is waiting, batch after batch, until nothing is (then return: the next
        push starts another flusher; asyncio runs nothing between the check and the return)."""
        sha = self.broker.scripts.sha["submit"]
        while self._pushes:
            batch, self._pushes = self._pushes, []
            commands = []
            for task_id, message, queue, due, _, group in batch:
                keys = [self.keys.task(task_id), queue, self.keys.scheduled, self.keys.scheduled_ids]
                args = [message, "" if due is None else repr(due), task_id]
                if group:  # a group's limit holds even against executors that do not know it
                    keys += [self.keys.groups, *self.keys.group_keys(group)]
                    args.append(group)
                commands.append(("EVALSHA", sha, len(keys), *keys, *args))
            try:
                results = await self.broker.send(self.broker.claim_lane, commands)
            except Exception as exc:  # each waiting submit raises it
                results = [exc] * len(batch)
            for (_, _, _, _, future, _), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def push_raw(self, message: bytes | str) -> None:
        """Push a message exactly as given (for compatibility tests and tools)."""
        await self.broker.redis.rpush(self.keys.queue, message)

    async def kill(self, task_id: str, by: str | None = None) -> None:
        """Ask the fleet to kill a task (or cancel it if it has not started)."""
        await self.broker.redis.rpush(self.keys.control, build_control(task_id, by=by))

    async def drain(self, executor: str, by: str | None = None, resume: bool = False) -> bool:
        """Ask one executor to stop claiming (its running tasks finish), or to claim again;
        False when no such executor is registered."""
        if await self.broker.redis.zscore(self.keys.executors, executor) is None:
            return False
        await self.broker.redis.rpush(self.keys.control_inbox(executor),
                                      build_control(executor, "resume" if resume else "drain", by))
        return True

    async def whereabouts(self, task_id: str) -> tuple[str, str]:
        """(kind, status) of an id: ('unknown', ''), ('pending', 'cancel_requested'),
        ('running', 'running'), ('finished', status)."""
        status = (await self.state(task_id)).get("status", "")
        if not status:
            if await self.broker.redis.hexists(self.keys.scheduled_ids, task_id):
                return "pending", "scheduled"
            return "unknown", ""
        if status in ("cancel_requested", "requeued", "retrying", "waiting"):
            return "pending", status
        if status == "running":
            return "running", status
        return "finished", status

    async def state(self, task_id: str) -> dict[str, str]:
        raw = await self.broker.redis.hgetall(self.keys.task(task_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def _states(self, task_ids: Iterable[str]) -> list[dict[str, str]]:
        """The state of each id, in one round trip."""
        pipe = self.broker.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(self.keys.task(task_id))
        return [{k.decode(): v.decode() for k, v in raw.items()} for raw in await pipe.execute()]

    async def records(self, task_id: str, *, follow: bool = False,
                      block: float = 1.0, after_seq: int = -1) -> AsyncGenerator[Record, None]:
        """A task's records from its stream; with follow, until (and including) `done`;
        those with a seq above `after_seq` only (a resumed reader's)."""
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
                    if record.seq <= after_seq:
                        continue
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
        """The registered executors, typed, with the age of their last heartbeat; `dead`
        when it is older than the executor's own dead_after (from its entry)."""
        redis = self.broker.redis
        now_ms = time.time() * 1000
        members = await redis.zrange(self.keys.executors, 0, -1, withscores=True)
        pipe = redis.pipeline(transaction=False)
        for member, _ in members:
            pipe.hgetall(self.keys.executor(member.decode()))
        infos = await pipe.execute() if members else []
        out = []
        for (member, score), info in zip(members, infos, strict=True):
            row = typed_executor({k.decode(): v.decode() for k, v in info.items()})
            row["id"] = member.decode()
            row["heartbeat_age_s"] = round((now_ms - score) / 1000, 3)
            dead_after = row.get("dead_after") or self.config.dead_after
            if row["heartbeat_age_s"] > dead_after:
                row["status"] = "dead"
            out.append(row)
        return out

    async def status(self, task_id: str) -> dict[str, Any] | None:
        """`task()`, by the name AsyncHttpClient and the sync Client use too."""
        return await self.task(task_id)

    def logs(self, task_id: str, *, follow: bool = False) -> AsyncGenerator[Record, None]:
        """`records()`, by the name the other clients use too."""
        return self.records(task_id, follow=follow)

    async def executor(self, executor: str) -> dict[str, Any] | None:
        return next((e for e in await self.executors() if e["id"] == executor), None)

    async def task(self, task_id: str, *, lines: int = 0) -> dict[str, Any] | None:
        """A task's state (typed) and its done record once finished; with `lines`, also its
        last lines of stdout and stderr (`stdout_last`, `stderr_last`), read in the same
        pass. None for an id nobody knows (or whose state has expired)."""
        state = await self.state(task_id)
        if not state:
            return None
        out = typed_state(task_id, state)
        done, last = await self._read_back(task_id, lines)
        if done is not None:
            out["done"] = done
        if lines:
            out.update(last)
        return out

    async def last_lines(self, task_id: str, lines: int) -> dict[str, list[str]]:
        """The last `lines` non-blank lines of a task's stdout and stderr, as
        {"stdout_last": [...], "stderr_last": [...]}."""
        return (await self._read_back(task_id, lines))[1]

    async def _read_back(self, task_id: str, lines: int) -> tuple[dict[str, Any] | None, dict[str, list[str]]]:
        """One pass over a task's records: its done record, and the tail of each stream
        (the last 64 KiB, enough for `lines` lines of any sensible length)."""
        done = None
        tail = {"stdout": b"", "stderr": b""}
        async for record in self.records(task_id):
            if record.is_done:
                done = record.fields
            elif lines and record.msg_type in tail:
                tail[record.msg_type] = (tail[record.msg_type] + record.payload)[-65536:]
        last = {f"{kind}_last": [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()][-lines:]
                if lines else [] for kind, data in tail.items()}
        return done, last

    async def tasks(self, *, status: str | None = None, executor: str | None = None,
                    labels: dict[str, str] | None = None, since: float | None = None,
                    until: float | None = None, cursor: str | None = None,
                    limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        """A page of tasks, newest first for finished ones, and the cursor of the next page.

        No keyspace scan: running tasks come from the executors' processing lists, queued
        ones from the queue (a page of it), finished ones from the finish-time indexes (one
        per status and per executor); a label or time filter reads at most RECENT_WINDOW
        finished tasks."""
        limit = max(1, min(limit, PAGE_MAX))
        if status is not None and status not in TASK_STATUSES:
            raise ValueError(f"status: one of {', '.join(TASK_STATUSES)}")
        kind, _, position = (cursor or "").partition(":")
        rows: list[dict[str, Any]] = []
        phases = ["running", *PENDING, "finished"] if status is None else \
            [status if status in ("running", *PENDING) else "finished"]
        for waiting in PENDING:
            if executor is not None and waiting in phases:
                phases.remove(waiting)  # no executor yet
        if kind:
            if kind not in phases or (kind in PENDING and position
                                      and not position.isdigit()):
                raise ValueError("cursor: not from this listing")
            if kind == "finished" and position:
                try:
                    float(position)
                except ValueError:
                    raise ValueError("cursor: not from this listing") from None
            phases = phases[phases.index(kind):]
        for phase in phases:
            want = limit - len(rows)
            start = position if phase == kind else ""
            if phase == "running":
                page, nxt = await self._running(executor, start, want)
            elif phase == "queued":
                page, nxt = await self._queued(start, want)
            elif phase == "unroutable":
                page, nxt = await self._unroutable(start, want)
            elif phase == "scheduled":
                page, nxt = await self._scheduled(start, want)
            elif phase == "waiting":
                page, nxt = await self._waiting(start, want)
            else:
                page, nxt = await self._finished(status, executor, start, want, since, until, labels)
            rows += [r for r in page if _labels_match(r, labels)] if phase != "finished" else page
            if nxt is not None:
                return rows, f"{phase}:{nxt}"
            if len(rows) >= limit:
                following = phases[phases.index(phase) + 1:]
                return rows, f"{following[0]}:" if following else None
        return rows, None

    async def _running(self, executor: str | None, start: str, want: int
                       ) -> tuple[list[dict[str, Any]], str | None]:
        redis = self.broker.redis
        if executor is not None:
            ids = [executor]
        else:
            ids = sorted(m.decode() for m in await redis.zrange(self.keys.executors, 0, -1))
        rows: list[dict[str, Any]] = []
        for ident in ids:
            if start and ident < start:
                continue
            claimed = [(task_id, raw) for raw in await redis.lrange(self.keys.processing(ident), 0, -1)
                       if (task_id := peek_id(raw)) is not None]
            for (task_id, raw), state in zip(claimed, await self._states(t for t, _ in claimed), strict=True):
                row = typed_state(task_id, state or {"status": "running", "executor": ident})
                row["message"] = _message(raw)
                rows.append(row)
            if len(rows) >= want and ident != ids[-1]:
                return rows, ids[ids.index(ident) + 1]
        return rows, None

    async def _queued(self, start: str, want: int) -> tuple[list[dict[str, Any]], str | None]:
        offset = int(start) if start.isdigit() else 0
        raws = await self.broker.redis.lrange(self.keys.queue, offset, offset + want - 1)
        rows = []
        for raw in raws:
            task_id = peek_id(raw)
            rows.append({"id": task_id, "status": "queued", "message": _message(raw)})
        return rows, (str(offset + want) if len(raws) == want else None)

    async def _scheduled(self, start: str, want: int) -> tuple[list[dict[str, Any]], str | None]:
        """Parked tasks, soonest due first: delayed ones, and retrying ones between attempts
        (`status` says which, from their state)."""
        offset = int(start) if start.isdigit() else 0
        members = await self.broker.redis.zrange(self.keys.scheduled, offset, offset + want - 1,
                                                 withscores=True)
        parked = [(task_id.decode(), raw, due) for member, due in members
                  for _, task_id, raw in [member.split(b"\0", 2)]]
        rows = []
        for (task_id, raw, due), state in zip(parked, await self._states(t for t, _, _ in parked), strict=True):
            row = typed_state(task_id, state)
            row.update(status="retrying" if state.get("status") == "retrying" else "scheduled",
                       due=due, message=_message(raw))
            rows.append(row)
        return rows, (str(offset + want) if len(members) == want else None)

    async def _waiting(self, start: str, want: int) -> tuple[list[dict[str, Any]], str | None]:
        """Tasks waiting for their dependencies, soonest to time out first, with the ids they
        still wait for (`waiting_on`) and when they are cancelled if still waiting (`due`)."""
        offset = int(start) if start.isdigit() else 0
        redis = self.broker.redis
        waiting, until, _ = self.keys.waiting
        members = await redis.zrange(until, offset, offset + want - 1, withscores=True)
        ids = [m.decode() for m, _ in members]
        pipe = redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(waiting, task_id)
            pipe.smembers(f"{self.keys.prefix}waiting_on:{task_id}")
        found = await pipe.execute()
        rows = []
        for i, ((task_id, due), state) in enumerate(zip(zip(ids, (d for _, d in members), strict=True),
                                                        await self._states(ids), strict=True)):
            member, on = found[2 * i], found[2 * i + 1]
            if member is None:
                continue  # released or ended meanwhile
            row = typed_state(task_id, state)
            row.update(status="waiting", due=due, waiting_on=sorted(d.decode() for d in on),
                       message=_message(member.split(b"\0", 2)[2]))
            rows.append(row)
        return rows, (str(offset + want) if len(members) == want else None)

    async def _unroutable(self, start: str, want: int) -> tuple[list[dict[str, Any]], str | None]:
        """Tasks no live executor matches, oldest first, with when they were found so."""
        offset = int(start) if start.isdigit() else 0
        members = await self.broker.redis.zrange(self.keys.unroutable, offset, offset + want - 1,
                                                 withscores=True)
        rows = [{"id": peek_id(raw), "status": "unroutable", "since": since,
                 "reason": "no live, non-draining executor matches its labels or executor",
                 "message": _message(raw)} for raw, since in members]
        return rows, (str(offset + want) if len(members) == want else None)

    async def _finished(self, status: str | None, executor: str | None, start: str, want: int,
                        since: float | None, until: float | None,
                        labels: dict[str, str] | None) -> tuple[list[dict[str, Any]], str | None]:
        redis = self.broker.redis
        if executor is not None:
            key = self.keys.recent_by(executor)
        else:
            key = self.keys.recent(status or "")
        top: str | float = "+inf"
        if start:
            top = "(" + start
        if until is not None and (not start or until < float(start)):
            top = until
        bottom: str | float = since if since is not None else "-inf"
        rows: list[dict[str, Any]] = []
        examined = 0
        while len(rows) < want and examined < RECENT_WINDOW:
            batch = await redis.zrange(key, top, bottom, desc=True, byscore=True,
                                       offset=0, num=min(want * 2, 500), withscores=True)
            if not batch:
                return rows, None
            pipe = redis.pipeline(transaction=False)
            for member, _ in batch:
                pipe.hgetall(self.keys.task(member.decode()))
                if labels:  # the labels are on the done record
                    pipe.xrevrange(self.keys.log(member.decode()), count=1)
            replies = await pipe.execute()
            states = replies[::2] if labels else replies
            dones = replies[1::2] if labels else [[]] * len(batch)
            for (member, score), state, done in zip(batch, states, dones, strict=True):
                examined += 1
                top = f"({score!r}"
                row = typed_state(member.decode(), {k.decode(): v.decode() for k, v in state.items()})
                if not state:  # expired since (the index is trimmed on the next finish)
                    continue
                if done:
                    row["done"] = parse_record(done[0][1][b"r"]).fields
                if status is not None and row.get("status") != status:
                    continue
                if labels and not _labels_match(row, labels):
                    continue
                rows.append(row)
                if len(rows) >= want:
                    return rows, repr(score)
        return rows, (str(top)[1:] if rows and examined >= RECENT_WINDOW else None)

    async def queues(self) -> dict[str, Any]:
        """Depths: the queue, each executor's processing list, scheduled tasks, dead letters."""
        redis = self.broker.redis
        executors = [m.decode() for m in await redis.zrange(self.keys.executors, 0, -1)]
        pipe = redis.pipeline(transaction=False)
        pipe.llen(self.keys.queue)
        pipe.llen(self.keys.control)
        pipe.zcard(self.keys.scheduled)
        pipe.llen(self.keys.dead)
        for ident in executors:
            pipe.llen(self.keys.processing(ident))
        pipe.llen(self.keys.dispatch)
        pipe.zcard(self.keys.unroutable)
        for ident in executors:
            pipe.llen(self.keys.inbox(ident))
        depths = await pipe.execute()
        return {"queue": {"name": self.keys.queue, "depth": depths[0]},
                "control": {"name": self.keys.control, "depth": depths[1]},
                "scheduled": {"depth": depths[2]},
                "dead": {"name": self.keys.dead, "depth": depths[3]},
                "dispatch": {"name": self.keys.dispatch, "depth": depths[4 + len(executors)],
                             "unroutable": depths[5 + len(executors)]},
                "executors": [{"executor": ident, "processing": n, "inbox": m} for ident, n, m in zip(
                    executors, depths[4:4 + len(executors)], depths[6 + len(executors):], strict=True)]}

    async def routing_stats(self) -> dict[str, float]:
        """Fleet-wide dispatcher counts: routed, rerouted, unroutable, placed_count,
        place_seconds, and the live dispatchers."""
        redis = self.broker.redis
        raw = await redis.hgetall(self.keys.dispatch_stats)
        out = {k.decode(): float(v) for k, v in raw.items()}
        sec, usec = await redis.time()
        out["dispatchers"] = await redis.zcount(
            self.keys.dispatchers, sec * 1000 + usec // 1000 - self.config.dead_after * 1000, "+inf")
        return out

    async def dead_letters(self, limit: int = 100, cursor: str | None = None
                           ) -> tuple[list[dict[str, Any]], str | None]:
        """Dead letters, oldest first, each with a stable id (the SHA-1 of the entry: a list
        index would shift as entries come and go) and its reason."""
        offset = int(cursor) if cursor and cursor.isdigit() else 0
        limit = max(1, min(limit, PAGE_MAX))
        raws = await self.broker.redis.lrange(self.keys.dead, offset, offset + limit - 1)
        rows = [dead_row(raw) for raw in raws]
        return rows, (str(offset + limit) if len(raws) == limit else None)

    async def requeue_dead(self, dead_id: str, by: str | None = None) -> dict[str, Any] | None:
        """Put a dead-lettered message back on the queue (after a fix); None when no entry
        has that id (requeued already, or trimmed)."""
        for raw in await self.broker.redis.lrange(self.keys.dead, 0, -1):
            if hashlib.sha1(raw).hexdigest() != dead_id:
                continue
            row = dead_row(raw)
            message = row.get("message")
            if not isinstance(message, str) or row.get("truncated") or row.get("encoding"):
                raise ProtocolError("this dead letter holds no whole message to requeue")
            done = await self.broker.call("requeue_dead", [self.keys.dead, self.keys.queue],
                                          [raw, message])
            return row if done else None
        return None


def dead_row(raw: bytes) -> dict[str, Any]:
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        entry = {"reason": "unreadable entry"}
    if not isinstance(entry, dict):
        entry = {"reason": "unreadable entry"}
    row: dict[str, Any] = {"id": hashlib.sha1(raw).hexdigest(), "reason": entry.get("reason"),
                           "executor": entry.get("executor"), "ts": entry.get("ts"),
                           "size": entry.get("size"), "message": entry.get("raw")}
    for key in ("truncated", "encoding"):
        if entry.get(key):
            row[key] = entry[key]
    return row


_FLOATS = ("claimed_at", "started_at", "finished_at", "heartbeat_age_s", "dead_after", "next_at",
           "kill_requested_at")
_INTS = ("attempt", "seq", "pid", "exit_code", "running", "slots", "max_concurrency")


def typed_state(task_id: str, state: dict[str, str]) -> dict[str, Any]:
    """A state hash as JSON-typed values (numbers as numbers, "" as null); no claim token."""
    out: dict[str, Any] = {"id": task_id}
    for key, value in state.items():
        if key == "claim":
            continue
        out[key] = _typed(key, value)
    return out


def typed_executor(info: dict[str, str]) -> dict[str, Any]:
    return {key: _typed(key, value) for key, value in info.items()}


def _typed(key: str, value: str) -> Any:
    if value == "":
        return None
    try:
        if key in _INTS:
            return int(value)
        if key in _FLOATS:
            return float(value)
    except ValueError:
        return value
    if key in ("labels", "command") and value.startswith("["):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _message(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def _labels_match(row: dict[str, Any], labels: dict[str, str] | None) -> bool:
    """`labels.KEY=VALUE` filters: against the message's `labels` object, or its `type` and
    `tube` (the original's labels), or the done record's."""
    if not labels:
        return True
    sources = [row.get("message"), row.get("done")]
    return all(any(_label(src, key) == value for src in sources) for key, value in labels.items())


def _label(source: Any, key: str) -> str | None:
    """A label of a message or record: from its `labels` object, else its own field."""
    if not isinstance(source, dict):
        return None
    own = source.get("labels")
    if isinstance(own, dict) and key in own:
        return str(own[key])
    return str(source[key]) if key in source else None
