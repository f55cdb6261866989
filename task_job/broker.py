"""The only module that speaks to Redis: key names, connections and the Lua scripts.

Knows the Redis layout of docs/protocol.md; knows nothing of processes or of where records go next.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    InvalidResponse,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from task_job.config import Config, parse_sentinel
from task_job.errors import BrokerError, ConfigError

WAIT_TIMEOUT_MS = 500

# Errors that pass: Redis unreachable, still loading its data after a restart (LOADING, a
# ConnectionError subclass), a replica during a failover (READONLY), a cluster moving slots.
# An operation that met one is retried; every operation we send is safe to repeat.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, ReadOnlyError, TryAgainError, OSError)


class RedisOutOfMemory(RedisConnectionError):
    """Redis refused a write for lack of memory (maxmemory, noeviction): retried later."""


def is_oom(result: Any) -> bool:
    """An OOM error reply (redis-py strips the 'OOM' prefix into its own class)."""
    # Redis 6 reports it inside a script error: "Error running script ... -OOM command ...".
    return isinstance(result, OutOfMemoryError) or (
        isinstance(result, ResponseError) and ("OOM command not allowed" in str(result)
                                               or str(result).startswith("OOM")))


BIG_CLAIM = 16 << 10  # claimed messages bigger than this are named by digest, not sent back


def claim_ref(raw: bytes) -> bytes:
    """How a settling script finds a claimed message in a processing list: the message
    itself, or for a big one (or one that looks like a reference) its digest_ref."""
    if len(raw) <= BIG_CLAIM and not raw.startswith(b"sha1:"):
        return raw
    return digest_ref(hashlib.sha1(raw).hexdigest(), len(raw))


def parked_member(queue: str, task_id: str, message: bytes) -> bytes:
    """A member of {Q}:scheduled: `queue \\0 id \\0 message` (lib_parked.lua reads it)."""
    return b"%s\0%s\0%s" % (queue.encode(), task_id.encode(), message)


def digest_ref(digest: str, size: int) -> bytes:
    """'sha1:<hex>:<length>', as lib_unclaim.lua reads it."""
    return b"sha1:%s:%d" % (digest.encode(), size)


log = logging.getLogger(__name__)

MOVE_BATCH = 10_000  # parked tasks moved per call when many are due at once
MOVE_INTERVAL = 0.25  # seconds between looks for due tasks (a due task is queued within this)

SCRIPT_NAMES = ("begin", "push_records", "finish", "dead_letter", "kill", "unclaim", "requeue",
                "heartbeat", "takeover", "adopt", "requeue_dead", "submit", "place",
                "dispatcher_beat", "reroute", "move_due", "park", "retry", "fire", "hold")


@dataclass(frozen=True, slots=True)
class Keys:
    """Every key name of one queue, built once; new keys share the hash tag {Q}."""

    queue: str
    control: str
    logs: str
    dead: str
    tag: str
    dispatch: str = ""

    @classmethod
    def for_config(cls, config: Config) -> Keys:
        q = config.queue_name
        return cls(queue=q, control=config.queue_control_name, logs=config.logs_channel,
                   dead=f"{q}_dead", tag=f"{{{q}}}", dispatch=config.dispatch_queue)

    @property
    def registry(self) -> str:
        """Pub/sub channel of executor UP/DOWN events."""
        return f"{self.queue}_registry"

    @property
    def executors(self) -> str:
        return f"{self.tag}:executors"

    @property
    def scheduled(self) -> str:
        """Parked tasks by due time (member: queue \\0 id \\0 message)."""
        return f"{self.tag}:scheduled"

    @property
    def groups(self) -> str:
        """Hash: group name -> parallel (fleet-wide limits, written from executors' config)."""
        return f"{self.tag}:groups"

    def group_keys(self, group: str) -> list[str]:
        """The lease set and waiting list of a limited group."""
        return [f"{self.tag}:group:{group}:running", f"{self.tag}:group:{group}:waiting"]

    @property
    def schedules(self) -> str:
        """Hash: schedule name -> its definition (JSON)."""
        return f"{self.tag}:schedules"

    @property
    def schedule_due(self) -> str:
        """Zset: schedule name -> its next tick (unix seconds); paused ones are absent."""
        return f"{self.tag}:schedule_due"

    def schedule(self, name: str) -> str:
        """A schedule's state: active and last instance, last_run, paused, counts."""
        return f"{self.tag}:schedule:{name}"

    @property
    def prefix(self) -> str:
        """'{Q}:', what scripts that build key names inside (lib_deps.lua) start from."""
        return f"{self.tag}:"

    @property
    def waiting(self) -> list[str]:
        """Tasks waiting for their dependencies: the waiting hash, the zset of when each is
        cancelled (0: now) and the hash of why (lib_deps.lua)."""
        return [f"{self.tag}:waiting", f"{self.tag}:waiting_until", f"{self.tag}:waiting_why"]

    @property
    def scheduled_ids(self) -> str:
        """Parked task id -> its member in `scheduled` (how a kill finds it)."""
        return f"{self.tag}:scheduled_ids"

    def queue_for(self, executor: str | None, labelled: bool, dispatched: bool) -> str:
        """Where a task goes when it is released (due, retried, fired): its executor's own
        queue, the dispatcher queue for a labelled one while a dispatcher serves the fleet,
        else the shared queue."""
        if executor:
            return self.inbox(executor)
        return self.dispatch if labelled and dispatched else self.queue

    def processing(self, executor: str) -> str:
        return f"{self.tag}:processing:{executor}"

    def task(self, task_id: str) -> str:
        return f"{self.tag}:task:{task_id}"

    def executor(self, executor: str) -> str:
        return f"{self.tag}:executor:{executor}"

    def taken_over(self, executor: str) -> str:
        """The mark a takeover leaves for the executor it declared dead."""
        return f"{self.tag}:taken_over:{executor}"

    def inbox(self, executor: str) -> str:
        """An executor's own task queue: a dispatcher, a producer or `task.executor` put
        tasks meant for it alone here."""
        return f"{self.tag}:inbox:{executor}"

    def control_inbox(self, executor: str) -> str:
        """An executor's own control list: kills routed to it, drain and resume."""
        return f"{self.tag}:control:{executor}"

    @property
    def dispatchers(self) -> str:
        """Zset of dispatcher heartbeats (ms, server clock)."""
        return f"{self.tag}:dispatchers"

    def dispatching(self, dispatcher: str) -> str:
        """A dispatcher's processing list: tasks it took and has not placed yet."""
        return f"{self.tag}:dispatching:{dispatcher}"

    @property
    def unroutable(self) -> str:
        """Zset of tasks no live executor matches (score: when first found so)."""
        return f"{self.tag}:unroutable"

    @property
    def dispatch_stats(self) -> str:
        return f"{self.tag}:dispatch_stats"

    def log(self, task_id: str) -> str:
        return f"{self.tag}:log:{task_id}"

    @property
    def events(self) -> str:
        """Pub/sub channel of task state changes (running, and each done status)."""
        return f"{self.tag}:events"

    def recent(self, status: str = "") -> str:
        """Finished tasks by finish time, all or of one status (trimmed at the state TTL)."""
        return f"{self.tag}:recent:{status}" if status else f"{self.tag}:recent"

    def recent_by(self, executor: str) -> str:
        """Finished tasks of one executor, by finish time."""
        return f"{self.tag}:recent_by:{executor}"


class Scripts:
    """The Lua scripts, loaded once and called by name through EVALSHA."""

    def __init__(self) -> None:
        self.source: dict[str, str] = {}
        self.sha: dict[str, str] = {}
        lua = resources.files("task_job").joinpath("lua")
        for name in SCRIPT_NAMES:
            text = lua.joinpath(f"{name}.lua").read_text("utf-8")
            # `--!include file.lua` lines take that file's text (code shared by scripts).
            text = re.sub(r"^--!include (\S+)$",
                          lambda m: lua.joinpath(m.group(1)).read_text("utf-8"), text, flags=re.M)
            self.source[name] = text
            self.sha[name] = hashlib.sha1(text.encode("utf-8")).hexdigest()

    async def load(self, client: aioredis.Redis) -> None:
        for name in SCRIPT_NAMES:
            await client.script_load(self.source[name])

    async def call(self, client: aioredis.Redis, name: str, keys: Sequence[str],
                   args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)  # Redis restarted or SCRIPT FLUSH: load and go on
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)


