"""celery-service's HTTP interface over task-job (README, Named tasks): its routes and reply
shapes exactly, so its callers move over unchanged. Each catalogue entry gets
`POST /sync/<cluster-type-kebab>/<name>` and `POST /async/<cluster-type-kebab>/<name>` (body:
a JSON array of strings, appended to the entry's arguments); `POST /async/query`,
`POST /async/kill` and `GET /list` complete it. Sessions are task ids, listed in
`{Q}:facade_sessions` until `facade_session_ttl` after they finished.

celery-service's callers send no token: with `facade_token: NAME`, a request to these routes
without an Authorization header acts as that token (typically `submit`, `read` and `kill`
with `allow` limited to catalogue names); without it they need a token like every route."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from task_job.errors import ProtocolError

SESSIONS = "facade_sessions"


def reply(code: int, data: Any = "", msg: str = "") -> web.Response:
    return web.Response(body=orjson.dumps({"code": code, "data": data, "msg": msg}),
                        content_type="application/json")


def _app() -> Any:
    from task_job.api import app

    return app


def with_entry_labels(service: Any, body: dict[str, Any]) -> None:
    """A named task without labels of its own is placed by its entry's `labels`."""
    spec = body.get("task")
    if isinstance(spec, dict) and isinstance(spec.get("name"), str) and not spec.get("labels"):
        entry = service.catalogue.get(spec["name"])
        if entry is not None and entry.labels:
            spec["labels"] = dict(entry.labels)


async def _arguments(request: web.Request) -> list[str]:
    raw = await request.read()
    if not raw.strip():
        return []
    try:
        args = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _app().ApiError(400, "invalid", f"body: a JSON array of strings ({exc})") from None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise _app().ApiError(400, "invalid", "body: a JSON array of strings")
    return args


async def _start(request: web.Request) -> tuple[Any, str]:
    """Check the route names a catalogue entry the caller may run; push the named task."""
    app = _app()
    service = request.app[app.SERVICE]
    cluster, name = request.match_info["cluster"], request.match_info["name"]
    entry = service.catalogue.get(name)
    if entry is None or entry.route != f"{cluster}/{name}":
        raise app.ApiError(404, "not_found", f"no catalogue entry /{cluster}/{name} (GET /list)")
    principal = app.principal_of(request)
    if not principal.admits(name):
        raise app.ApiError(403, "forbidden", f"token {principal.name!r} may not run {name!r}")
    args = await _arguments(request)
    session = str(uuid.uuid4())
    message: dict[str, Any] = {"id": session, "task": {"name": name, "cmd_args": args}}
    with_entry_labels(service, message)
    try:
        await service.client.submit_message(message, by=app.who(request))
    except ProtocolError as exc:
        raise app.ApiError(400, "invalid", exc.reason) from exc
    await service.client.broker.redis.zadd(service.client.keys.prefix + SESSIONS, {session: time.time()})
    return service, session


async def run_sync(request: web.Request) -> web.Response:
    """Waits at most sync_timeout; code 1 on a non-zero exit, timeout, kill or rejection."""
    service, session = await _start(request)
    try:
        done = await service.client.wait(session, timeout=service.config.sync_timeout)
    except TimeoutError:
        return reply(1, "", f"session {session} not done within {service.config.sync_timeout:g}s "
                            "(POST /async/query with its session_id)")
    last = await service.client.last_lines(session, 1)
    out, err = (last["stdout_last"] or [""])[0], (last["stderr_last"] or [""])[0]
    ok = done.fields.get("status") == "succeeded"
    return reply(0 if ok else 1, out, err if ok or err else done.data)


async def run_async(request: web.Request) -> web.Response:
    _, session = await _start(request)
    return reply(0, session)


async def _session_row(service: Any, session: str, started: float,
                       state: dict[str, str] | None = None) -> dict[str, Any]:
    if state is None:
        state = await service.client.state(session)
    status = state.get("status", "")
    finished = status not in ("", "running", "requeued", "retrying", "cancel_requested", "waiting")
    last = await service.client.last_lines(session, 1)
    out, err = (last["stdout_last"] or [""])[0], (last["stderr_last"] or [""])[0]
    if finished and status != "succeeded" and not err:
        err = f"{status}" + (f" (exit {state['exit_code']})" if state.get("exit_code") else "")
    return {"id": session, "message": out, "error": err, "done": finished,
            "start_at": dt.datetime.fromtimestamp(started).astimezone().isoformat()}


async def query(request: web.Request) -> web.Response:
    app = _app()
    service = request.app[app.SERVICE]
    raw = await request.read()
    wanted = None
    if raw.strip():
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise app.ApiError(400, "invalid", f"body: {{\"session_id\": ...}} ({exc})") from None
        if not isinstance(body, dict) or not isinstance(body.get("session_id", ""), str):
            raise app.ApiError(400, "invalid", 'body: {"session_id": STRING}')
        wanted = body.get("session_id") or None
    redis = service.client.broker.redis
    key = service.client.keys.prefix + SESSIONS
    if wanted is not None:
        started = await redis.zscore(key, wanted)
        if started is None:
            return reply(1, [], f"no session {wanted}")
        return reply(0, [await _session_row(service, wanted, started)])
    rows = []
    horizon = time.time() - service.config.facade_session_ttl
    for member, started in await redis.zrange(key, 0, -1, withscores=True):
        state = await service.client.state(member.decode())
        row = await _session_row(service, member.decode(), started, state)
        finished_at = state.get("finished_at")
        if row["done"] and finished_at and float(finished_at) < horizon:
            await redis.zrem(key, member)  # finished long enough ago: cleaned up
            continue
        rows.append(row)
    return reply(0, rows)


async def kill(request: web.Request) -> web.Response:
    app = _app()
    service = request.app[app.SERVICE]
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise app.ApiError(400, "invalid", f"body: {{\"session_id\": ...}} ({exc})") from None
    session = body.get("session_id") if isinstance(body, dict) else None
    if not isinstance(session, str) or not session:
        raise app.ApiError(400, "invalid", 'body: {"session_id": STRING}')
    if await service.client.broker.redis.zscore(service.client.keys.prefix + SESSIONS, session) is None:
        return reply(1, "", f"no session {session}")
    await service.client.kill(session, by=app.who(request))
    return reply(0, "")


async def listing(request: web.Request) -> web.Response:
    service = request.app[_app().SERVICE]
    rows = []
    for entry in sorted(service.catalogue.entries.values(), key=lambda e: e.route):
        rows += [{"method": "POST", "path": f"/async/{entry.route}"},
                 {"method": "POST", "path": f"/sync/{entry.route}"}]
    rows += [{"method": "POST", "path": "/async/kill"}, {"method": "POST", "path": "/async/query"},
             {"method": "GET", "path": "/list"}]
    return reply(0, rows)


for _handler, _scope in ((run_sync, "submit"), (run_async, "submit"), (query, "read"), (kill, "kill"),
                         (listing, "read")):
    _handler.scope = _scope  # type: ignore[attr-defined]
    _handler.facade = True  # type: ignore[attr-defined]

FACADE_ROUTES = [("GET", "/list", listing), ("POST", "/async/query", query), ("POST", "/async/kill", kill),
                 ("POST", "/sync/{cluster}/{name}", run_sync), ("POST", "/async/{cluster}/{name}", run_async)]
