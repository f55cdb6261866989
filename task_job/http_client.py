"""`AsyncHttpClient`: the methods of `AsyncClient`, over the management API instead of Redis
(for callers that may reach the API, or a container's bind-mounted socket, but not Redis)."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from task_job.errors import ProtocolError, TaskJobError
from task_job.protocol import Record, build_task, parse_record


class ApiError(TaskJobError):
    """The API refused a request; `status` is the HTTP status, `code` the error's code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"api: {message} ({status})")
        self.status, self.code = status, code


class AsyncHttpClient:
    """>>> async with AsyncHttpClient("http://127.0.0.1:8080", token) as c:   # doctest: +SKIP
    ...     done = await c.wait(await c.submit("hello.sh", ["x"]))
    """

    def __init__(self, url: str, token: str | None = None, *, unix_socket: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0,
                 state_dir: str | None = None) -> None:
        """`token` None: the token an executor of this user generated (<state_dir>/api-token,
        when no api_tokens are configured), if it can be read."""
        self.url = url.rstrip("/")
        if token is None:
            from task_job.api.auth import read_local_token
            from task_job.config import default_state_dir

            token = read_local_token(state_dir or default_state_dir())
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._unix_socket = unix_socket
        self._ssl = ssl_context
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.UnixConnector(path=self._unix_socket) if self._unix_socket else None
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(sock_connect=self._timeout))
        return self._session

    async def _call(self, method: str, path: str, body: Any = None,
                    params: dict[str, str] | None = None) -> tuple[int, Any]:
        kw: dict[str, Any] = {"params": params or {}}
        if body is not None:
            kw["data"] = orjson.dumps(body)
            kw["headers"] = {"Content-Type": "application/json"}
        if self._ssl is not None:
            kw["ssl"] = self._ssl
        async with self._http().request(method, self.url + path, **kw) as resp:
            data = await resp.read()
            reply = orjson.loads(data) if data and resp.content_type == "application/json" else None
            if resp.status >= 400:
                error = (reply or {}).get("error", {}) if isinstance(reply, dict) else {}
                message, code = error.get("message", resp.reason or ""), error.get("code", "error")
                if resp.status in (400, 409):
                    raise ProtocolError(message)
                if resp.status != 404:
                    raise ApiError(resp.status, code, message)
            return resp.status, reply

    async def submit(
        self, cmdline: str, cmd_args: Sequence[str] = (), *, task_id: str | None = None,
        timeout: float | None = None, env: dict[str, str] | None = None, cwd: str | None = None,
        stdin: str | None = None, type: str | None = "start", tube: str | None = None,
        on_lost: str | None = None, labels: dict[str, Any] | None = None,
        executor: str | None = None,
    ) -> str:
        message = build_task(task_id or uuid.uuid4().hex, cmdline, tuple(cmd_args), type=type,
                             tube=tube, timeout=timeout, env=env, cwd=cwd, stdin=stdin,
                             on_lost=on_lost, labels=labels, executor=executor)
        _, reply = await self._call("POST", "/api/v1/tasks", orjson.loads(message))
        return str(reply["id"])

    async def kill(self, task_id: str) -> None:
        status, reply = await self._call("POST", f"/api/v1/tasks/{quote(task_id, safe='')}/kill")
        if status == 404:
            raise ProtocolError((reply or {}).get("error", {}).get("message", f"unknown task {task_id!r}"))

    async def task(self, task_id: str) -> dict[str, Any] | None:
        status, reply = await self._call("GET", f"/api/v1/tasks/{quote(task_id, safe='')}")
        return None if status == 404 else dict(reply)

    status = task

    async def records(self, task_id: str, *, follow: bool = False,
                      after_seq: int = -1) -> AsyncGenerator[Record, None]:
        path = f"/api/v1/tasks/{quote(task_id, safe='')}/logs"
        if not follow:
            status, reply = await self._call("GET", path, params={"after": str(after_seq)})
            for fields in (reply or {}).get("records", []) if status != 404 else []:
                yield parse_record(orjson.dumps(fields))
            return
        last = after_seq
        while True:  # a dropped stream is resumed after the last record seen
            headers = {"Last-Event-ID": str(last)} if last >= 0 else {}
            try:
                async with self._http().get(self.url + path, params={"follow": "1"}, headers=headers,
                                            ssl=self._ssl if self._ssl is not None else True) as resp:
                    if resp.status >= 400:
                        raise ApiError(resp.status, "error", (await resp.text())[:200])
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            record = parse_record(line[6:].rstrip(b"\n"))
                            last = record.seq
                            yield record
                            if record.is_done:
                                return
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                continue

    logs = records

    async def wait(self, task_id: str, timeout: float | None = None) -> Record:
        import asyncio

        async with asyncio.timeout(timeout):
            async for record in self.records(task_id, follow=True):
                if record.is_done:
                    return record
        raise AssertionError("unreachable")  # pragma: no cover

    async def tasks(self, **filters: Any) -> tuple[list[dict[str, Any]], str | None]:
        params = {k: str(v) for k, v in filters.items() if v is not None and k != "labels"}
        for key, value in (filters.get("labels") or {}).items():
            params[f"labels.{key}"] = value
        _, reply = await self._call("GET", "/api/v1/tasks", params=params)
        return list(reply["tasks"]), reply.get("next")

    async def executors(self) -> list[dict[str, Any]]:
        _, reply = await self._call("GET", "/api/v1/executors")
        return list(reply["executors"])