def connect(addr: str, *, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
            **options: Any) -> aioredis.Redis:
    """A client for `redis_addr`: host:port, redis://, rediss://, unix://, sentinel://."""
    if addr == "embedded":
        raise ConfigError("redis_addr: 'embedded' must be started first (task-job run --embedded)")
    options.setdefault("socket_connect_timeout", 5)
    # No automatic retries: a retried BLMOVE or script whose first reply was lost would act
    # twice. Our loops retry themselves, with operations made safe to repeat.
    options.setdefault("retry", Retry(NoBackoff(), 0))
    tls: dict[str, Any] = {}
    if tls_ca:
        tls["ssl_ca_certs"] = tls_ca
    if tls_cert:
        tls.update(ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    if addr.startswith("sentinel://"):
        nodes, master, user, password = parse_sentinel(addr)
        if tls:
            tls["ssl"] = True
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            nodes, socket_connect_timeout=options["socket_connect_timeout"], **tls)
        # The master is looked up through the sentinels at every new connection: after a
        # failover, the next reconnect reaches the promoted replica.
        master_client: aioredis.Redis = sentinel.master_for(
            master, username=user, password=password, **options, **tls)
        return _fast_packing(master_client)
    url = addr if "://" in addr else f"redis://{addr}"
    if not url.startswith("unix://"):
        options.setdefault("socket_keepalive", True)
    if url.startswith("rediss://"):
        options.update(tls)
    return _fast_packing(aioredis.Redis.from_url(url, **options))


