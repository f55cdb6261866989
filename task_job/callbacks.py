"""Completion callbacks: one message per finished task, POSTed to a webhook and/or published
on a Redis pub/sub channel, with the pueue-NATS worker's callback fields (README, Named tasks).

Delivery is at least once. A callback is written to an on-disk spool (spool.py's format, under
`<state_dir>/callbacks/`) before it is sent, one spool and one sender per destination, so a
receiver that is down holds back only its own callbacks, and an executor that dies or stops
with callbacks unsent delivers them at its next start. A webhook answering 2xx has it; 429,
5xx and network errors are retried with back-off (capped at RETRY_CAP); any other 4xx sets
the callback aside in `<state_dir>/callbacks-dead/` and goes on. Receivers dedupe on `id`
(also sent as the `X-Task-Job-Id` header). With `callback_secret`, every POST carries
`X-Task-Job-Signature: sha256=<hex HMAC-SHA256 of the raw body>`.

Which URLs a task may name itself (`task.callback`) is decided by `allowed`: only those under
one of the operator's `callback_allow` prefixes, compared as parsed URLs (scheme, host and
port equal, path under the prefix's), so `https://hooks.example` does not admit
`https://hooks.example.evil.net/`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import shlex
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from task_job.config import redact_url
from task_job.files import DiskErrors
from task_job.protocol import Task
from task_job.spool import SPILL_RETRY, Call, SpoolFile, leftover_spools, spool_name

log = logging.getLogger(__name__)

SUFFIX = ".cbspool"
RETRY_CAP = 5.0
IDLE = 60.0  # seconds a sender with nothing to send stays
READ_BYTES = 256 << 10
REDIS_PREFIX = "redis:"  # a destination that is a Redis pub/sub channel, not a URL
NATS_PREFIX = "nats:"  # ... a NATS subject (bridges/nats.py)

# pueue's TaskResult, as the pueue-NATS callback reports it; `status` keeps task-job's own.
RESULTS = {"succeeded": "Success", "failed": "Failed", "timeout": "Failed", "killed": "Killed",
           "cancelled": "Killed", "rejected": "FailedToSpawn", "lost": "Errored"}


def result_of(status: str, summary: str) -> str:
    """pueue's TaskResult name of a done record (a wait ended by a dependency: DependencyFailed)."""
    if status == "cancelled" and summary.startswith("cancelled: dependency"):
        return "DependencyFailed"
    return RESULTS.get(status, status)


def allowed(url: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a producer's callback URL lies under one of the operator's prefixes."""
    try:
        got = urllib.parse.urlsplit(url)
        port = got.port
    except ValueError:
        return False
    if got.scheme not in ("http", "https") or not got.hostname or got.username or got.password \
            or any(c in url for c in "\r\n\t \\"):
        return False
    for prefix in prefixes:
        want = urllib.parse.urlsplit(prefix)
        if (want.scheme, want.hostname, want.port) != (got.scheme, got.hostname, port):
            continue
        base = want.path or "/"
        path = got.path or "/"
        if "/../" in f"{path}/" or "/./" in f"{path}/" or "%2e" in path.lower():
            continue  # no climbing out of the prefix by dot segments, plain or encoded
        if path == base or path.startswith(base if base.endswith("/") else base + "/"):
            return True
    return False


def tail_lines(data: bytes, lines: int) -> str:
    """The last `lines` lines of a task's output (the callback's `output`)."""
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    return "\n".join(text.split("\n")[-lines:]) if lines > 0 and text else ""


def command_of(task: Task) -> str:
    """The callback's `command`: the command line, or the catalogue entry with its arguments."""
    if task.name is not None:
        return shlex.join([task.name, *task.cmd_args])
    return task.cmdline + (" " + shlex.join(task.cmd_args) if task.cmd_args else "")


def body(task: Task, done: dict[str, Any], *, output: str, log_path: str | None,
         log_size: int | None, executor: str) -> bytes:
    """One callback: the pueue-NATS fields, then task-job's status, signal and usage."""
    status = str(done.get("status"))
    started, finished = done.get("started_at"), done.get("finished_at")
    out: dict[str, Any] = {
        "id": task.id, "command": command_of(task), "result": result_of(status, str(done.get("data") or "")),
        "exit_code": done.get("exit_code"), "group": task.group or "default",
        "label": task.label, "start": int(started) if started is not None else None,
        "end": int(finished) if finished is not None else None, "output": output,
        "log_path": log_path, "log_size": log_size,
        "status": status, "signal": done.get("signal"), "usage": done.get("usage"),
        "summary": done.get("data"), "executor": executor,
        "started_at": started, "finished_at": finished, "duration": done.get("duration"),
    }
    if task.name is not None:
        out["name"] = task.name
    if done.get("attempt") is not None:
        out["attempt"] = done["attempt"]
    return orjson.dumps(out)


