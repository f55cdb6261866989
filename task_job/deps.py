"""Dependencies: tasks that wait (state `waiting`) until the tasks they name succeed, and
whole DAGs submitted in one message (docs/protocol.md, Dependencies).

hold.lua puts a task to wait, registering it with each dependency not finished yet; the done
record of a dependency (finish.lua, lib_deps.lua) releases the tasks that wait for nothing
else onto their queues, or marks them to be cancelled when it did not succeed. A task that
waits past its depends_timeout, or is killed, is marked the same way; the movers in executors
and dispatchers write the `cancelled` done record of each marked task (`end_waiting`), once
(finish.lua's 'waiting' mode removes it from the waiting set in the same step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from task_job.errors import ProtocolError
from task_job.protocol import Outcome, RecordHead, Status, Task, parse_task

log = logging.getLogger(__name__)

END_BATCH = 100


def hold_values(task: Task, queue: str, now: float, default_timeout: float,
                due: float | None = None, message: bytes | None = None) -> list[Any]:
    """The six values of one task in hold.lua's ARGV."""
    timeout = task.depends_timeout or default_timeout
    return [task.id, queue, "" if due is None else repr(due), repr(now + timeout),
            message if message is not None else task.raw, orjson.dumps(list(task.depends_on))]


async def hold(broker: Any, tasks: Sequence[list[Any]], *, dag: str = "", dag_ids: Sequence[str] = (),
               claimed: bytes = b"", processing: str = "") -> tuple[str, str]:
    """hold.lua: ('ok'|'ready'|'known'|'unknown', id)."""
    keys = broker.keys
    args: list[Any] = [keys.prefix, f"{time.time():.6f}", claimed, dag, broker.config.task_ttl,
                       orjson.dumps(list(dag_ids))]
    for values in tasks:
        args += values
    verdict, detail = await broker.call("hold", [keys.scheduled, keys.scheduled_ids,
                                                 processing or keys.scheduled], args)
    return (verdict.decode() if isinstance(verdict, bytes) else str(verdict),
            detail.decode() if isinstance(detail, bytes) else str(detail))


def refuse(verdict: str, detail: str, task_id: str) -> None:
    """A submission hold.lua turned down, as the ProtocolError the submitter sees."""
    if verdict == "known":
        raise ProtocolError(f"task id {detail!r} is already known: an id runs at most once; "
                            "choose another", task_id)
    if verdict == "unknown":
        raise ProtocolError(f"the DAG depends on {detail!r}, which is neither in it nor known", task_id)


async def end_waiting(broker: Any, sink: Any, executor: str,
                      ended_hook: Callable[[bytes, bytes], None] | None = None) -> int:
    """Write the `cancelled` done record of each waiting task marked to end (timed out,
    a dependency that did not succeed, a kill); `ended_hook(message, done record)` is told
    of each (the executor's callbacks). Returns how many this call ended."""
    redis = broker.redis
    waiting, until, why = broker.keys.waiting
    sec, usec = await redis.time()
    now = float(sec) + float(usec) / 1e6
    ids = await redis.zrangebyscore(until, "-inf", now, start=0, num=END_BATCH)
    ended = 0
    for raw_id in ids:
        task_id = raw_id.decode()
        member, reason = await redis.hget(waiting, task_id), await redis.hget(why, task_id)
        if member is None:  # released or ended meanwhile
            await redis.zrem(until, task_id)
            continue
        message = member.split(b"\0", 2)[2]
        text = reason.decode() if reason else await _timeout_reason(broker, task_id)
        try:
            head = RecordHead.of(parse_task(message), executor)
        except ProtocolError:
            head = RecordHead(task_id, None, None, executor)
        stream = sink.open_stream(head)
        written = await sink.finish(stream, Outcome(Status.CANCELLED, f"cancelled: {text}"), raw=b"",
                                    mode="waiting", group_keys=broker.keys.waiting)
        if written:
            ended += 1
            log.info("waiting task cancelled", extra={"task_id": task_id, "reason": text})
            if ended_hook is not None and stream.done is not None:
                ended_hook(message, stream.done)
    return ended


async def _timeout_reason(broker: Any, task_id: str) -> str:
    """Why a task waited too long: the first dependency never seen, or one not finished."""
    redis = broker.redis
    deps = sorted(d.decode() for d in await redis.smembers(f"{broker.keys.prefix}waiting_on:{task_id}"))
    for dep in deps:
        if not await redis.exists(broker.keys.task(dep)):
            return f"dependency {dep} not seen within depends_timeout"
    if deps:
        return f"dependency {deps[0]} not finished within depends_timeout"
    return "depends_timeout passed"
