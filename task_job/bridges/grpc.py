"""The gRPC task scheduler's service (taskscheduler.proto) over task-job: `SubmitTask` pushes
a named task (`method` is a catalogue entry, each `args` Any one argument, `deps` its
depends_on) through the same client as the CLI, and waits for it unless `is_async`;
`GetResult` reads a task's state. `result` is the task's stdout (its last 64 KiB), `detail`
task-job's status and summary; SUCCESS is `succeeded`, every other final status FAILED.

Served by `task-job grpc` (or an executor with `grpc_addr`), on 127.0.0.1:50051 by default.
Beyond loopback it needs TLS, and either mutual TLS (a client certificate signed by
`--tls-ca-cert`) or an API token in the `authorization` metadata (`Bearer <token>`), judged
with the API's scopes: `submit` for SubmitTask, `read` for GetResult. A token presented is
always checked, on loopback too. Needs `pip install 'task-job[grpc]'`.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
from google.protobuf import json_format, struct_pb2, wrappers_pb2
from redis.exceptions import RedisError

from task_job.api.auth import Principal, Tokens
from task_job.bridges import taskscheduler_pb2 as pb
from task_job.bridges import taskscheduler_pb2_grpc as pb_grpc
from task_job.catalogue import Catalogue, CatalogueFile
from task_job.client import AsyncClient
from task_job.config import Config, is_loopback
from task_job.errors import BrokerError, ConfigError, ProtocolError

log = logging.getLogger(__name__)

RESULT_BYTES = 64 << 10
DEFAULT_ADDR = "127.0.0.1:50051"  # the scheduler's own default port

_TEXT = (wrappers_pb2.StringValue, wrappers_pb2.Int32Value, wrappers_pb2.Int64Value,
         wrappers_pb2.UInt32Value, wrappers_pb2.UInt64Value)


class BadArgument(ValueError):
    pass


def argument(value: Any) -> str:
    """One google.protobuf.Any as one command argument."""
    for kind in _TEXT:
        if value.Is(kind.DESCRIPTOR):
            msg = kind()
            value.Unpack(msg)
            return str(msg.value)
    for kind in (wrappers_pb2.FloatValue, wrappers_pb2.DoubleValue):
        if value.Is(kind.DESCRIPTOR):
            msg = kind()
            value.Unpack(msg)
            number = float(msg.value)
            if kind is wrappers_pb2.FloatValue:  # a float32: its shortest text, not 0.1000000014901
                number = float(f"{number:.7g}")
            return _number_text(number)
    if value.Is(wrappers_pb2.BoolValue.DESCRIPTOR):
        flag = wrappers_pb2.BoolValue()
        value.Unpack(flag)
        return "true" if flag.value else "false"
    if value.Is(wrappers_pb2.BytesValue.DESCRIPTOR):
        raw = wrappers_pb2.BytesValue()
        value.Unpack(raw)
        try:
            return bytes(raw.value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadArgument("a BytesValue argument must be UTF-8 text") from None
    for kind in (struct_pb2.ListValue, struct_pb2.Struct):
        if value.Is(kind.DESCRIPTOR):
            msg = kind()
            value.Unpack(msg)
            return orjson.dumps(_whole(json_format.MessageToDict(msg))).decode()
    name = value.type_url.rsplit("/", 1)[-1] or "(no type)"
    raise BadArgument(f"an argument of type {name} cannot be a command argument (wrapper types, "
                      "ListValue and Struct can)")


def _number_text(number: float) -> str:
    if math.isfinite(number) and number == int(number) and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def _whole(value: Any) -> Any:
    """JSON numbers of a Struct are doubles: 3.0 is written 3."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