def signature(secret: str, raw: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


class Rejected(Exception):
    """The receiver refused a callback for good (4xx other than 429)."""


class Callbacks:
    """Senders per destination, fed by `send`; `run` serves them until `close`."""

    def __init__(self, *, state_dir: Path, executor: str, secret: str, timeout: float,
                 publishers: dict[str, Callable[[str, bytes], Awaitable[Any]]]) -> None:
        self.dir = state_dir / "callbacks"
        self.dead_dir = state_dir / "callbacks-dead"
        self.executor = executor
        self.secret = secret
        self.timeout = timeout
        self.publishers = publishers  # by destination prefix: "redis:", "nats:"
        self._lanes: dict[str, _Lane] = {}
        self.run_id = uuid.uuid4().hex[:8]  # in spool names: never the file of an earlier run
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self._changed = asyncio.Event()
        self.closed = asyncio.Event()
        self._session: Any = None
        self.disk_errors = DiskErrors("the callback spool")
        self.sent = 0  # for /metrics and tests
        self.failed = 0
        self.dead = 0

    def send(self, destinations: tuple[str, ...] | list[str], raw: bytes, task_id: str) -> None:
        """Queue one callback (`raw`, of task `task_id`) for each destination."""
        for destination in destinations:
            lane = self._lanes.get(destination)
            if lane is None or lane.finished:
                lane = self._lanes[destination] = _Lane(self, destination)
                self._start(lane)
            lane.add(raw, task_id)

    def _start(self, lane: _Lane) -> None:
        task = asyncio.ensure_future(lane.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._changed.set()

    @property
    def pending(self) -> int:
        return sum(lane.waiting for lane in self._lanes.values())

    async def run(self) -> None:
        """Replay what earlier runs left unsent, then serve until closed and drained."""
        for path in leftover_spools(self.dir, SUFFIX):
            spool = await asyncio.to_thread(SpoolFile, path)
            if not spool.locked or spool.pending == 0:
                await asyncio.to_thread(spool.remove if spool.locked else spool.close)
                continue
            lane = _Lane(self, "", spool)
            log.warning("replaying callbacks an earlier run left unsent", extra={"spool": str(path)})
            self._start(lane)
        while not self.closing or self._tasks:
            self._changed.clear()
            waiters: set[asyncio.Future[Any]] = {*self._tasks, asyncio.ensure_future(self._changed.wait())}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters - self._tasks:
                waiter.cancel()
        if self._session is not None:
            await self._session.close()

    def close(self) -> None:
        """Stop: lanes finish what they can send now; the rest stays spooled for next time."""
        self.closing = True
        self.closed.set()
        self._changed.set()
        for lane in self._lanes.values():
            lane.wake.set()

    async def deliver(self, destination: str, raw: bytes, task_id: str) -> None:
        """One attempt; raises ConnectionError to retry, Rejected to give up."""
        prefix = destination.split(":", 1)[0] + ":"
        if prefix in (REDIS_PREFIX, NATS_PREFIX):
            publish = self.publishers.get(prefix)
            if publish is None:  # e.g. a NATS callback spooled by a run that had nats_url
                raise ConnectionError(f"no {prefix[:-1]} connection")
            try:
                await publish(destination[len(prefix):], raw)
            except Exception as exc:  # the server away: retried like a webhook
                raise ConnectionError(repr(exc)) from exc
            return
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        headers = {"Content-Type": "application/json", "User-Agent": "task-job",
                   "X-Task-Job-Id": task_id}
        if self.secret:
            headers["X-Task-Job-Signature"] = signature(self.secret, raw)
        try:
            async with self._session.post(destination, data=raw, headers=headers,
                                          allow_redirects=False) as resp:
                if resp.status < 300:
                    return
                if resp.status == 429 or resp.status >= 500:
                    raise ConnectionError(f"HTTP {resp.status}")
                raise Rejected(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectionError(str(exc) or type(exc).__name__) from exc

    async def set_aside(self, destination: str, raw: bytes, reason: str) -> None:
        self.dead += 1
        path = self.dead_dir / f"{time.time():.6f}-{self.dead}.json"

        def write() -> None:
            self.dead_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b'{"reason":' + orjson.dumps(reason) + b',"destination":'
                             + orjson.dumps(redact_url(destination)) + b',"callback":' + raw + b"}")

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            self.disk_errors.failed(exc, path)
        log.error("callback refused by its receiver: set aside, not retried",
                  extra={"reason": reason, "destination": redact_url(destination), "file": str(path)})


class _Lane:
    """One destination: a writer puts each callback on its spool as soon as it comes (the
    sender may be waiting on a slow receiver meanwhile); the sender sends in order and
    commits what was taken. Spool operations are serialized by a lock."""

    def __init__(self, owner: Callbacks, destination: str, spool: SpoolFile | None = None) -> None:
        self.owner = owner
        self.destination = destination  # "" for a replayed spool: each frame names its own
        self.spool = spool
        self.incoming: list[tuple[bytes, str]] = []  # (callback, task id)
        self.wake = asyncio.Event()
        self.finished = False
        self.waiting = 0
        self._lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._down_since: float | None = None

    def add(self, raw: bytes, task_id: str) -> None:
        self.incoming.append((raw, task_id))
        self.waiting += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    def _open(self) -> SpoolFile:
        if self.spool is None:
            digest = hashlib.sha256(self.destination.encode()).hexdigest()[:24]
            name = spool_name(self.owner.executor, f"-{self.owner.run_id}-{digest}{SUFFIX}")
            self.spool = SpoolFile(self.owner.dir / name)
        return self.spool

    async def _write(self) -> None:
        """Append what came in to the spool, before it is sent; a disk that refuses is tried
        again every SPILL_RETRY while the callbacks wait in memory."""
        owner = self.owner
        while self.incoming:
            batch, self.incoming = self.incoming, []
            calls: list[Call] = [("callback", self.destination, [task_id], [raw]) for raw, task_id in batch]
            try:
                async with self._lock:
                    spool = await asyncio.to_thread(self._open)
                    await asyncio.to_thread(spool.append, calls)
                owner.disk_errors.ok()
            except OSError as exc:
                owner.disk_errors.failed(exc, owner.dir)
                self.incoming = batch + self.incoming
                if owner.closing:
                    log.error("callbacks lost: the spool cannot be written and the executor stops",
                              extra={"callbacks": len(self.incoming)})
                    self.incoming = []
                    break
                await asyncio.sleep(SPILL_RETRY)
        self.wake.set()

    async def run(self) -> None:
        try:
            await self._run()
        except Exception:  # a bug must not stop the executor; what is spooled stays for next start
            log.exception("callback sender failed", extra={"destination": redact_url(self.destination)})
        finally:
            self.finished = True
            if self._writer is not None and not self._writer.done():
                await self._writer
            if self.spool is not None:
                try:
                    async with self._lock:
                        await asyncio.to_thread(self.spool.remove_if_empty)
                except OSError:
                    pass

    async def _run(self) -> None:
        owner = self.owner
        while True:
            spool = self.spool
            if spool is None or spool.pending == 0:
                writing = self.incoming or (self._writer is not None and not self._writer.done())
                if not writing and (owner.closing or not self.destination):
                    self.finished = True
                    return
                self.wake.clear()
                try:
                    async with asyncio.timeout(None if writing or owner.closing else IDLE):
                        await self.wake.wait()
                except TimeoutError:
                    if not self.incoming:  # idle: the next callback starts a new sender
                        self.finished = True
                        return
                continue
            async with self._lock:
                calls, offset = await asyncio.to_thread(spool.read, READ_BYTES)
            for _, destination, ids, args in calls:
                raw = args[0] if args and isinstance(args[0], bytes) else b""
                if raw and not await self._one(destination, raw, str(ids[0]) if ids else ""):
                    return  # closing with the receiver away: the rest stays spooled
            if calls:
                async with self._lock:
                    await asyncio.to_thread(spool.commit, offset)

    async def _one(self, destination: str, raw: bytes, task_id: str) -> bool:
        """Send one callback until it is taken or refused; False when closing first."""
        owner = self.owner
        attempt = 0
        while True:
            try:
                await owner.deliver(destination, raw, task_id)
                owner.sent += 1
                self.waiting = max(0, self.waiting - 1)
                if self._down_since is not None:
                    log.warning("callback receiver reachable again", extra={
                        "destination": redact_url(destination),
                        "down_s": round(time.monotonic() - self._down_since, 3)})
                    self._down_since = None
                return True
            except Rejected as exc:
                await owner.set_aside(destination, raw, str(exc))
                self.waiting = max(0, self.waiting - 1)
                return True
            except ConnectionError as exc:
                owner.failed += 1
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("callback receiver unreachable; callbacks wait on disk", extra={
                        "destination": redact_url(destination), "error": str(exc)})
                if owner.closing:
                    return False
                attempt += 1
                delay = min(RETRY_CAP, 0.1 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)
                try:
                    async with asyncio.timeout(delay):
                        await owner.closed.wait()
                except TimeoutError:
                    pass
