"""`create_app(service)`: the routes of /api/v1, /healthz, /readyz and /metrics, with token
auth and JSON errors. Reads and writes Redis only through `AsyncClient` (task_job.client)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from task_job import __version__
from task_job.api import facade
from task_job.api.auth import Principal, Tokens
from task_job.catalogue import Catalogue, CatalogueFile
from task_job.client import TASK_STATUSES, AsyncClient
from task_job.config import Config
from task_job.confine import Policy
from task_job.errors import BrokerError, ConfinementError, ProtocolError
from task_job.protocol import Task, is_dag, parse_dag, parse_task

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WAIT_MAX = 3600.0  # seconds a `?wait=` may ask for
KEEPALIVE = 15.0  # seconds between SSE comments on a quiet stream


@dataclass
class Service:
    """What the routes need: the client, the config, the tokens, the confinement policy (for
    `allow`), and the executor when this API is served by one (readiness, metrics, drain)."""

    client: AsyncClient
    config: Config
    tokens: Tokens
    policy: Policy
    executor: Any = None
    started: float = field(default_factory=time.monotonic)
    _snapshot: tuple[float, bytes] = (0.0, b"")  # the fleet snapshot events share (when, JSON)
    _snapshot_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _catalogue: CatalogueFile | None = None

    @property
    def catalogue(self) -> Catalogue:
        """The executor's catalogue, or (the API alone) the config's file, read on change."""
        if self.executor is not None:
            return self.executor.catalogue  # type: ignore[no-any-return]
        if self._catalogue is None:
            self._catalogue = CatalogueFile(self.config.catalogue)
        return self._catalogue.current()

    async def snapshot(self, max_age: float) -> bytes:
        """The executors and the queues' depths, read at most once per `max_age` seconds
        however many streams ask (one read serves every console watching)."""
        async with self._snapshot_lock:
            at, data = self._snapshot
            if time.monotonic() - at >= max_age or not data:
                executors, queues = await self.client.executors(), await self.client.queues()
                data = orjson.dumps({"executors": executors, "queues": queues, "at": time.time()})
                self._snapshot = (time.monotonic(), data)
            return data


SERVICE = web.AppKey("service", Service)
# Who a request acts as; a typed key where this aiohttp has them (3.12+).
PRINCIPAL: Any = web.RequestKey("principal", Principal) if hasattr(web, "RequestKey") else "principal"


class ApiError(Exception):
    """An error reply: {"error": {"code", "message", "field"?}}."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def _error_body(code: str, message: str, field: str | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return orjson.dumps({"error": error})


def json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def scope(name: str | None) -> Callable[[Handler], Handler]:
    """The scope a route needs (None: none, /healthz)."""
    def mark(handler: Handler) -> Handler:
        handler.scope = name  # type: ignore[attr-defined]
        return handler
    return mark


_FIELD = re.compile(r"'((?:task\.)?[a-z_]+(?:\.[A-Za-z0-9_]+)*)'")


