"""Cron and interval schedules, fired once per tick across the whole fleet.

A schedule lives in Redis (`{Q}:schedules`, by name); its next tick is its score in
`{Q}:schedule_due`. Every executor and dispatcher runs the same firing loop: it reads the due
schedules by Redis' clock, works out the ticks in Python (croniter, zoneinfo), and fires them
with fire.lua, which first checks that the schedule's score is still the tick it read
(compare-and-set). So whichever loop comes first fires the tick, each tick once, however many
loops run, die or join; the tick's task is then an ordinary task with the id `<name>:<tick>`.

DST, as Vixie cron users expect (docs/protocol.md, Schedules): a wall time that does not exist
(the spring gap) fires once, at the first instant after the gap; a wall time that occurs twice
(autumn) fires once, at its first occurrence, unless the minute or hour field starts with `*`
(such expressions follow real time and fire in both).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from task_job.errors import ProtocolError

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
OVERLAP = ("allow", "skip", "replace")
CATCH_UP = ("skip", "one", "all")
MAX_FIRE = 1000  # instances fired by one call (a long catch-up goes on in the next)
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class Schedule:
    """One schedule's definition (what `schedules` in config and `schedule add` give)."""

    name: str
    task: dict[str, Any]
    cron: str = ""
    every: int = 0
    timezone: str = "UTC"
    overlap: str = "skip"
    catch_up: str = "skip"
    catch_up_window: float = DAY
    jitter: float = 0.0
    misfire_grace: float = 60.0
    source: str = field(default="", compare=False)

    @property
    def timing(self) -> tuple[str, int, str]:
        """What decides the ticks: a change of it restarts the schedule from now."""
        return (self.cron, self.every, self.timezone)

    def to_json(self) -> bytes:
        return orjson.dumps({k: v for k, v in asdict(self).items()
                             if not (k in ("cron", "every", "source") and not v)})

    def next_tick(self, after: float) -> int:
        """The first tick strictly after `after` (unix seconds; ticks are whole seconds)."""
        if self.every:
            return (int(after) // self.every + 1) * self.every
        return cron_next(self.cron, self.timezone, after)

    def ticks(self, start: float, end: float) -> list[int]:
        """Ticks t with start <= t <= end, in order (at most MAX_FIRE + 1)."""
        out: list[int] = []
        t = self.next_tick(start - 1)
        while t <= end and len(out) <= MAX_FIRE:
            out.append(t)
            t = self.next_tick(t)
        return out


def _cron_fields(expr: str) -> tuple[str, bool]:
    """The expression croniter reads, and whether it has a leading seconds field. Quartz's
    `?` (no specific value) is read as `*`."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"cron: five fields (minute hour day month weekday), or six with a "
                         f"leading seconds field; got {len(fields)}")
    return " ".join("*" if f == "?" else f for f in fields), len(fields) == 6


def _follows_real_time(expr: str) -> bool:
    """Vixie cron's 'wildcard job': the minute or hour field starts with `*`."""
    fields, six = _cron_fields(expr)
    parts = fields.split()[1:] if six else fields.split()
    return parts[0].startswith("*") or parts[1].startswith("*")


def cron_next(expr: str, timezone: str, after: float) -> int:
    """The first tick of a cron expression strictly after `after`, in `timezone`."""
    from croniter import croniter

    fields, six = _cron_fields(expr)
    zone = ZoneInfo(timezone)
    real_time = _follows_real_time(expr)
    it = croniter(fields, datetime.fromtimestamp(int(after), zone), second_at_beginning=six)
    for _ in range(100_000):
        when: datetime = it.get_next(datetime)
        tick = int(when.timestamp())
        if tick <= after:
            continue
        if not real_time and _second_occurrence(when, zone):
            continue  # a repeated wall time fires once, at its first occurrence
        return tick
    raise ValueError(f"cron {expr!r} has no next time")


def _second_occurrence(when: datetime, zone: ZoneInfo) -> bool:
    """Whether this instant is the later of two with the same wall time (DST ending)."""
    wall = when.replace(tzinfo=None)
    first = wall.replace(tzinfo=zone, fold=0).timestamp()
    return first != when.timestamp() and wall.replace(tzinfo=zone, fold=1).timestamp() == when.timestamp()


def parse_schedule(obj: Any, where: str = "schedule", source: str = "") -> Schedule:
    """A schedule from its JSON shape, checked: one clear error naming the field."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: expected an object with name, cron or every, and task")
    unknown = set(obj) - {"name", "cron", "every", "timezone", "task", "overlap", "catch_up",
                          "catch_up_window", "jitter", "misfire_grace", "source"}
    if unknown:
        raise ProtocolError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    name = obj.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ProtocolError(f"{where}.name: 1-100 letters, digits, '_', '.', '-' (got {name!r})")
    where = f"{where} {name!r}"
    cron, every = obj.get("cron") or "", obj.get("every") or 0
    if bool(cron) == bool(every):
        raise ProtocolError(f"{where}: exactly one of cron and every")
    if cron:
        if not isinstance(cron, str):
            raise ProtocolError(f"{where}.cron: a string")
        try:
            from croniter import croniter

            fields, six = _cron_fields(cron)
            if not croniter.is_valid(fields, second_at_beginning=six):
                raise ValueError("not a valid expression")
            cron_next(cron, str(obj.get("timezone") or "UTC"), time.time())  # it fires at all
        except ZoneInfoNotFoundError:
            pass  # said below
        except ImportError:
            raise ProtocolError(f"{where}: cron schedules need croniter "
                                "(pip install 'task-job[schedule]')") from None
        except ValueError as exc:  # croniter's errors are ValueErrors too
            raise ProtocolError(f"{where}.cron {cron!r}: {exc}") from None
    if every and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ProtocolError(f"{where}.every: a whole number of seconds, at least 1")
    timezone = obj.get("timezone") or "UTC"
    try:
        ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise ProtocolError(f"{where}.timezone: unknown zone {timezone!r} (e.g. Europe/Berlin)") from None
    task = obj.get("task")
    if not isinstance(task, dict):
        raise ProtocolError(f"{where}.task: an object, the task part of a message")
    from task_job.protocol import parse_task

    try:  # as an executor reads each instance
        parse_task(orjson.dumps({"id": f"{name}:0", "task": task}))
    except ProtocolError as exc:
        raise ProtocolError(f"{where}.task: {exc.reason}") from None
    if task.get("depends_on"):
        raise ProtocolError(f"{where}.task: no depends_on (each tick's instance is new)")
    if task.get("enqueue_at") is not None or task.get("delay") is not None:
        raise ProtocolError(f"{where}.task: no enqueue_at or delay (the schedule says when; "
                            "use jitter to spread)")
    overlap = obj.get("overlap", "skip")
    if overlap not in OVERLAP:
        raise ProtocolError(f"{where}.overlap: one of {', '.join(OVERLAP)}")
    catch_up = obj.get("catch_up", "skip")
    if catch_up not in CATCH_UP:
        raise ProtocolError(f"{where}.catch_up: one of {', '.join(CATCH_UP)}")
    numbers = {}
    for key, default in (("catch_up_window", DAY), ("jitter", 0.0), ("misfire_grace", 60.0)):
        value = obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ProtocolError(f"{where}.{key}: seconds, 0 or more")
        numbers[key] = float(value)
    return Schedule(name=name, task=task, cron=cron, every=int(every), timezone=str(timezone),
                    overlap=overlap, catch_up=catch_up, source=str(obj.get("source") or source),
                    **numbers)


def plan(schedule: Schedule, first: int, now: float) -> tuple[list[int], int]:
    """The ticks to fire now, and the next tick to wait for, given the first tick not fired
    yet (`first`, at most `now`) and the catch-up policy. A tick is missed when its next
    tick has come too, or when it is older than misfire_grace."""
    start = max(float(first), now - schedule.catch_up_window)
    due = schedule.ticks(start, now)
    if len(due) > MAX_FIRE:  # a long catch-up: the rest in the next call
        return due[:MAX_FIRE], due[MAX_FIRE]
    after = schedule.next_tick(now)
    on_time = [t for t in due[-1:] if now - t <= schedule.misfire_grace]
    if schedule.catch_up == "all":
        return due, after
    if schedule.catch_up == "one":
        return due[-1:], after
    return on_time, after


def instance_message(schedule: Schedule, instance_id: str, due: float | None) -> bytes:
    task = dict(schedule.task)
    if due is not None:
        task["enqueue_at"] = due
    return orjson.dumps({"id": instance_id, "task": task, "submitted_by": f"schedule:{schedule.name}"})


class Scheduler:
    """Stores schedules in Redis and fires them (`fire_due`, called from the mover loop)."""

    def __init__(self, broker: Any, dispatched: Callable[[], bool] = lambda: False,
                 state_ttl: float = 7 * DAY) -> None:
        self.broker = broker
        self.keys = broker.keys
        self.dispatched = dispatched
        self.state_ttl = int(state_ttl)

    def queue_for(self, task: dict[str, Any]) -> str:
        """An instance's queue (Keys.queue_for)."""
        target = task.get("executor")
        return str(self.keys.queue_for(str(target) if target else None, bool(task.get("labels")),
                                       self.dispatched()))

    async def now(self) -> float:
        sec, usec = await self.broker.redis.time()
        return float(sec) + float(usec) / 1e6

    # -- storing ---------------------------------------------------------------------------

    async def put(self, schedule: Schedule, *, replace: bool = True) -> bool:
        """Store a schedule by name; a new one, or one whose timing changed, starts from its
        next tick after now (its missed ticks are not caught up). Returns False when one
        with this name exists and `replace` is off."""
        redis = self.broker.redis
        old = await self.get(schedule.name)
        if old is not None and not replace:
            return False
        if old is not None and old != schedule:
            log.warning("schedule redefined; this definition is used now", extra={
                "schedule": schedule.name, "was_from": old.source, "now_from": schedule.source})
        now = await self.now()
        state = self.keys.schedule(schedule.name)
        pipe = redis.pipeline(transaction=True)
        pipe.hset(self.keys.schedules, schedule.name, schedule.to_json())
        paused = await redis.hget(state, "paused") == b"1"
        if not paused:
            if old is None or old.timing != schedule.timing:
                pipe.zadd(self.keys.schedule_due, {schedule.name: schedule.next_tick(now)})
            else:
                pipe.zadd(self.keys.schedule_due, {schedule.name: schedule.next_tick(now)}, nx=True)
        await pipe.execute()
        return True

    async def get(self, name: str) -> Schedule | None:
        raw = await self.broker.redis.hget(self.keys.schedules, name)
        if raw is None:
            return None
        return parse_schedule(orjson.loads(raw))

    async def remove(self, name: str) -> bool:
        pipe = self.broker.redis.pipeline(transaction=True)
        pipe.hdel(self.keys.schedules, name)
        pipe.zrem(self.keys.schedule_due, name)
        pipe.delete(self.keys.schedule(name))
        return bool((await pipe.execute())[0])

    async def pause(self, name: str, paused: bool = True) -> bool:
        schedule = await self.get(name)
        if schedule is None:
            return False
        redis = self.broker.redis
        if paused:
            pipe = redis.pipeline(transaction=True)
            pipe.hset(self.keys.schedule(name), "paused", "1")
            pipe.zrem(self.keys.schedule_due, name)
            await pipe.execute()
        else:  # resumed from the next tick after now: what fell in the pause is not caught up
            pipe = redis.pipeline(transaction=True)
            pipe.hdel(self.keys.schedule(name), "paused")
            pipe.zadd(self.keys.schedule_due, {name: schedule.next_tick(await self.now())})
            await pipe.execute()
        return True

    async def listing(self) -> list[dict[str, Any]]:
        """Every schedule with next_run, last_run, last_id, last_status, paused, counts."""
        redis = self.broker.redis
        defs = await redis.hgetall(self.keys.schedules)
        rows = []
        for raw in sorted(defs.values()):
            try:
                schedule = parse_schedule(orjson.loads(raw))
            except ProtocolError as exc:
                rows.append({"name": orjson.loads(raw).get("name"), "error": exc.reason})
                continue
            rows.append(await self.row(schedule))
        return rows

    async def row(self, schedule: Schedule) -> dict[str, Any]:
        redis = self.broker.redis
        state = {k.decode(): v.decode() for k, v in
                 (await redis.hgetall(self.keys.schedule(schedule.name))).items()}
        next_run = await redis.zscore(self.keys.schedule_due, schedule.name)
        last_status = None
        if state.get("last_id"):
            task_state = await redis.hmget(self.keys.task(state["last_id"]), "status", "schedule")
            if task_state[0] is not None:
                last_status = task_state[0].decode()
            elif task_state[1] is not None:
                last_status = "queued"
        row: dict[str, Any] = orjson.loads(schedule.to_json())
        row.update(paused=state.get("paused") == "1", next_run=next_run,
                   last_run=float(state["last_run"]) if state.get("last_run") else None,
                   last_id=state.get("last_id"), last_status=last_status,
                   fired=int(state.get("fired", 0)), skipped=int(state.get("skipped", 0)))
        return row

    # -- firing ----------------------------------------------------------------------------

    async def fire_due(self) -> None:
        """Fire every schedule whose tick has come (by Redis' clock)."""
        redis = self.broker.redis
        now = await self.now()
        due = await redis.zrangebyscore(self.keys.schedule_due, "-inf", now, start=0, num=100,
                                        withscores=True)
        for name, score in due:
            name = name.decode()
            try:
                schedule = await self.get(name)
            except ProtocolError as exc:
                log.error("schedule unreadable; not fired", extra={"schedule": name, "reason": exc.reason})
                await redis.zrem(self.keys.schedule_due, name)
                continue
            if schedule is None:  # removed meanwhile
                await redis.zrem(self.keys.schedule_due, name)
                continue
            try:
                ticks, after = plan(schedule, int(score), now)
            except ValueError as exc:  # no next time (a date that never comes): stop it, loudly
                log.error("schedule has no next tick; paused", extra={"schedule": name, "reason": str(exc)})
                await self.pause(name)
                continue
            await self._fire(schedule, ticks, int(score), after, now)

    async def run_now(self, name: str, by: str | None = None) -> str | None:
        """Fire one instance at once, outside the ticks (id `<name>:run-<ms>`)."""
        schedule = await self.get(name)
        if schedule is None:
            return None
        now = await self.now()
        instance = f"{name}:run-{int(now * 1000)}"
        await self._call(schedule, [(instance, now, None)], expected="", after="", overlap="allow")
        return instance

    async def _fire(self, schedule: Schedule, ticks: list[int], first: int, after: int,
                    now: float) -> None:
        instances = []
        for tick in ticks:
            due = tick + random.uniform(0, schedule.jitter) if schedule.jitter else None
            instances.append((f"{schedule.name}:{tick}", float(tick), due if due and due > now else None))
        verdict, previous = await self._call(schedule, instances, expected=str(first),
                                             after=str(after), overlap=schedule.overlap)
        if verdict == "fired" and instances:
            log.info("schedule fired", extra={"schedule": schedule.name,
                                              "ticks": [i[0] for i in instances]})
        elif verdict == "skipped":
            log.info("schedule tick skipped: the last instance still runs",
                     extra={"schedule": schedule.name, "running": previous})
        if verdict == "fired" and previous and schedule.overlap == "replace":
            from task_job.protocol import build_control

            await self.broker.redis.rpush(self.keys.control,
                                          build_control(previous, by=f"schedule:{schedule.name}"))
            log.info("schedule replaces its running instance", extra={
                "schedule": schedule.name, "killed": previous})

    async def _call(self, schedule: Schedule, instances: list[tuple[str, float, float | None]],
                    *, expected: str, after: str, overlap: str) -> tuple[str, str]:
        keys = [self.keys.schedule_due, self.keys.schedule(schedule.name), self.keys.scheduled,
                self.keys.scheduled_ids]
        queue = self.queue_for(schedule.task)
        if queue == self.keys.queue and schedule.task.get("labels") and \
                await self.broker.redis.zcard(self.keys.dispatchers):
            queue = self.keys.dispatch  # (a client, or an executor yet to see the dispatcher)
        args: list[Any] = [schedule.name, expected, after, overlap, self.keys.task(""),
                           self.state_ttl, f"{time.time():.6f}"]
        for instance, tick, due in instances:
            args += [instance, repr(tick), queue, "" if due is None else repr(due),
                     instance_message(schedule, instance, due)]
        result = await self.broker.call("fire", keys, args)
        verdict, previous = (v.decode() if isinstance(v, bytes) else str(v) for v in result)
        return verdict, previous