WATCH_INTERVAL = 0.25  # how often a lane's watchdog looks at the batch in flight
BLOCK_MAX = 1.0  # the longest a blocking command (BLPOP, BLMOVE) of ours waits


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: unreachable, silent, loading, failing over. Not: a wrong password, a
    server that is not Redis, a TLS mismatch (an operator has to fix those)."""
    text = str(exc)
    if isinstance(exc, (AuthenticationError, AuthorizationError, InvalidResponse)) or \
            "WRONGPASS" in text or "NOAUTH" in text or "NOPERM" in text:
        return False
    if isinstance(exc, ssl.SSLError) or "SSL" in text or "certificate" in text:
        return False
    return isinstance(exc, (*TRANSIENT_ERRORS, TimeoutError))


def describe(exc: BaseException, timeout: float, addr: str = "") -> str:
    """One line an operator can act on, for an error met talking to Redis at `addr`."""
    text = str(exc) or type(exc).__name__
    if "NOAUTH" in text or "Authentication required" in text or "already authenticated" in text:
        return "the server needs a password (redis://user:password@host:port)"
    if "WRONGPASS" in text or isinstance(exc, AuthenticationError):
        return "wrong user name or password (check redis_addr, or the ACL user)"
    if "NOPERM" in text or isinstance(exc, AuthorizationError):
        return f"the ACL user may not run a command task-job needs: {text}"
    if isinstance(exc, InvalidResponse) or "Protocol error" in text:
        return "the server does not speak the Redis protocol (wrong port?)"
    if isinstance(exc, ssl.SSLError) or "SSL" in text or "certificate" in text:
        return f"TLS failed ({text}); rediss:// needs a TLS port, redis:// a plain one; check redis_tls_ca"
    if isinstance(exc, (TimeoutError, RedisTimeoutError)):
        if addr.startswith("rediss://"):
            return (f"no TLS handshake or reply within {timeout:g}s (rediss:// needs a TLS port; "
                    "is this a plain one?)")
        return f"connected, but no reply within {timeout:g}s (a stalled server, or not Redis)"
    if isinstance(exc, ConnectionRefusedError) or "refused" in text.lower() or "Error 111 " in text:
        return "connection refused (is redis-server running there?)"
    return text


BIG_ARG = 6000  # redis-py's own cut-off for sending a value as a separate buffer


class _HiredisPacking:
    """Commands packed by hiredis (C) instead of redis-py's pure-Python packer, which the
    asyncio client always uses: about a tenth of the executor's CPU per task went there.
    The same serializer the synchronous client uses when hiredis is present."""

    _packer: Any = None

    def pack_command(self, *args: Any) -> list[bytes]:
        if _has_big_arg(args):
            big: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
            return big
        packed: list[bytes] = self._packer.pack(*args)
        return packed


def _has_big_arg(args: Sequence[Any]) -> bool:
    """A payload (a record batch) that redis-py's packer hands to the socket as it is, where
    hiredis would copy it into one buffer with the rest of the command."""
    for arg in args:
        if arg.__class__ is bytes and len(arg) > BIG_ARG:
            return True
    return False


def _fast_packing(client: aioredis.Redis) -> aioredis.Redis:
    try:
        from redis.connection import HiredisRespSerializer
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:  # pragma: no cover - another redis-py layout: keep its packer
        return client
    if HIREDIS_AVAILABLE:
        pool = client.connection_pool
        base = pool.connection_class
        pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base),
                                     {"_packer": HiredisRespSerializer()})
    return client


class Lane:
    """One connection of a client's pool kept aside and driven directly: a batch of commands
    is packed, sent in one write and its replies read in order, without redis-py's pipeline
    machinery (pool checkout, per-command bookkeeping), which costs about twice the CPU per
    round trip (bench: 70 against 130-160 microseconds for three commands). The connection is
    the pool's own kind, so TLS, ACL users, Sentinel discovery and reconnects are redis-py's.

    Replies that are errors come back as exception objects in their places; a connection
    failure (or a cancellation mid-batch) drops the connection and raises, and the next batch
    connects afresh. One batch at a time.
    """

    def __init__(self, client: aioredis.Redis, timeout: float = 10.0) -> None:
        self._client = client
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self.timeout = timeout  # deadline of a batch, beyond what its blocking commands wait
        # The deadline is kept by a watchdog task that looks every WATCH_INTERVAL seconds,
        # not by asyncio.timeout around each batch: that costs about 4 microseconds a batch
        # (a timer handle in the loop's heap), this one a clock read.
        self._deadline = 0.0
        self._waiter: asyncio.Task[Any] | None = None
        self._expired = False
        self._watchdog: asyncio.Task[None] | None = None

    async def execute(self, commands: Sequence[Sequence[Any]], block: float = 0.0,
                      bulk_limit: int = 0) -> list[Any]:
        """The batch's replies in order. With `bulk_limit`, the commands must answer with a bulk
        string or nil (LMOVE, BLMOVE): a string longer than the limit is not read into memory
        but streamed past, and comes back as an `Oversize` (prefix, size, digest)."""
        async with self._lock:
            if self._conn is None:
                self._conn = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            if self._watchdog is None:
                self._watchdog = asyncio.create_task(self._watch())
            conn = self._conn
            self._waiter = asyncio.current_task()
            self._deadline = time.monotonic() + self.timeout + block
            try:
                return await self._execute(conn, commands, bulk_limit)
            except asyncio.CancelledError:
                if not self._expired:
                    raise
                self._expired = False
                if self._waiter is not None:
                    self._waiter.uncancel()
                raise RedisTimeoutError(
                    f"no reply from redis within {self.timeout + block:g}s") from None
            finally:
                self._deadline = 0.0
                self._waiter = None

    async def _watch(self) -> None:
        """Cancel a batch that outlived its deadline (a silent server); execute() turns that
        cancellation into a timeout. It runs only while the batch's task is suspended inside
        execute(), so the cancellation lands there and nowhere else."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self._deadline and time.monotonic() > self._deadline and self._waiter is not None \
                    and not self._expired:
                self._expired = True
                self._waiter.cancel()

    async def _execute(self, conn: Any, commands: Sequence[Sequence[Any]], bulk_limit: int = 0
                       ) -> list[Any]:
        try:
            if not conn.is_connected:
                # connect() itself: a Sentinel-managed connection finds the master there
                # (send_packed_command's own connect would not).
                await conn.connect()
            await conn.send_packed_command(_pack(conn, commands), check_health=False)
            reader = _replies_reader(conn)
            stream = getattr(conn, "_reader", None)
            if bulk_limit and stream is not None and (reader is None or not reader.has_data()):
                results = await _read_bulks(conn, stream, len(commands), bulk_limit)
            elif reader is not None:
                results = await _read_replies(conn._parser, reader, len(commands))
            else:
                results = []
                for _ in commands:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:  # this command's error reply
                        results.append(exc)
        except BaseException:
            await conn.disconnect()  # replies may be left unread: start afresh
            raise
        if any(is_oom(r) for r in results):
            results = [RedisOutOfMemory(str(r)) if is_oom(r) else r for r in results]
        if any(isinstance(r, TRANSIENT_ERRORS) for r in results):
            await conn.disconnect()  # e.g. READONLY: reconnect (Sentinel finds the master)
        return results

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._conn is not None:
            await self._conn.disconnect()