def field_of(reason: str) -> str | None:
    """The key a protocol error names ("missing 'task.cmdline'" -> task.cmdline)."""
    found = _FIELD.search(reason)
    return found.group(1) if found else None


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.Response(body=_error_body(exc.code, exc.message, exc.field), status=exc.status,
                            content_type="application/json")
    except web.HTTPException as exc:  # aiohttp's own: 404 for a route, 405 for a method
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "error")
        return web.Response(body=_error_body(code, exc.reason), status=exc.status,
                            content_type="application/json", headers={
                                k: v for k, v in exc.headers.items() if k == "Allow"})
    except (ConnectionError, TimeoutError, OSError, RedisConnectionError, RedisTimeoutError,
            BrokerError) as exc:
        log.warning("api: redis unavailable", extra={"error": repr(exc), "path": request.path})
        return web.Response(body=_error_body("unavailable", "redis is unavailable; retry"),
                            status=503, content_type="application/json",
                            headers={"Retry-After": "1"})
    except Exception:  # a bug: logged with its traceback, answered without one
        log.exception("api: internal error", extra={"path": request.path})
        return web.Response(body=_error_body("internal", "internal error (logged)"), status=500,
                            content_type="application/json")


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[SERVICE]
    route_handler = request.match_info.handler
    needed = getattr(route_handler, "scope", "read")
    if needed is None or (needed == "metrics" and service.config.metrics_public) or \
            (needed == "read" and getattr(route_handler, "public", False)):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    kind, _, presented = header.partition(" ")
    principal = service.tokens.check(presented.strip()) if kind.lower() == "bearer" else None
    if principal is None and not header and service.config.facade_token and \
            getattr(route_handler, "facade", False):
        principal = service.tokens.named(service.config.facade_token)  # celery-service's callers
    if principal is None:
        raise ApiError(401, "unauthorized", "a valid token is required: Authorization: Bearer <token>")
    if needed != "any" and not principal.may("read" if needed == "metrics" else needed):
        raise ApiError(403, "forbidden", f"token {principal.name!r} lacks the {needed!r} scope")
    request[PRINCIPAL] = principal
    return await handler(request)


def principal_of(request: web.Request) -> Principal:
    p = request.get(PRINCIPAL)
    assert isinstance(p, Principal)
    return p


def who(request: web.Request) -> str:
    """Who did it, for the task's state, done record and the log: the token's name."""
    return f"token:{principal_of(request).name}"


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid", f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid", "body must be a JSON object (the queue's task message)")
    return body


def _number(request: web.Request, name: str, default: float | None = None,
            maximum: float | None = None) -> float | None:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ApiError(400, "invalid", f"{name}: expected a number", name) from None
    if value < 0 or value != value or (maximum is not None and value > maximum):
        raise ApiError(400, "invalid", f"{name}: between 0 and {maximum or 'any'}", name)
    return value


# -- health ------------------------------------------------------------------------------

@scope(None)
async def healthz(request: web.Request) -> web.Response:
    return json({"status": "ok", "version": __version__})


@scope("read")
async def readyz(request: web.Request) -> web.Response:
    """Ready: Redis answers, and (served by an executor) it is claiming — the claim loop
    asked Redis recently or every slot is busy — and not drained."""
    service = request.app[SERVICE]
    checks: dict[str, Any] = {}
    try:
        async with asyncio.timeout(service.config.redis_timeout):
            await service.client.broker.redis.ping()
        checks["redis"] = "ok"
    except (ConnectionError, TimeoutError, OSError, RedisConnectionError, RedisTimeoutError) as exc:
        checks["redis"] = f"unavailable: {exc}"
    ex = service.executor
    if ex is not None:
        stale = time.monotonic() - ex.last_claim_poll
        window = 1.0 + service.config.redis_timeout + 1.0
        if ex.draining:
            checks["claiming"] = "drained"
        elif len(ex.running) >= service.config.max_concurrency or stale <= window:
            checks["claiming"] = "ok"
        else:
            checks["claiming"] = f"no claim for {stale:.1f}s"
    ready = all(v == "ok" for v in checks.values())
    return json({"ready": ready, "checks": checks}, 200 if ready else 503)


# -- tasks -------------------------------------------------------------------------------