class TaskScheduler(pb_grpc.TaskSchedulerServicer):
    def __init__(self, client: AsyncClient, config: Config, tokens: Tokens, *, open_access: bool,
                 catalogue: Callable[[], Catalogue] | None = None) -> None:
        self.client = client
        self.config = config
        self.tokens = tokens
        self.open_access = open_access  # loopback, or mutual TLS: no token needed
        # the executor's own catalogue, or (served alone) the config's file, read on change
        self.catalogue = catalogue or CatalogueFile(config.catalogue).current

    async def _principal(self, context: Any, scope: str) -> Principal | None:
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        if header:
            token = header[7:] if header.lower().startswith("bearer ") else header
            principal = self.tokens.check(token.strip())
            if principal is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the token is not known")
            assert principal is not None
            if not principal.may(scope):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"token {principal.name!r} lacks the {scope!r} scope")
            return principal
        if not self.open_access:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "an API token in the authorization metadata is needed (Bearer <token>)")
        return None

    async def SubmitTask(self, request: Any, context: Any) -> Any:  # noqa: N802 (the service's names)
        return await self._unavailable_without_redis(self._submit(request, context), context)

    async def GetResult(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._unavailable_without_redis(self._get(request, context), context)

    async def _unavailable_without_redis(self, call: Any, context: Any) -> Any:
        """Redis away is UNAVAILABLE (a client retries that), not UNKNOWN."""
        try:
            return await call
        except (RedisError, BrokerError, ConnectionError) as exc:
            log.warning("gRPC call failed: redis unreachable", extra={"error": repr(exc)})
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"redis unreachable: {type(exc).__name__}")

    async def _submit(self, request: Any, context: Any) -> Any:
        principal = await self._principal(context, "submit")
        task_id = request.task_id or uuid.uuid4().hex
        entry = self.catalogue().get(request.method)
        if entry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no catalogue entry {request.method!r} (a method is a catalogue entry)")
        assert entry is not None  # abort raises
        if principal is not None and not principal.admits(request.method):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"token {principal.name!r} may not run {request.method!r}")
        try:
            args = [argument(a) for a in request.args]
        except BadArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        by = f"token:{principal.name}" if principal is not None else _peer(context)
        try:
            await self.client.submit("", args, task_id=task_id, name=request.method,
                                     depends_on=list(request.deps) or None,
                                     labels=dict(entry.labels) or None)
        except ProtocolError as exc:
            code = grpc.StatusCode.ALREADY_EXISTS if "already known" in exc.reason else \
                grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, exc.reason)
        log.info("task submitted over gRPC", extra={"task_id": task_id, "method": request.method, "by": by})
        if request.is_async:
            return pb.TaskResponse(task_id=task_id, status=pb.PENDING, detail="queued")
        try:
            await self.client.wait(task_id, timeout=self.config.sync_timeout)
        except TimeoutError:
            pass
        result = await self._result(task_id)  # known: it was just submitted (or its id was)
        return pb.TaskResponse(**(result or {"task_id": task_id, "status": pb.PENDING, "detail": "queued"}))

    async def _get(self, request: Any, context: Any) -> Any:
        await self._principal(context, "read")
        result = await self._result(request.task_id)
        if result is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {request.task_id!r} (never seen, or expired)")
        assert result is not None  # abort raises
        return pb.ResultResponse(**result)

    async def _result(self, task_id: str) -> dict[str, Any] | None:
        """The reply's fields for a task (None for an id nobody knows): its state, and once it
        is finished its stdout and summary, read from its records in one pass."""
        kind, status = await self.client.whereabouts(task_id)
        if kind == "unknown":
            return None
        if kind != "finished":
            code = pb.RUNNING if kind == "running" else pb.PENDING
            return {"task_id": task_id, "status": code, "result": "", "detail": status or "queued"}
        stdout = bytearray()
        summary = ""
        async for record in self.client.records(task_id):
            if record.msg_type == "stdout":
                stdout += record.payload
                del stdout[:-RESULT_BYTES]
            elif record.is_done:
                summary = record.data
        return {"task_id": task_id, "status": pb.SUCCESS if status == "succeeded" else pb.FAILED,
                "result": stdout.decode("utf-8", "replace"), "detail": f"{status}: {summary}".rstrip(": ")}


def _peer(context: Any) -> str:
    return f"grpc:{context.peer()}"


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def check_listen(addr: str, tls_cert: str, tls_ca: str, tokens: Tokens | None) -> bool:
    """Whether calls need no token (loopback, or mutual TLS); raises ConfigError for a
    listener beyond loopback without TLS, or without mutual TLS or tokens."""
    host = addr.rsplit(":", 1)[0].strip("[]")
    if is_loopback(host):
        return True
    if not tls_cert:
        raise ConfigError(f"grpc: {addr} is beyond loopback: it needs --tls-cert and --tls-key")
    if tls_ca:
        return True
    if tokens is None:
        raise ConfigError(f"grpc: {addr} is beyond loopback: it needs mutual TLS (--tls-ca-cert) "
                          "or api_tokens")
    return False


async def serve(config: Config, *, addr: str = DEFAULT_ADDR, tls_cert: str = "", tls_key: str = "",
                tls_ca: str = "", client: AsyncClient | None = None,
                catalogue: Callable[[], Catalogue] | None = None) -> Any:
    """Start the service; returns the grpc.aio server (stop it with `await server.stop(grace)`)."""
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("grpc: --tls-cert and --tls-key go together")
    if tls_ca and not tls_cert:
        raise ConfigError("grpc: --tls-ca-cert (mutual TLS) needs --tls-cert and --tls-key")
    tokens = Tokens(config.api_tokens)
    open_access = check_listen(addr, tls_cert, tls_ca, tokens if config.api_tokens else None)
    if client is None:
        client = AsyncClient(config)
    server = grpc.aio.server()
    pb_grpc.add_TaskSchedulerServicer_to_server(  # type: ignore[no-untyped-call]
        TaskScheduler(client, config, tokens, open_access=open_access, catalogue=catalogue), server)
    if tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(_read(tls_key), _read(tls_cert))], root_certificates=_read(tls_ca) if tls_ca else None,
            require_client_auth=bool(tls_ca))
        port = server.add_secure_port(addr, credentials)
    else:
        port = server.add_insecure_port(addr)
    if not port:
        raise ConfigError(f"grpc: cannot listen on {addr}")
    await server.start()
    log.info("gRPC service listening", extra={"addr": addr, "tls": bool(tls_cert), "mutual_tls": bool(tls_ca)})
    return server