def _pack(conn: Any, commands: Sequence[Sequence[Any]]) -> list[bytes]:
    """The batch in the wire protocol: packed by hiredis straight, one C call per command,
    when every argument is small (redis-py's own path spends more than twice as long around
    the same call); batches with a big payload keep redis-py's path, which hands big values
    to the socket without copying them."""
    if _hiredis_pack is not None and not any(_has_big_arg(cmd) for cmd in commands):
        try:
            return [b"".join([_hiredis_pack(cmd) for cmd in commands])]
        except TypeError:  # a type hiredis does not pack: redis-py's path says what
            pass
    packed: list[bytes] = conn.pack_commands(commands)
    return packed


def _replies_reader(conn: Any) -> Any:
    """The hiredis reader behind redis-py's asyncio hiredis parser, when that is the parser in
    use: replies are taken from it directly, without read_response's per-reply timeout and
    error bookkeeping (the lanes have no read timeout, and want error replies as values)."""
    parser = getattr(conn, "_parser", None)
    if _NOT_ENOUGH_DATA is None or parser is None or not hasattr(parser, "read_from_socket"):
        return None
    return getattr(parser, "_reader", None)


async def _read_replies(parser: Any, reader: Any, count: int) -> list[Any]:
    """`count` replies in order; error replies come back as exception objects (hiredis makes
    them with redis-py's parse_error, so NoScriptError, ReadOnlyError... as usual)."""
    results: list[Any] = []
    for _ in range(count):
        reply = reader.gets()
        while reply is _NOT_ENOUGH_DATA:
            await parser.read_from_socket()  # raises ConnectionError when the server closes
            reply = reader.gets()
        if isinstance(reply, RedisConnectionError):
            raise reply
        results.append(reply)
    return results