@scope("submit")
async def submit(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await _body(request)
    wait = _number(request, "wait", None, WAIT_MAX)
    body.setdefault("id", uuid.uuid4().hex)
    body.pop("submitted_by", None)  # set here, from the token: never the caller's word
    principal = principal_of(request)
    if is_dag(body):
        return await _submit_dag(request, service, principal, body)
    facade.with_entry_labels(service, body)
    try:
        if principal.allow:  # checked before anything is pushed
            _admit(service, principal, parse_task(orjson.dumps(body), service.config.max_message_bytes,
                                                  service.config.label_max_bytes))
        task = await service.client.submit_message(body, by=who(request))
    except ProtocolError as exc:
        raise _refused(exc) from exc
    log.info("task submitted", extra={"task_id": task.id, "by": who(request)})
    if wait is None:
        return json({"id": task.id, "status": "queued"}, 202)
    try:
        done = await service.client.wait(task.id, timeout=wait)
    except TimeoutError:
        return json({"id": task.id, "status": "pending",
                     "message": f"not done within {wait:g}s"}, 202)
    return json({"id": task.id, **(await _result(service.client, task.id, done.fields))}, 200)


def _refused(exc: ProtocolError) -> ApiError:
    """A submission the client turned down: 409 for an id already known, else 400 naming
    the field."""
    if "already known" in exc.reason:
        return ApiError(409, "conflict", exc.reason, "id")
    return ApiError(400, "invalid", exc.reason, field_of(exc.reason))


async def _submit_dag(request: web.Request, service: Service, principal: Principal,
                      body: dict[str, Any]) -> web.Response:
    """A whole DAG, all-or-nothing (docs/protocol.md, Dependencies); every task admitted by
    the token's allow globs before anything is held."""
    try:
        dag = parse_dag(orjson.dumps(body), service.config.max_message_bytes, service.config.label_max_bytes)
        if principal.allow:
            for task in dag.tasks:
                _admit(service, principal, task)
        await service.client.submit_dag(body, by=who(request))
    except ProtocolError as exc:
        raise _refused(exc) from exc
    log.info("DAG submitted", extra={"task_id": dag.id, "tasks": len(dag.tasks), "by": who(request)})
    return json({"id": dag.id, "status": "accepted", "tasks": [t.id for t in dag.tasks]}, 202)


def _admit(service: Service, principal: Principal, task: Task) -> None:
    """A token with `allow` globs may submit only commands they match: the file confinement
    resolves the command line to (so `teamA/../teamB/x.sh` and `bash teamA/...` reaching
    another script are judged by where they really lead)."""
    if task.name is not None:  # a catalogue entry: the allow globs judge its name
        if not principal.admits(task.name):
            raise ApiError(403, "forbidden", f"token {principal.name!r} may not run {task.name!r}", "task.name")
        return
    try:
        target = service.policy.target(list(task.argv), task.cwd)
    except ConfinementError as exc:
        raise ApiError(400, "rejected", f"rejected: {exc}", "task.cmdline") from exc
    if not principal.admits(target):
        raise ApiError(403, "forbidden", f"token {principal.name!r} may not run {target!r}",
                       "task.cmdline")


async def _result(client: AsyncClient, task_id: str, done: dict[str, Any]) -> dict[str, Any]:
    """The done record with the last stdout and stderr lines (celery-service's sync mode)."""
    last = await client.last_lines(task_id, 1)
    return {"status": done.get("status"), "done": done,
            "stdout_last": (last["stdout_last"] or [""])[0], "stderr_last": (last["stderr_last"] or [""])[0]}


@scope("read")
async def list_tasks(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in TASK_STATUSES:
        raise ApiError(400, "invalid", f"status: one of {', '.join(TASK_STATUSES)}", "status")
    labels = {k[len("labels."):]: v for k, v in q.items() if k.startswith("labels.")}
    limit = int(_number(request, "limit", 100, 1000) or 100)
    try:
        rows, cursor = await service.client.tasks(
            status=status, executor=q.get("executor") or None, labels=labels or None,
            since=_number(request, "since"), until=_number(request, "until"),
            cursor=q.get("cursor") or None, limit=max(limit, 1))
    except ValueError as exc:
        name = str(exc).split(":", 1)[0]
        raise ApiError(400, "invalid", str(exc), name) from exc
    return json({"tasks": rows, "next": cursor})


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["id"]
    if not task_id or len(task_id) > 256 or not task_id.isprintable():
        raise ApiError(400, "invalid", "id: a printable id of at most 256 characters", "id")
    return task_id


@scope("read")
async def get_task(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    found = await request.app[SERVICE].client.task(task_id)
    if found is None:
        raise ApiError(404, "not_found", f"no task {task_id!r} (never seen, or expired)")
    return json(found)


@scope("kill")
async def kill_task(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    task_id = _task_id(request)
    kind, status = await service.client.whereabouts(task_id)
    if kind == "unknown":
        raise ApiError(404, "not_found", f"no task {task_id!r} has been claimed; a queued task "
                       "can be cancelled once known, or removed by its producer")
    if kind == "finished":
        raise ApiError(409, "finished", f"task {task_id!r} has already finished ({status})")
    await service.client.kill(task_id, by=who(request))
    log.info("kill requested", extra={"task_id": task_id, "by": who(request)})
    return json({"id": task_id, "kill": "requested", "status": status}, 202)


async def _sse_open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response


@scope("read")
async def task_logs(request: web.Request) -> web.StreamResponse:
    """The task's records; `?follow=1` as Server-Sent Events until the done record, each
    event's id its seq, so a reconnect with Last-Event-ID resumes without gap or repeat."""
    service = request.app[SERVICE]
    task_id = _task_id(request)
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    after = request.headers.get("Last-Event-ID") or request.query.get("after") or "-1"
    try:
        after_seq = int(after)
    except ValueError:
        raise ApiError(400, "invalid", "Last-Event-ID: a record seq", "Last-Event-ID") from None
    if not follow:
        if not await service.client.state(task_id):
            raise ApiError(404, "not_found", f"no task {task_id!r}")
        rows = [r.fields async for r in service.client.records(task_id, after_seq=after_seq)]
        return json({"id": task_id, "records": rows})
    response = await _sse_open(request)
    records = service.client.records(task_id, follow=True, block=KEEPALIVE, after_seq=after_seq)
    try:
        while True:
            try:
                record = await asyncio.wait_for(anext(records), KEEPALIVE + 5)
            except StopAsyncIteration:
                break
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(b"id: %d\nevent: %s\ndata: %s\n\n" % (
                record.seq, record.msg_type.encode(), orjson.dumps(record.fields)))
            if record.is_done:
                break
    finally:
        await records.aclose()
    return response


@scope("read")
async def events(request: web.Request) -> web.StreamResponse:
    """Task state changes and executor UP/DOWN across the fleet, as Server-Sent Events; with
    `?snapshot=SECONDS` (1-60), also a `fleet` event that often: the executors (with their
    heartbeat age and status) and the queues' depths, so a console needs no polling."""
    service = request.app[SERVICE]
    keys = service.client.keys
    every = _number(request, "snapshot", None, 60)
    if every is not None and every < 1:
        raise ApiError(400, "invalid", "snapshot: seconds, 1 to 60", "snapshot")
    pubsub = service.client.broker.redis.pubsub()
    await pubsub.subscribe(keys.events, keys.registry)
    try:  # both subscriptions confirmed before the stream opens: no event missed after it
        confirmed = 0
        async with asyncio.timeout(service.config.redis_timeout):
            while confirmed < 2:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    confirmed += 1
    except BaseException:
        await pubsub.aclose()
        raise
    response = await _sse_open(request)
    try:
        await response.write(b": subscribed\n\n")
        quiet = time.monotonic()
        next_snapshot = time.monotonic()
        while True:
            now = time.monotonic()
            if every is not None and now >= next_snapshot:
                await response.write(b"event: fleet\ndata: %s\n\n" % await service.snapshot(every * 0.9))
                next_snapshot = now + every
            wait = KEEPALIVE if every is None else max(0.0, min(KEEPALIVE, next_snapshot - now))
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if message is None:
                if time.monotonic() - quiet >= KEEPALIVE:
                    await response.write(b": keep-alive\n\n")
                    quiet = time.monotonic()
                continue
            quiet = time.monotonic()
            kind = b"task" if message["channel"] == keys.events.encode() else b"executor"
            await response.write(b"event: %s\ndata: %s\n\n" % (kind, message["data"]))
    finally:
        await pubsub.aclose()


@scope("any")
async def whoami(request: web.Request) -> web.Response:
    """The token's name, scopes and allow globs (any valid token): what a console may show."""
    principal = principal_of(request)
    return json({"name": principal.name, "scopes": sorted(principal.scopes), "allow": list(principal.allow)})


# -- executors, queues, dead letters ------------------------------------------------------

@scope("read")
async def list_executors(request: web.Request) -> web.Response:
    return json({"executors": await request.app[SERVICE].client.executors()})


@scope("read")
async def get_executor(request: web.Request) -> web.Response:
    ident = request.match_info["id"]
    found = await request.app[SERVICE].client.executor(ident)
    if found is None:
        raise ApiError(404, "not_found", f"no executor {ident!r} is registered")
    return json(found)


async def _drain(request: web.Request, resume: bool) -> web.Response:
    service = request.app[SERVICE]
    ident = request.match_info["id"]
    if not await service.client.drain(ident, by=who(request), resume=resume):
        raise ApiError(404, "not_found", f"no executor {ident!r} is registered")
    log.info("resume requested" if resume else "drain requested",
             extra={"executor": ident, "by": who(request)})
    return json({"id": ident, "requested": "resume" if resume else "drain"}, 202)


@scope("admin")
async def drain(request: web.Request) -> web.Response:
    return await _drain(request, resume=False)


@scope("admin")
async def resume(request: web.Request) -> web.Response:
    return await _drain(request, resume=True)


@scope("read")
async def queues(request: web.Request) -> web.Response:
    return json(await request.app[SERVICE].client.queues())


@scope("read")
async def dead(request: web.Request) -> web.Response:
    limit = int(_number(request, "limit", 100, 1000) or 100)
    rows, cursor = await request.app[SERVICE].client.dead_letters(
        max(limit, 1), request.query.get("cursor") or None)
    return json({"dead": rows, "next": cursor})


@scope("admin")
async def requeue(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    dead_id = request.match_info["id"]
    if not re.fullmatch(r"[0-9a-f]{40}", dead_id):
        raise ApiError(400, "invalid", "id: a dead letter's id (40 hex digits)", "id")
    try:
        row = await service.client.requeue_dead(dead_id, by=who(request))
    except ProtocolError as exc:
        raise ApiError(409, "not_requeueable", exc.reason) from exc
    if row is None:
        raise ApiError(404, "not_found", f"no dead letter {dead_id} (requeued already, or trimmed)")
    log.info("dead letter requeued", extra={"dead_id": dead_id, "by": who(request)})
    return json({"id": dead_id, "requeued": True}, 202)


# -- schedules (docs/protocol.md, Schedules) -------------------------------------------------

@scope("read")
async def list_schedules(request: web.Request) -> web.Response:
    return json({"schedules": await request.app[SERVICE].client.scheduler.listing()})


@scope("admin")
async def add_schedule(request: web.Request) -> web.Response:
    """A schedule runs its task on every tick, unattended: admin scope."""
    from task_job.schedule import parse_schedule

    service = request.app[SERVICE]
    body = await _body(request)
    body.pop("source", None)  # set here, from the token
    try:
        schedule = parse_schedule(body, source=who(request))
    except ProtocolError as exc:
        raise ApiError(400, "invalid", exc.reason, field_of(exc.reason)) from exc
    replace = request.query.get("replace", "") in ("1", "true", "yes")
    if not await service.client.scheduler.put(schedule, replace=replace):
        raise ApiError(409, "conflict", f"schedule {schedule.name!r} exists (?replace=1 redefines it)", "name")
    log.info("schedule added", extra={"schedule": schedule.name, "by": who(request)})
    return json(await service.client.scheduler.row(schedule), 201)


async def _schedule(request: web.Request) -> Any:
    from task_job.errors import ProtocolError as Bad

    name = request.match_info["name"]
    try:
        schedule = await request.app[SERVICE].client.scheduler.get(name)
    except Bad as exc:
        raise ApiError(409, "unreadable", exc.reason) from exc
    if schedule is None:
        raise ApiError(404, "not_found", f"no schedule {name!r}")
    return schedule


@scope("read")
async def get_schedule(request: web.Request) -> web.Response:
    return json(await request.app[SERVICE].client.scheduler.row(await _schedule(request)))


@scope("admin")
async def remove_schedule(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await request.app[SERVICE].client.scheduler.remove(name):
        raise ApiError(404, "not_found", f"no schedule {name!r}")
    log.info("schedule removed", extra={"schedule": name, "by": who(request)})
    return json({"name": name, "removed": True})


async def _pause(request: web.Request, paused: bool) -> web.Response:
    scheduler = request.app[SERVICE].client.scheduler
    schedule = await _schedule(request)
    await scheduler.pause(schedule.name, paused=paused)
    log.info("schedule paused" if paused else "schedule resumed",
             extra={"schedule": schedule.name, "by": who(request)})
    return json(await scheduler.row(schedule))


@scope("admin")
async def pause_schedule(request: web.Request) -> web.Response:
    return await _pause(request, True)


@scope("admin")
async def resume_schedule(request: web.Request) -> web.Response:
    return await _pause(request, False)


@scope("admin")
async def run_schedule(request: web.Request) -> web.Response:
    schedule = await _schedule(request)
    instance = await request.app[SERVICE].client.scheduler.run_now(schedule.name)
    log.info("schedule run now", extra={"schedule": schedule.name, "task_id": instance, "by": who(request)})
    return json({"name": schedule.name, "id": instance, "status": "queued"}, 202)


@scope("metrics")
async def metrics(request: web.Request) -> web.Response:
    from task_job.api.metrics import render

    try:
        body, content_type = await render(request.app[SERVICE])
    except ImportError:
        raise ApiError(501, "not_installed", "metrics need prometheus-client: "
                       "pip install 'task-job[metrics]'") from None
    return web.Response(body=body, headers={"Content-Type": content_type})


@scope("read")
async def openapi(request: web.Request) -> web.Response:
    from task_job.api.openapi import DESCRIPTION

    return json(DESCRIPTION)


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("POST", "/api/v1/tasks", submit),
    ("GET", "/api/v1/tasks", list_tasks),
    ("GET", "/api/v1/tasks/{id}", get_task),
    ("POST", "/api/v1/tasks/{id}/kill", kill_task),
    ("GET", "/api/v1/tasks/{id}/logs", task_logs),
    ("GET", "/api/v1/events", events),
    ("GET", "/api/v1/whoami", whoami),
    ("GET", "/api/v1/executors", list_executors),
    ("GET", "/api/v1/executors/{id}", get_executor),
    ("POST", "/api/v1/executors/{id}/drain", drain),
    ("POST", "/api/v1/executors/{id}/resume", resume),
    ("GET", "/api/v1/queues", queues),
    ("GET", "/api/v1/dead", dead),
    ("POST", "/api/v1/dead/{id}/requeue", requeue),
    ("GET", "/api/v1/schedules", list_schedules),
    ("POST", "/api/v1/schedules", add_schedule),
    ("GET", "/api/v1/schedules/{name}", get_schedule),
    ("DELETE", "/api/v1/schedules/{name}", remove_schedule),
    ("POST", "/api/v1/schedules/{name}/pause", pause_schedule),
    ("POST", "/api/v1/schedules/{name}/resume", resume_schedule),
    ("POST", "/api/v1/schedules/{name}/run", run_schedule),
    ("GET", "/api/v1/openapi.json", openapi),
]


def create_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[errors, auth], client_max_size=service.config.max_message_bytes + 4096)
    app[SERVICE] = service
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    from task_job.api.console import CONSOLE_ROUTES
    from task_job.api.facade import FACADE_ROUTES

    for method, path, handler in [*CONSOLE_ROUTES, *FACADE_ROUTES]:
        app.router.add_route(method, path, handler)
    return app
