"""task-job: run shell-command tasks from a Redis list, confined, with streamed output.

Public API: `Client` (synchronous) and `AsyncClient` (asyncio; over Redis) with the same
methods — submit, kill, status, wait, logs, tasks, executors — and `AsyncHttpClient` (asyncio;
over the management API); the message types live in `protocol`.
"""

__version__ = "0.1.0"

from typing import Any  # noqa: E402

from task_job.client import AsyncClient  # noqa: E402
from task_job.sync_client import Client  # noqa: E402

__all__ = ["AsyncClient", "AsyncHttpClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "AsyncHttpClient":  # aiohttp (about 10 MiB) is imported only when it is used
        from task_job.http_client import AsyncHttpClient

        return AsyncHttpClient
    raise AttributeError(name)