@dataclass(frozen=True, slots=True)
class Oversize:
    """A claimed message too big to be read: its first bytes, its size and its SHA-1."""

    prefix: bytes
    size: int
    digest: str

    @property
    def ref(self) -> bytes:
        """How settling scripts find it in a processing list (see claim_ref)."""
        return digest_ref(self.digest, self.size)


OVERSIZE_PREFIX = 64 << 10
_CHUNK = 1 << 16


async def _read_bulks(conn: Any, stream: asyncio.StreamReader, count: int, limit: int) -> list[Any]:
    """`count` bulk-string (or nil, or error) replies read off the stream directly, so that a
    string over `limit` bytes costs a 64 KiB prefix and a digest instead of its size twice (in
    the parser's buffer and as bytes). Costs about as much as the hiredis path for the small
    replies of a claim."""
    results: list[Any] = []
    for _ in range(count):
        try:
            head = await stream.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as exc:
            raise RedisConnectionError("connection closed by the server") from exc
        kind = head[:1]
        if kind == b"$":
            size = int(head[1:-2])
            if size < 0:
                results.append(None)
            elif size <= limit:
                try:
                    results.append((await stream.readexactly(size + 2))[:-2])
                except asyncio.IncompleteReadError as exc:
                    raise RedisConnectionError("connection closed by the server") from exc
            else:
                results.append(await _skip_bulk(stream, size))
        elif kind == b"_":
            results.append(None)
        elif kind == b"-":
            results.append(conn._parser.parse_error(head[1:-2].decode("utf-8", "replace")))
        else:
            raise InvalidResponse(f"unexpected reply to a claim: {head[:32]!r}")
    return results


