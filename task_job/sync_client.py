"""`Client`: the synchronous client, for scripts and tools that are not asyncio code. Drives an
`AsyncClient` (Redis) or an `AsyncHttpClient` (the API) on a private event loop thread."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from task_job.config import Config
from task_job.protocol import Record

T = TypeVar("T")
_END = object()


class Client:
    """>>> with Client(Config(redis_addr="127.0.0.1:6379")) as c:        # doctest: +SKIP
    ...     done = c.wait(c.submit("install.sh", ["feature/homestead"]))
    >>> with Client(url="http://127.0.0.1:8080", token=TOKEN) as c:  # doctest: +SKIP
    ...     print(c.status("101"))
    """

    def __init__(self, config: Config | None = None, *, url: str | None = None,
                 token: str | None = None, unix_socket: str | None = None, **overrides: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="task-job-client",
                                        daemon=True)
        self._thread.start()
        if url is not None:
            from task_job.http_client import AsyncHttpClient

            self._inner: Any = AsyncHttpClient(url, token, unix_socket=unix_socket,
                                               state_dir=overrides.get("state_dir"))
        else:
            self._inner = self._run(_make_async(config, overrides))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._inner.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def submit(self, cmdline: str, cmd_args: list[str] | tuple[str, ...] = (), **options: Any) -> str:
        return str(self._run(self._inner.submit(cmdline, cmd_args, **options)))

    def kill(self, task_id: str) -> None:
        self._run(self._inner.kill(task_id))

    def status(self, task_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._run(self._inner.task(task_id))
        return result

    def wait(self, task_id: str, timeout: float | None = None) -> Record:
        result: Record = self._run(self._inner.wait(task_id, timeout))
        return result

    def logs(self, task_id: str, *, follow: bool = False) -> Iterator[Record]:
        """Records as they come (with follow, until the done record)."""
        out: queue.Queue[Any] = queue.Queue(maxsize=1000)

        async def pump(records: AsyncIterator[Record]) -> None:
            try:
                async for record in records:
                    await asyncio.to_thread(out.put, record)
            except BaseException as exc:  # handed to the reader
                await asyncio.to_thread(out.put, exc)
            finally:
                await asyncio.to_thread(out.put, _END)

        future = asyncio.run_coroutine_threadsafe(pump(self._inner.records(task_id, follow=follow)),
                                                  self._loop)
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    def tasks(self, **filters: Any) -> list[dict[str, Any]]:
        rows, _ = self._run(self._inner.tasks(**filters))
        return list(rows)

    def executors(self) -> list[dict[str, Any]]:
        return list(self._run(self._inner.executors()))


async def _make_async(config: Config | None, overrides: dict[str, Any]) -> Any:
    from task_job.client import AsyncClient

    return AsyncClient(config, **overrides)  # its connections belong to the client's loop
