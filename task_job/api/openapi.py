"""The OpenAPI 3.1 description of the API, served at /api/v1/openapi.json. Written here, per
route; a test checks it against the routes so the two cannot drift."""

from __future__ import annotations

from typing import Any

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}}}
_OBJ: dict[str, Any] = {"type": "object"}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_TASK_MESSAGE: dict[str, Any] = {
    "type": "object", "required": ["task"],
    "description": "The queue's task message (docs/protocol.md); `id` is made when absent.",
    "properties": {
        "id": {"type": ["string", "integer"]}, "type": {"type": "string"}, "tube": {"type": "string"},
        "task": {"type": "object", "required": ["cmdline"], "properties": {
            "cmdline": {"type": "string"}, "cmd_args": {"type": "array", "items": {"type": "string"}},
            "timeout": {"type": "number"}, "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "cwd": {"type": "string"}, "stdin": {"type": "string"}, "max_output": {"type": "integer"},
            "on_lost": {"type": "string", "enum": ["fail", "requeue"]}, "retries": {"type": "integer"},
            "limits": {"type": "object"}, "user": {"type": "string"}}}}}

_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_SCHEDULE = {
    "type": "object", "required": ["name", "task"],
    "description": "A schedule (docs/protocol.md, Schedules): exactly one of cron and every.",
    "properties": {
        "name": {"type": "string"}, "cron": {"type": "string"}, "every": {"type": "integer", "minimum": 1},
        "timezone": {"type": "string"}, "task": _TASK_MESSAGE["properties"]["task"],
        "overlap": {"type": "string", "enum": ["allow", "skip", "replace"]},
        "catch_up": {"type": "string", "enum": ["skip", "one", "all"]},
        "catch_up_window": {"type": "number", "minimum": 0}, "jitter": {"type": "number", "minimum": 0},
        "misfire_grace": {"type": "number", "minimum": 0}}}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            **({"description": description} if description else {})}


def _op(summary: str, scope: str | None, ok: str = "200", *, params: list[Any] | None = None,
        body: dict[str, Any] | None = None, errors: tuple[str, ...] = (),
        content: str = "application/json", also_ok: tuple[str, ...] = ()) -> dict[str, Any]:
    schema = _OBJ if content == "application/json" else {"type": "string"}
    responses: dict[str, Any] = {code: {"description": "OK", "content": {content: {"schema": schema}}}
                                 for code in (ok, *also_ok)}
    if params and "400" not in errors:
        errors = ("400", *errors)
    for code in (*errors, *(("401", "403") if scope else ()), "503"):
        responses[code] = {"description": "Error", "content": {"application/json": {"schema": _ERROR}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses,
                          "security": [{"token": []}] if scope else []}
    if scope:
        op["x-scope"] = scope
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


_SSE = "text/event-stream"
PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {"get": _op("Alive", None)},
    "/readyz": {"get": _op("Redis answers and this executor is claiming", "read")},
    "/metrics": {"get": _op("Prometheus metrics", "read", content="text/plain")},
    "/api/v1/tasks": {
        "post": _op("Submit a task; ?wait=SECONDS returns its done record", "submit", "202",
                    params=[_query("wait", {"type": "number", "minimum": 0, "maximum": 3600})],
                    body=_TASK_MESSAGE, errors=("400", "409"), also_ok=("200",)),
        "get": _op("Running, queued and recent finished tasks", "read", params=[
            _query("status", {"type": "string"}), _query("executor", {"type": "string"}),
            _query("since", {"type": "number", "minimum": 0}), _query("until", {"type": "number", "minimum": 0}),
            _query("cursor", {"type": "string"}), _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})],
            errors=("400",))},
    "/api/v1/tasks/{id}": {"get": _op("One task: state, message or done record", "read",
                                      params=[_ID], errors=("400", "404"))},
    "/api/v1/tasks/{id}/kill": {"post": _op("Kill a task", "kill", "202", params=[_ID],
                                            errors=("400", "404", "409"))},
    "/api/v1/tasks/{id}/logs": {"get": _op(
        "A task's records; ?follow=1 as Server-Sent Events (id = seq; Last-Event-ID resumes)",
        "read", params=[_ID, _query("follow", {"type": "string", "enum": ["0", "1"]}),
                        _query("after", {"type": "integer"})], errors=("400", "404"))},
    "/api/v1/events": {"get": _op("Task and executor events (Server-Sent Events); ?snapshot=S adds a "
                                  "`fleet` event every S seconds", "read", content=_SSE,
                                  params=[_query("snapshot", {"type": "number", "minimum": 1, "maximum": 60})])},
    "/api/v1/executors": {"get": _op("Registered executors", "read")},
    "/api/v1/executors/{id}": {"get": _op("One executor", "read", params=[_ID], errors=("404",))},
    "/api/v1/executors/{id}/drain": {"post": _op("Stop claiming; running tasks finish", "admin",
                                                 "202", params=[_ID], errors=("404",))},
    "/api/v1/executors/{id}/resume": {"post": _op("Claim again after a drain", "admin", "202",
                                                  params=[_ID], errors=("404",))},
    "/api/v1/queues": {"get": _op("Queue depths", "read")},
    "/api/v1/dead": {"get": _op("Dead letters with their reasons", "read", params=[
        _query("cursor", {"type": "string"}), _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})])},
    "/api/v1/dead/{id}/requeue": {"post": _op("Requeue a dead letter", "admin", "202",
                                              params=[_ID], errors=("400", "404", "409"))},
    "/api/v1/schedules": {
        "get": _op("Every schedule with next_run, last_run, last_status", "read"),
        "post": _op("Add a schedule (?replace=1 redefines one)", "admin", "201",
                    params=[_query("replace", {"type": "string", "enum": ["0", "1"]})],
                    body=_SCHEDULE, errors=("400", "409"))},
    "/api/v1/schedules/{name}": {
        "get": _op("One schedule", "read", params=[_NAME], errors=("404", "409")),
        "delete": _op("Remove a schedule", "admin", params=[_NAME], errors=("404",))},
    "/api/v1/schedules/{name}/pause": {"post": _op("Pause a schedule", "admin", params=[_NAME],
                                                   errors=("404", "409"))},
    "/api/v1/schedules/{name}/resume": {"post": _op("Resume a schedule from its next tick", "admin",
                                                    params=[_NAME], errors=("404", "409"))},
    "/api/v1/schedules/{name}/run": {"post": _op("Fire one instance now", "admin", "202",
                                                 params=[_NAME], errors=("404", "409"))},
    "/api/v1/whoami": {"get": _op("The token's name, scopes and allow globs", "any")},
    "/api/v1/openapi.json": {"get": _op("This description", "read")},
}

DESCRIPTION: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "task-job management API", "version": "1"},
    "paths": PATHS,
    "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
}