async def _skip_bulk(stream: asyncio.StreamReader, size: int) -> Oversize:
    digest = hashlib.sha1()
    prefix = bytearray()
    left = size
    while left:
        chunk = await stream.read(min(left, _CHUNK))
        if not chunk:
            raise RedisConnectionError("connection closed by the server")
        digest.update(chunk)
        if len(prefix) < OVERSIZE_PREFIX:
            prefix += chunk[:OVERSIZE_PREFIX - len(prefix)]
        left -= len(chunk)
    try:
        await stream.readexactly(2)
    except asyncio.IncompleteReadError as exc:
        raise RedisConnectionError("connection closed by the server") from exc
    return Oversize(bytes(prefix), size, digest.hexdigest())


_hiredis_pack: Any = None
_NOT_ENOUGH_DATA: Any = None
try:  # redis-py's hiredis parser, as redis-py itself uses it when hiredis is installed
    from hiredis import pack_command as _hiredis_pack
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - no hiredis, or another redis-py layout
    pass


class Broker:
    """Redis for one executor or client: the keys of its queue, a client, the scripts."""

    def __init__(self, config: Config, *, client: aioredis.Redis | None = None,
                 retries: int = 0, socket_timeout: float | None = None) -> None:
        self.config = config
        self.keys = Keys.for_config(config)
        # The executor passes no socket timeout: redis-py's read timeout, nested in a task that
        # is cancelled (the control loop at shutdown), could hold the cancellation until it
        # expired. Its deadlines are its own instead (lanes, `deadline()` around the rest).
        # Typed Any on purpose: redis-py's asyncio annotations mix sync/async returns and
        # bytes/str unions; the values are checked where they are read instead.
        self.redis: Any = client or connect(
            config.redis_addr, socket_timeout=socket_timeout,
            socket_connect_timeout=min(5.0, config.redis_timeout),
            retry=Retry(ExponentialBackoff(cap=1.0), retries),
            tls_ca=config.redis_tls_ca, tls_cert=config.redis_tls_cert, tls_key=config.redis_tls_key)
        self.wait_replicas = config.replicas_to_wait
        self.scripts = Scripts()
        self.claim_lane = Lane(self.redis, config.redis_timeout)  # the claim loop's batches
        self.sink_lane = Lane(self.redis, config.redis_timeout)  # the sink's batches

    def deadline(self, extra: float = 0.0) -> asyncio.Timeout:
        """A deadline for one exchange with Redis (TimeoutError, an OSError, when it passes)."""
        return asyncio.timeout(self.config.redis_timeout + extra)

    def shorten_deadlines(self, seconds: float) -> None:
        """At shutdown: a silent Redis may hold each remaining batch this long at most."""
        for lane in (self.claim_lane, self.sink_lane):
            lane.timeout = min(lane.timeout, seconds)

    async def start(self) -> None:
        """Check Redis is there and new enough; load the scripts."""
        where = self.config.redacted_redis_addr
        try:
            async with asyncio.timeout(self.config.redis_timeout):
                version = await self.server_version()
                await self.scripts.load(self.redis)
        except TimeoutError as exc:
            raise BrokerError(f"redis at {where}: {describe(exc, self.config.redis_timeout, self.config.redis_addr)}",
                              transient=True) from exc
        except (RedisError, OSError) as exc:
            raise BrokerError(f"redis at {where}: {describe(exc, self.config.redis_timeout, self.config.redis_addr)}",
                              transient=is_transient(exc)) from exc
        if version < (6, 2):
            raise BrokerError(f"redis at {where} is {'.'.join(map(str, version))}; "
                              "task-job needs 6.2 or newer (BLMOVE)")

    async def move_due_forever(self, fire: Callable[[], Awaitable[None]] | None = None,
                               end_waiting: Callable[[], Awaitable[None]] | None = None) -> None:
        """Move parked tasks that are due onto their queues (any number of movers, in
        executors and dispatchers: each task moves once); looks again within MOVE_INTERVAL,
        sooner when a task is due sooner, at once while many are due. The same look tells
        when a schedule is due (`fire` fires it, task_job.schedule) and when tasks waiting for
        dependencies are to be cancelled (`end_waiting` writes their done records)."""
        keys = [self.keys.scheduled, self.keys.scheduled_ids]
        if fire is not None or end_waiting is not None:
            keys += [self.keys.schedule_due, self.keys.waiting[1]]
        while True:
            try:
                async with self.deadline():
                    moved, wait, schedules, ending = await self.call("move_due", keys, [MOVE_BATCH])
                if fire is not None and float(schedules) == 0:
                    async with self.deadline(self.config.redis_timeout):
                        await fire()
                    continue
                if end_waiting is not None and int(ending):
                    async with self.deadline(self.config.redis_timeout):
                        await end_waiting()
                if int(moved) >= MOVE_BATCH:
                    continue
                waits = [float(w) for w in (wait, schedules) if float(w) >= 0]
                await asyncio.sleep(min([MOVE_INTERVAL, *[max(w, 0.001) for w in waits]]))
            except (RedisConnectionError, RedisTimeoutError, OSError, BrokerError):
                await asyncio.sleep(1.0)  # the claim loop reports outages
            except Exception:  # e.g. OOM: a background loop logs and goes on
                log.exception("moving due tasks failed")
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        await self.claim_lane.close()
        await self.sink_lane.close()
        await self.redis.aclose()

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.scripts.call(self.redis, name, keys, args)

    async def call_many(self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
                        ) -> list[Any]:
        """The same script for several (keys, args) in one round trip on the claim lane.
        Raises on network and transient errors; the scripts must be safe to repeat."""
        sha = self.scripts.sha[name]
        results = await self.send(self.claim_lane,
                                  [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def send(self, lane: Lane, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """A batch on a lane; when scripts are missing (Redis restarted, SCRIPT FLUSH) they
        are loaded and the batch sent again, once: every op we send is safe to repeat. Still
        missing after that (a server swapped mid-way) raises a connection error: retry later."""
        results = await lane.execute(commands)
        if any(isinstance(r, NoScriptError) for r in results):
            await self.scripts.load(self.redis)
            results = await lane.execute(commands)
            if any(isinstance(r, NoScriptError) for r in results):
                raise RedisConnectionError("scripts missing right after loading them")
        return results

    async def claim_wait(self, source: str, processing: str, timeout: float) -> bytes | Oversize | None:
        """One message moved to `processing`, waiting up to `timeout` seconds (BLMOVE)."""
        (moved,) = await self.claim_lane.execute(
            [("BLMOVE", source, processing, "LEFT", "RIGHT", timeout)], block=timeout,
            bulk_limit=self.config.max_message_bytes)
        if isinstance(moved, Exception):
            raise moved
        return moved  # type: ignore[no-any-return]

    async def claim_now(self, source: str, processing: str, count: int) -> list[bytes | Oversize]:
        """Up to `count` queued messages moved to `processing` in one round trip (LMOVE each,
        no blocking); fewer when the queue runs out."""
        (moved,) = await self.claim_from([source], processing, count)
        return moved

    async def claim_from(self, sources: Sequence[str], processing: str, count: int
                         ) -> list[list[bytes | Oversize]]:
        """Up to `count` messages from each source, moved to `processing`, in one round
        trip; per source, what moved."""
        moved = await self.claim_lane.execute(
            [("LMOVE", source, processing, "LEFT", "RIGHT") for source in sources for _ in range(count)],
            bulk_limit=self.config.max_message_bytes)
        for result in moved:
            if isinstance(result, Exception):
                raise result
        return [[raw for raw in moved[i * count:(i + 1) * count] if raw is not None]
                for i in range(len(sources))]

    async def acknowledged(self) -> None:
        """With wait_replicas, wait (briefly) until replicas hold what was written so far, so a
        failover cannot take back a claim or a done record."""
        if self.wait_replicas:
            await self.redis.execute_command("WAIT", self.wait_replicas, WAIT_TIMEOUT_MS)

    async def server_version(self) -> tuple[int, ...]:
        info = await self.redis.info("server")
        return tuple(int(p) for p in str(info["redis_version"]).split(".")[:3])
