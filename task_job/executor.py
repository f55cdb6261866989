"""The executor: claims tasks into free slots, runs them, obeys kills, heartbeats, drains.

Wires broker, runner and sink together; holds no Redis key names and spawns nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from task_job import __version__
from task_job.broker import Broker, Oversize, parked_member
from task_job.callbacks import NATS_PREFIX, REDIS_PREFIX, Callbacks, allowed, tail_lines
from task_job.callbacks import body as callback_body
from task_job.catalogue import Catalogue, CatalogueFile, Entry
from task_job.config import Config, cmd_dir_is_shared
from task_job.confine import EnvPolicy, Policy
from task_job.deps import end_waiting, hold, hold_values, refuse
from task_job.errors import BrokerError, ConfinementError, ProtocolError
from task_job.files import TaskLogFile, prune
from task_job.fleet import NETWORK_ERRORS, Fleet, Link, backoff
from task_job.limits import Limits, count_processes, effective, tree_cpu
from task_job.protocol import (
    MsgType,
    Outcome,
    RecordHead,
    Status,
    Task,
    is_dag,
    labels_match,
    parse_control,
    parse_dag,
    parse_task,
    with_due,
)
from task_job.reaper import MARKER, Reaper
from task_job.runner import Credentials, Ending, Guard, Run, RunResult
from task_job.schedule import Scheduler
from task_job.sinks import RedisSink, TaskStream
from task_job.spawner import Spawner, interpreter_for
from task_job.stats import Stats
from task_job.users import Users, check_run_as

log = logging.getLogger(__name__)

# Seconds a BLMOVE waits. It bounds how long a stop waits for the claim loop, and how long
# after freezing an executor can still claim (dead_after must be longer: see config).
CLAIM_BLOCK = 1.0
# Once stopping, how long a silent Redis may hold each remaining batch, so that SIGTERM ends
# the process within drain_timeout + kill_grace and a few seconds.
SHUTDOWN_DEADLINE = 2.0
PROCESS_COUNT_INTERVAL = 0.1  # seconds between counts of a task's processes (max_processes)
THROTTLE_PERIOD = 0.1  # seconds of the duty cycle of max_cpu_percent
TAIL_BYTES = 16 << 10  # output kept for a callback's last lines
NO_LIMITS = Limits()


def retry_delay(task: Task, attempt: int) -> float:
    """Before attempt `attempt + 1`: retry_delay doubled per attempt, at most retry_delay_max,
    with jitter of at most ±50%."""
    base: float = min(task.retry_delay * 2.0 ** (attempt - 1), task.retry_delay_max)
    return base * random.uniform(0.5, 1.5)


@dataclass
class TaskRun:
    """A claimed task on this executor: its stream, its process once started, its kill."""

    task: Task
    stream: TaskStream
    attempt: int
    run: Run | None = None
    log_file: TaskLogFile | None = None
    kill_reason: str | None = None
    claimed_mono: float = field(default_factory=time.monotonic)
    token: str = ""  # TASK_JOB_RUN in its environment: the reaper attributes orphans by it
    limit_hit: str | None = None  # the limit the executor ended it for
    callbacks: tuple[str, ...] = ()  # where its completion goes (callbacks.py), set at start
    output: _OutputGate | None = None

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.run is not None:
            self.run.kill(reason)


def outcome_of(result: RunResult, timeout: float | None) -> Outcome:
    """Turn what the runner saw into the status and summary of the done record."""
    common: dict[str, Any] = dict(
        exit_code=result.exit_code, signal=result.signal, started_at=result.started_at,
        finished_at=result.finished_at, duration=round(result.duration, 6),
        extra={"usage": result.usage} if result.usage is not None else {},
    )
    if result.ending is Ending.TIMEOUT:
        return Outcome(Status.TIMEOUT,
                       f"killed by {result.kill_signal} after timeout of {timeout:g}s", **common)
    if result.ending is Ending.KILLED:
        return Outcome(Status.KILLED, f"killed by {result.kill_signal} ({result.kill_reason})",
                       **common)
    if result.returncode == 0:
        return Outcome(Status.SUCCEEDED, "exit status 0", **common)
    if result.returncode > 0:
        return Outcome(Status.FAILED, f"exit status {result.returncode}", **common)
    return Outcome(Status.FAILED, f"terminated by {result.signal}", **common)


class Executor:
    """One executor of the fleet; `run()` until `stop()` (or SIGTERM via the CLI)."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        # Absolute paths: the runner steps into a task's directory for each spawn (spawn()).
        config = dataclasses.replace(
            config, state_dir=os.path.abspath(config.state_dir),
            log_dir=os.path.abspath(config.log_dir) if config.log_dir else "")
        self.config = config
        self.id = config.executor_id
        self.broker = broker or Broker(config)
        self.keys = self.broker.keys
        self.sink = RedisSink(self.broker, self.id, config.buffer_bytes,
                              _spool_dir=Path(config.state_dir) / "spool")
        self.http: Any = None
        if config.logs_http:  # aiohttp (about 10 MiB) is imported only when it is used
            from task_job.http_sink import make_http_sink

            self.http = make_http_sink(config, self.id)
            self.sink.tee = self.http
        self.running: dict[str, TaskRun] = {}
        self.link = Link()
        self.fleet = Fleet(self.broker, self.sink, config, self.link,
                           running_count=lambda: len(self.running),
                           on_taken_over=self._taken_over, on_data_lost=self._adopt)
        self._settling: set[str] = set()  # ids whose done record is queued, not yet written
        self._claims = itertools.count()
        self._claim_prefix = f"{self.id}/{os.getpid()}/"  # claim tokens: unique per claim
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._ready = asyncio.Event()
        self.env_policy = EnvPolicy.build(config.task_env_allow, config.task_env_deny)
        self._env = self.env_policy.inherited(os.environ)
        root = os.path.realpath(config.cmd_dir)
        self.policy = Policy(
            cmd_dir=config.cmd_dir, interpreters=config.interpreters, mode=config.confine,
            path_env=self._env.get("PATH"), script_interpreter=config.script_interpreter,
            perl_args_unchecked=frozenset(os.path.realpath(os.path.join(root, p))
                                          for p in config.perl_args_unchecked))
        self._guard = Guard(config.max_concurrency) if config.die_with_executor else None
        self._prlimit = shutil.which("prlimit", path=self._env.get("PATH"))
        self.users = Users(config.run_as, config.allowed_users)
        self._spawners: dict[int, Spawner | None] = {}  # per run_as uid; None: use Popen
        self.reaper = Reaper(
            self._claim_prefix, running=lambda: {tr.token for tr in self.running.values()},
            task_pids=lambda: {tr.run.pid for tr in self.running.values()
                               if tr.run is not None and tr.run.pid is not None},
            guard=self._guard)
        self.claimed = 0
        self.draining = False  # an operator's drain (API), not the shutdown's
        self.last_claim_poll = 0.0  # monotonic time the claim loop last asked Redis
        self.notifier: Any = None  # notify.Notifier when run under systemd Type=notify
        self.stats = Stats()
        self.api: Any = None  # api.serve.ApiServer when server_port or server_socket is set
        self.group_limits: dict[str, int] = dict(config.groups)  # fleet-wide, from Redis
        self.scheduler = Scheduler(self.broker, dispatched=lambda: self.fleet.dispatched,
                                   state_ttl=config.task_ttl)
        self._catalogue = CatalogueFile(config.catalogue, self._env.get("PATH"))  # loaded in run()
        self.callbacks = Callbacks(state_dir=Path(config.state_dir), executor=self.id,
                                   secret=config.callback_secret, timeout=config.http_timeout,
                                   publishers={REDIS_PREFIX: lambda channel, raw: self.broker.redis.publish(channel, raw)})
        self.nats: Any = None  # bridges.nats.NatsBridge with nats_url
        self.grpc: Any = None  # a grpc.aio server with grpc_addr
        self._grpc_client: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running tasks get drain_timeout, then are killed and reported."""
        if not self._stopping.is_set():
            if self.notifier is not None:
                self.notifier.send("STOPPING=1", f"STATUS=stopping; {len(self.running)} running")
            log.info("stopping: no more claims", extra={"executor": self.id,
                                                        "running": len(self.running)})
            self._stopping.set()
            self._slot_freed.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        cfg = self.config
        check_run_as(cfg.run_as, os.geteuid())
        if cfg.confine == "cwd":
            log.warning("confine is \"cwd\": confinement is OFF; a task may run any command on "
                        "PATH or anywhere, with any interpreter option (docs/security.md)",
                        extra={"cmd_dir": cfg.cmd_dir})
        if cfg.confine == "strict" and cmd_dir_is_shared(cfg.cmd_dir):
            log.warning(
                "cmd_dir is writable by other users: anyone who can write there can run code "
                "as this executor; use a dedicated root-owned directory",
                extra={"cmd_dir": cfg.cmd_dir})
        self._catalogue.load()  # a catalogue that cannot be read at all stops the start
        if not await self._connect():
            await self.broker.close()
            log.info("executor stopped before redis answered", extra={"executor": self.id})
            return
        if self._guard is not None:
            self._guard.start()
        self.reaper.start()
        await self.sink.replay_spools()
        async with self.broker.deadline():
            await self.fleet.register()
            await self._publish_groups()
            for schedule in cfg.schedules:  # by name; the last writer wins (with a warning)
                await self.scheduler.put(dataclasses.replace(schedule, source=f"config of {self.id}"))
        self.fleet.group_keys_for = self.group_keys_for
        self.fleet.on_beat = self.refresh_groups
        self.link.up("start")
        async with self.broker.deadline():
            await self._settle_leftovers()
        log.info("executor started", extra={
            "executor": self.id, "queue": cfg.queue_name, "redis": cfg.redacted_redis_addr,
            "slots": cfg.max_concurrency, "cmd_dir": cfg.cmd_dir, "version": __version__})
        if cfg.server_port or cfg.server_socket:  # aiohttp is imported only when it is used
            from task_job.api.serve import ApiServer

            self.api = ApiServer(cfg, executor=self)
            await self.api.start()
        if cfg.nats_url:  # nats-py is imported only when it is used; it connects in the background
            from task_job.bridges.nats import NatsBridge

            self.nats = NatsBridge(self)
            self.callbacks.publishers[NATS_PREFIX] = self.nats.publish
        if cfg.grpc_addr:  # grpcio is imported only when it is used
            from task_job.bridges import grpc as grpc_bridge
            from task_job.client import AsyncClient

            self._grpc_client = AsyncClient(cfg)
            self.grpc = await grpc_bridge.serve(
                cfg, addr=cfg.grpc_addr, tls_cert=cfg.grpc_tls_cert, tls_key=cfg.grpc_tls_key,
                tls_ca=cfg.grpc_tls_ca, client=self._grpc_client, catalogue=lambda: self.catalogue)
        self._ready.set()
        # What start-up made (modules, aiohttp's when the API is on) lives as long as the
        # process: out of the collector's way, full collections stay as cheap as at start.
        gc.freeze()
        if self.notifier is not None:
            self.notifier.send("READY=1")
            self.notify_status()
        try:
            async with asyncio.TaskGroup() as tg:
                sink = tg.create_task(self.sink.run())
                http = tg.create_task(self.http.run()) if self.http else None
                callbacks = tg.create_task(self.callbacks.run())
                nats = tg.create_task(self.nats.run()) if self.nats is not None else None
                background = [tg.create_task(self.fleet.heartbeat_loop()),
                              tg.create_task(self.fleet.reaper_loop()),
                              tg.create_task(self._control_loop()),
                              tg.create_task(self.broker.move_due_forever(self.scheduler.fire_due, self._end_waiting)),
                              tg.create_task(self.reaper.loop())]
                if cfg.log_dir:
                    background.append(tg.create_task(self._prune_loop()))
                if cfg.catalogue:
                    background.append(tg.create_task(self._catalogue_loop()))
                if self.notifier is not None:
                    background.append(tg.create_task(self._notify_loop()))
                if cfg.dead_max_len or cfg.logs_max_len:
                    background.append(tg.create_task(self._caps_loop()))
                await self._claim_loop(tg)
                if self.nats is not None:
                    await self.nats.stop_receiving(nats)
                self.broker.shorten_deadlines(SHUTDOWN_DEADLINE)
                if self.link.connected_for() > 0:  # known unreachable: not worth a wait
                    await self.fleet.mark("draining")
                    await self._give_back_inbox()
                await self._drain()
                for task in background:
                    task.cancel()
                # Every done record is queued now: the sink delivers it, or spools it to
                # disk if Redis is away (replayed by the next start).
                self.sink.close()
                await sink
                if http is not None:
                    self.http.close()
                    await http
                # Callbacks the receivers take now are sent; the rest stay spooled for the next start.
                self.callbacks.close()
                try:
                    async with asyncio.timeout(cfg.http_timeout):
                        await asyncio.shield(callbacks)
                except TimeoutError:
                    callbacks.cancel()
        finally:
            if self.grpc is not None:
                await self.grpc.stop(SHUTDOWN_DEADLINE)
                await self._grpc_client.close()
            if self.nats is not None:
                await self.nats.close()
            if self.api is not None:
                await self.api.stop()
            for spawner in self._spawners.values():
                if spawner is not None:
                    spawner.close()
            self.reaper.stop()
            if self.link.connected_for() > 0:
                await self.fleet.deregister()
            await self.broker.close()
            if self._guard is not None:
                self._guard.close()
        log.info("executor stopped", extra={"executor": self.id, "claimed": self.claimed})

    async def _connect(self) -> bool:
        """Reach Redis, retrying with back-off while it is unreachable or silent; an error an
        operator must fix (password, TLS, not Redis) raises. False when stopped meanwhile."""
        attempt = 0
        while True:
            try:
                await self.broker.start()
                if attempt:
                    log.warning("redis reachable; starting", extra={"executor": self.id})
                return True
            except BrokerError as exc:
                if not exc.transient:
                    raise
                if not attempt:
                    log.error("cannot reach redis; retrying with back-off",
                              extra={"executor": self.id, "error": str(exc)})
            attempt += 1
            try:
                async with asyncio.timeout(min(5.0, 0.2 * 2 ** min(attempt, 5))):
                    await self._stopping.wait()
                return False
            except TimeoutError:
                continue

    async def _give_back_inbox(self) -> None:
        """At shutdown, the tasks waiting on this executor's own queue go back to be placed
        (the dispatcher queue when a dispatcher serves the fleet, else the shared queue)."""
        try:
            async with asyncio.timeout(SHUTDOWN_DEADLINE):
                moved = await self.broker.call(
                    "reroute", [self.keys.executors, self.keys.executor(self.id), self.keys.inbox(self.id),
                                self.keys.dispatch if self.fleet.dispatched else self.keys.queue,
                                self.keys.dispatch_stats],
                    [self.id, int(self.config.dead_after * 1000)])
            if moved:
                log.info("tasks waiting on this executor's queue given back", extra={"tasks": moved})
        except NETWORK_ERRORS as exc:
            log.warning("could not give back this executor's queue", extra={"error": repr(exc)})

    async def _drain(self) -> None:
        if self.running:
            log.info("draining", extra={"running": len(self.running),
                                        "drain_timeout": self.config.drain_timeout})
            try:
                async with asyncio.timeout(self.config.drain_timeout):
                    while self.running:
                        await self._wait_slot()
            except TimeoutError:
                reason = f"executor shutdown after drain_timeout of {self.config.drain_timeout:g}s"
                for tr in list(self.running.values()):
                    log.info("killing at shutdown", extra={"task_id": tr.task.id})
                    tr.kill(reason)
                while self.running:
                    await self._wait_slot()

    async def _wait_slot(self) -> None:
        self._slot_freed.clear()
        await self._slot_freed.wait()

    # -- leftovers -------------------------------------------------------------------------

    async def _settle_leftovers(self) -> None:
        """Settle what a previous process with this executor_id claimed and never finished."""
        raws = await self.broker.redis.lrange(self.keys.processing(self.id), 0, -1)
        await self.fleet.settle(raws, reason="its executor restarted")

    async def _reconcile(self) -> None:
        """After an outage: settle claims whose reply was lost (BLMOVE or begin executed by
        Redis, the answer never seen), once every queued op has been delivered."""
        await self.sink.drained()
        raws = await self.broker.redis.lrange(self.keys.processing(self.id), 0, -1)
        await self.fleet.settle(raws, reason="its claim was cut by a Redis outage",
                                skip=lambda i: i in self.running or i in self._settling)

    async def _prune_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(prune, self.config.log_dir, self.config.log_retention_days)
            except OSError as exc:
                log.warning("could not prune task logs", extra={"error": repr(exc)})
            await asyncio.sleep(3600)

    async def _adopt(self) -> None:
        """Redis lost its data: restore the state and claims of the tasks running here."""
        runs = list(self.running.values())
        if runs:
            adopted = await self.broker.call(
                "adopt", [self.keys.processing(self.id), *(self.keys.task(tr.task.id) for tr in runs)],
                [self.id, f"{time.time():.6f}", *(tr.task.raw for tr in runs)])
            log.warning("running tasks adopted again after redis lost its data",
                        extra={"executor": self.id, "tasks": adopted})

    async def _notify_loop(self) -> None:
        """STATUS= now and then; WATCHDOG=1 at half the WatchdogSec systemd asked for, only
        while the claim loop (or a full set of slots) shows the executor is working."""
        notifier = self.notifier
        assert notifier is not None
        period = min(notifier.watchdog / 2, 5.0) if notifier.watchdog else 5.0
        while True:
            await asyncio.sleep(period)
            self.notify_status()
            stale = time.monotonic() - self.last_claim_poll
            if notifier.watchdog and (self.draining or stale < notifier.watchdog or
                                      len(self.running) >= self.config.max_concurrency):
                notifier.send("WATCHDOG=1")

    async def _caps_loop(self) -> None:
        """Log once when a capped list reaches its cap (its oldest entries now go), and once
        when it is below it again: the caps themselves are applied by the scripts."""
        cfg = self.config
        caps = [(key, cap, name) for key, cap, name in (
            (self.keys.dead, cfg.dead_max_len, "dead_max_len"),
            (self.keys.logs, cfg.logs_max_len, "logs_max_len")) if cap]
        biting: set[str] = set()
        while True:
            await asyncio.sleep(cfg.heartbeat_interval)
            try:
                async with self.broker.deadline():
                    lengths = [await self.broker.redis.llen(key) for key, _, _ in caps]
            except NETWORK_ERRORS:
                continue
            for (key, cap, name), length in zip(caps, lengths, strict=True):
                if length >= cap and name not in biting:
                    biting.add(name)
                    log.warning(f"{name} reached: the oldest entries of {key} are dropped",
                                extra={"list": key, "cap": cap})
                elif length < cap and name in biting:
                    biting.discard(name)

    def _taken_over(self) -> None:
        """Another executor settled our tasks while we were away: stop our copies of them."""
        for tr in list(self.running.values()):
            tr.kill("its executor was declared dead and the task taken over")

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self, tg: asyncio.TaskGroup) -> None:
        processing = self.keys.processing(self.id)
        inbox, shared = self.keys.inbox(self.id), self.keys.queue
        attempt = 0
        busy = False  # the last round claimed something: the queues may hold more
        while not self._stopping.is_set():
            free = self.config.max_concurrency - len(self.running)
            if free <= 0 or self.draining:
                await self._wait_slot()  # stop() and resume wake it too
                continue
            self.last_claim_poll = time.monotonic()
            try:
                # While work is queued, fill every free slot in one round trip, from this
                # executor's own queue first; when both look empty, look once at the list
                # not waited on, then block on one (BLMOVE waits on one list only; see
                # docs/routing.md for which).
                raws: list[tuple[str, bytes | Oversize]] = \
                    await self._claim_both(inbox, shared, processing, free) if busy and free > 1 else []
                if not raws:
                    block = inbox if self._blocks_on_inbox() else shared
                    other = shared if block == inbox else inbox
                    got = await self.broker.claim_now(other, processing, 1)
                    if got:
                        raws = [(other, got[0])]
                    else:
                        raw = await self.broker.claim_wait(block, processing, CLAIM_BLOCK)
                        raws = [(block, raw)] if raw is not None else []
                busy = bool(raws)
                if raws and (self._stopping.is_set() or self.draining):
                    # Claims in flight when the stop (or a drain) came: give them back, in
                    # their places.
                    for source, raw in reversed(raws):
                        if isinstance(raw, Oversize):
                            self._reject_oversize(raw)
                        else:
                            await self.broker.call("unclaim", [processing, source], [raw])
                    raws = []
                if raws:
                    await self._claimed([raw for _, raw in raws], tg)
                if attempt:
                    async with self.broker.deadline(self.config.redis_timeout):
                        await self._reconcile()
                self.link.up("claiming")
                attempt = 0
            except NETWORK_ERRORS as exc:
                self.link.down("claiming", exc)
                busy = False
                attempt += 1
                await backoff(attempt)
            except Exception:  # a bug must not stop claiming; the claim is reconciled later
                log.exception("claim failed")
                busy = False
                attempt += 1
                await backoff(attempt)

    def group_keys_for(self, task: Task) -> list[str]:
        """For a task of a limited group: its lease set, waiting list, and the queue a waiting
        task goes to when a lease comes back (what finish/retry/requeue need to give it back)."""
        if task.group and self.group_limits.get(task.group):
            return [*self.keys.group_keys(task.group), self.keys.queue]
        return []

    async def _publish_groups(self) -> None:
        """This executor's `groups` go into Redis (last writer wins, with a warning when they
        differ from what is there); every executor then judges by what Redis holds."""
        redis = self.broker.redis
        there = {k.decode(): int(v) for k, v in (await redis.hgetall(self.keys.groups)).items()}
        for group, parallel in self.config.groups.items():
            if there.get(group) not in (None, parallel):
                log.warning("groups differ between executors' configs; this one's is used now",
                            extra={"group": group, "was": there[group], "now": parallel})
        if self.config.groups:
            await redis.hset(self.keys.groups, mapping=self.config.groups)
        await self.refresh_groups()

    async def refresh_groups(self) -> None:
        raw = await self.broker.redis.hgetall(self.keys.groups)
        self.group_limits = {k.decode(): int(v) for k, v in raw.items()}

    def _queue_for(self, task: Task) -> str:
        return self.keys.queue_for(task.executor, bool(task.labels), self.fleet.dispatched)

    async def _park(self, raw: bytes, task: Task) -> bool:
        """A task not due yet (a raw push carrying task.enqueue_at or task.delay) waits in
        {Q}:scheduled; a delay is fixed into enqueue_at, by Redis' clock, so it waits once."""
        now = time.time() + self.fleet.clock_offset
        if task.delay is not None:
            due = now + task.delay
            message = with_due(orjson.loads(raw), due)
        else:
            assert task.enqueue_at is not None
            due, message = task.enqueue_at, raw
            if due <= now:
                return False
        member = parked_member(self._queue_for(task), task.id, message)
        await self.broker.call("park", [self.keys.processing(self.id), self.keys.scheduled,
                                        self.keys.scheduled_ids], [raw, member, repr(due), task.id])
        log.info("task parked until its time", extra={"task_id": task.id, "due": due})
        return True

    async def _hold(self, raw: bytes, task: Task) -> bool:
        """A raw push carrying depends_on: it waits (leaving the processing list) unless all
        its dependencies succeeded already (False: run it now)."""
        verdict, _ = await hold(self.broker, [hold_values(
            task, self._queue_for(task), time.time() + self.fleet.clock_offset, self.config.depends_timeout)],
            claimed=raw, processing=self.keys.processing(self.id))
        if verdict == "ok":
            log.info("task waits for its dependencies", extra={"task_id": task.id,
                                                               "depends_on": list(task.depends_on)})
        return verdict == "ok"

    async def _dag(self, raw: bytes) -> bool:
        """A whole DAG pushed raw: held all-or-nothing, or rejected whole naming why (its id's
        done record). False when the message is not a DAG at all."""
        try:
            if not is_dag(orjson.loads(raw)):
                return False
        except orjson.JSONDecodeError:
            return False
        processing = self.keys.processing(self.id)
        try:
            dag = parse_dag(raw, self.config.max_message_bytes, self.config.label_max_bytes)
            verdict, detail = await hold(
                self.broker, [hold_values(t, self._queue_for(t), time.time() + self.fleet.clock_offset,
                                          self.config.depends_timeout)
                              for t in dag.tasks], dag=dag.id, dag_ids=[t.id for t in dag.tasks],
                claimed=raw, processing=processing)
            refuse(verdict, detail, dag.id)
        except ProtocolError as exc:
            self._reject(raw, exc.reason, exc.task_id)
            return True
        log.info("DAG accepted", extra={"task_id": dag.id, "tasks": len(dag.tasks)})
        return True

    @property
    def catalogue(self) -> Catalogue:
        """Named tasks (catalogue.py), as last read."""
        return self._catalogue.catalogue

    def reload_catalogue(self) -> None:
        """SIGHUP: read the catalogue again; on a file that cannot be read at all, keep the
        last good one (and say so)."""
        self._catalogue.reload()

    async def _catalogue_loop(self) -> None:
        """Reload when the file changes (looked at every two seconds)."""
        while True:
            await asyncio.sleep(2.0)
            self._catalogue.current()

    async def _end_waiting(self) -> None:
        await end_waiting(self.broker, self.sink, self.id, self._ended_waiting)

    def _ended_waiting(self, message: bytes, done: bytes) -> None:
        """Callbacks for a task that ended without running (its dependency failed, its wait
        timed out, a kill): the same destinations as if it had run here."""
        try:
            task = parse_task(message)
        except ProtocolError:
            return
        destinations = self._callbacks_for(task, self.catalogue.get(task.name) if task.name else None)
        if destinations:
            raw = callback_body(task, orjson.loads(done), output="", log_path=None, log_size=None,
                                executor=self.id)
            self.callbacks.send(destinations, raw, task.id)

    async def _is_for_me(self, raw: bytes, task: Task) -> bool:
        """A task for another executor goes to its queue; one whose labels this executor
        does not match goes to the dispatcher queue when a dispatcher serves the fleet, and
        is rejected, naming its labels, when none does (docs/routing.md)."""
        processing = self.keys.processing(self.id)
        if task.executor and task.executor != self.id:
            if await self.broker.redis.zscore(self.keys.executors, task.executor) is None:
                self._reject(raw, f"executor {task.executor!r} is not registered", task.id)
                return False
            await self.broker.call("unclaim", [processing, self.keys.inbox(task.executor)], [raw])
            log.info("task for another executor moved to its queue",
                     extra={"task_id": task.id, "to": task.executor})
            return False
        if task.labels and not labels_match(task.labels, self.config.labels):
            if self.fleet.dispatched:
                await self.broker.call("unclaim", [processing, self.keys.dispatch], [raw])
                return False
            self._reject(raw, f"labels {orjson.dumps(task.labels).decode()} do not match this "
                              "executor's and no dispatcher serves the fleet", task.id)
            return False
        return True

    def _blocks_on_inbox(self) -> bool:
        """block_on: "inbox" for an executor fed by a dispatcher (its tasks arrive on its own
        queue), "shared" otherwise; "auto" decides by whether a dispatcher is registered
        (refreshed with each heartbeat)."""
        if self.config.block_on == "auto":
            return self.fleet.dispatched
        return self.config.block_on == "inbox"

    async def _claim_both(self, inbox: str, shared: str, processing: str, free: int
                          ) -> list[tuple[str, bytes | Oversize]]:
        """Up to `free` messages, this executor's own queue first, in one round trip: both
        lists are asked for `free` each, and what exceeds `free` goes back to the head of the
        shared queue, in order (only when both hold work)."""
        moved = await self.broker.claim_from([inbox, shared], processing, free)
        mine = [(inbox, raw) for raw in moved[0]]
        rest = [(shared, raw) for raw in moved[1]]
        keep = free - len(mine)
        extra = [raw for _, raw in rest[keep:] if not isinstance(raw, Oversize)]
        for raw in reversed(extra):
            await self.broker.call("unclaim", [processing, shared], [raw])
        return mine + rest[:keep] + [(shared, raw) for _, raw in rest[keep:] if isinstance(raw, Oversize)]

    async def _claimed(self, raws: list[bytes | Oversize], tg: asyncio.TaskGroup) -> None:
        """Begin the claimed messages (one round trip for all) and start what may run."""
        self.claimed += len(raws)
        self.stats.claimed += len(raws)
        claims: list[tuple[bytes, Task, str]] = []
        for raw in raws:
            if isinstance(raw, Oversize):
                self._reject_oversize(raw)
                continue
            try:
                task = parse_task(raw, self.config.max_message_bytes, self.config.label_max_bytes)
            except ProtocolError as exc:
                if b'"tasks"' in raw and await self._dag(raw):
                    continue
                self._reject(raw, exc.reason, exc.task_id)
                continue
            if (task.enqueue_at is not None or task.delay is not None) and await self._park(raw, task):
                continue
            if task.depends_on and await self._hold(raw, task):
                continue
            if (task.executor or task.labels) and not await self._is_for_me(raw, task):
                continue
            claims.append((raw, task, f"{self._claim_prefix}{next(self._claims)}"))
        if not claims:
            return
        verdicts = await self._begin(claims)
        for (raw, task, token), (verdict, last_seq, attempt) in zip(claims, verdicts, strict=True):
            verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
            if verdict == "waiting":  # its group is full: it waits in the group's list, no slot held
                log.info("task waits for a lease of its group", extra={"task_id": task.id, "group": task.group})
                continue
            if verdict == "duplicate":
                # The id already has (or will have) its one done record: no second one here.
                self._track(self.sink.dead_letter(raw, f"duplicate id {task.id!r}: already seen"))
                log.warning("rejected duplicate id", extra={"task_id": task.id,
                                                            "status": "rejected"})
                continue
            stream = self.sink.open_stream(RecordHead.of(task, self.id, int(attempt)), int(last_seq) + 1)
            if verdict == "cancelled":
                self._track(self.sink.finish(stream, Outcome(Status.CANCELLED,
                            "cancelled before it started"), raw=raw, mode="cancel"))
                log.info("task cancelled", extra={"task_id": task.id, "status": "cancelled"})
                continue
            tr = TaskRun(task, stream, int(attempt), token=token)
            self.running[task.id] = tr
            tg.create_task(self._execute(tr))

    async def _begin(self, claims: list[tuple[bytes, Task, str]]) -> list[Any]:
        """begin.lua for each claim, repeated through an outage (safe: the claim token makes
        it idempotent). Returns [verdict, last_seq, attempt] per claim."""
        attempt = 0
        calls = []
        for raw, task, token in claims:
            keys = [self.keys.task(task.id), self.keys.events]
            args: list[Any] = [self.id, f"{time.time():.6f}", token, task.id, task.submitted_by or "",
                               orjson.dumps(task.argv or [f"@{task.name}", *task.cmd_args])]
            parallel = self.group_limits.get(task.group or "")
            if task.group and parallel:  # a lease of the group, taken with the begin
                keys += [*self.keys.group_keys(task.group), self.keys.processing(self.id)]
                args += [parallel, raw]
            calls.append((keys, args))
        while True:
            try:
                results = await self.broker.call_many("begin", calls)
                await self.broker.acknowledged()  # the claims survive a failover
                return results
            except NETWORK_ERRORS as exc:
                self.link.down("claiming", exc)
                attempt += 1
                await backoff(attempt)
            except Exception:  # a bug must not stop claiming; the claim is reconciled later
                log.exception("claim failed")
                attempt += 1
                await backoff(attempt)

    def reject_message(self, raw: bytes, reason: str, task_id: str | None) -> None:
        """A message a bridge could not turn into a task: rejected, as a bad one on the queue."""
        self._reject(raw, reason, task_id)

    def _reject(self, raw: bytes, reason: str, task_id: str | None) -> None:
        log.warning("rejected message", extra={"task_id": task_id, "status": "rejected",
                                               "reason": reason})
        if task_id is None:
            self._track(self.sink.dead_letter(raw, reason))
            return
        stream = self.sink.open_stream(RecordHead(task_id, None, None, self.id))
        self._track(self.sink.finish(stream, Outcome(Status.REJECTED, f"rejected: {reason}"),
                                     raw=raw, mode="new", dead_reason=reason))

    def _reject_oversize(self, claim: Oversize) -> None:
        reason = f"message of {claim.size} bytes exceeds the limit of {self.config.max_message_bytes}"
        log.warning("rejected message", extra={"status": "rejected", "reason": reason})
        self._track(self.sink.dead_letter(claim, reason))

    def _track(self, future: asyncio.Future[Any]) -> None:
        future.add_done_callback(_log_failure)

    # -- running ---------------------------------------------------------------------------

    async def _execute(self, tr: TaskRun) -> None:
        task = tr.task
        # Stands if the executor itself is cancelled mid-run; replaced on every other path.
        outcome = Outcome(Status.KILLED, "executor cancelled the task")
        final = False
        try:
            outcome = await self._start_and_wait(tr)
        except ConfinementError as exc:
            outcome = Outcome(Status.REJECTED, f"rejected: {exc}")
        except OSError as exc:
            outcome = Outcome(Status.FAILED, f"cannot start: {exc.strerror or exc}")
        except Exception as exc:  # a bug must not lose the task: report it and go on
            log.exception("internal error running task", extra={"task_id": task.id})
            outcome = Outcome(Status.FAILED, f"internal error: {exc!r}")
        finally:
            # The done record must be queued whatever happened, cancellation included.
            if task.submitted_by:
                outcome.extra["submitted_by"] = task.submitted_by
            # (An executor shutting down retries too: the next attempt may run anywhere.)
            if task.retrying and outcome.status.value in task.retry_on and \
                    tr.attempt <= task.retries and tr.kill_reason is None:
                due = time.time() + self.fleet.clock_offset + retry_delay(task, tr.attempt)
                fut = self.sink.retry(tr.stream, outcome, raw=task.raw, attempt=tr.attempt,
                                      queue=self._queue_for(task), due=due,
                                      group_keys=self.group_keys_for(task))
                log.info("attempt failed; retrying", extra={
                    "task_id": task.id, "attempt": tr.attempt, "status": outcome.status.value,
                    "next_at": due})
            else:
                fut = self.sink.finish(tr.stream, outcome, raw=task.raw,
                                       group_keys=self.group_keys_for(task))
                final = True
            self._track(fut)
            self._settling.add(task.id)
            fut.add_done_callback(lambda _: self._settling.discard(task.id))
            del self.running[task.id]
            self.stats.finished[outcome.status.value] += 1
            if outcome.duration is not None:
                self.stats.duration.observe(outcome.duration)
            self._slot_freed.set()
            self.reaper.task_ended()
            if tr.log_file is not None:  # never raises: file errors are counted, not fatal
                await asyncio.shield(asyncio.to_thread(tr.log_file.finish, tr.stream.done))
            if final and tr.callbacks:
                self._call_back(tr, fut)
            log.info("task finished", extra={
                "task_id": task.id, "executor": self.id, "status": outcome.status.value,
                "exit_code": outcome.exit_code, "duration_s": outcome.duration,
                "summary": outcome.summary})

    def _call_back(self, tr: TaskRun, settled: asyncio.Future[Any]) -> None:
        """Queue the task's callbacks once its done record is settled (callbacks.py)."""
        if tr.stream.done is None:
            return
        done = orjson.loads(tr.stream.done)
        log_path = log_size = None
        if tr.log_file is not None:
            log_path = str(tr.log_file.path)
            with contextlib.suppress(OSError):
                log_size = os.stat(log_path).st_size
        tail = tr.output.tail if tr.output is not None and tr.output.tail is not None else b""
        raw = callback_body(tr.task, done, output=tail_lines(bytes(tail), self.config.callback_lines),
                            log_path=log_path, log_size=log_size, executor=self.id)

        if settled.done():
            self.callbacks.send(tr.callbacks, raw, tr.task.id)
        else:
            settled.add_done_callback(lambda _: self.callbacks.send(tr.callbacks, raw, tr.task.id))

    def _callbacks_for(self, task: Task, entry: Entry | None) -> tuple[str, ...]:
        """Where a task's completion goes: config's, its entry's, and task.callback when it
        lies under one of the operator's callback_allow prefixes (else the task is refused)."""
        cfg = self.config
        urls = [u for u in (cfg.callback_url, entry.callback_url if entry else "") if u]
        channels = [c for c in (cfg.callback_channel, entry.callback_channel if entry else "") if c]
        out = [*urls, *(REDIS_PREFIX + c for c in channels)]
        if self.nats is not None and (cfg.nats_callbacks == "all" or task.via == "nats"):
            out.append(NATS_PREFIX + self.nats.callback_subject)
        if task.callback is not None and allowed(task.callback, cfg.callback_allow):
            out.append(task.callback)
        return tuple(dict.fromkeys(out))

    async def _start_and_wait(self, tr: TaskRun) -> Outcome:
        task = tr.task
        cfg = self.config
        entry = self.catalogue.get(task.name) if task.name is not None else None
        tr.callbacks = self._callbacks_for(task, entry)
        if task.name is not None:  # a catalogue entry: the operator's command, the request's args
            if entry is None:
                raise ConfinementError(f"no catalogue entry {task.name!r}"
                                       + ("" if cfg.catalogue else " (no catalogue is configured)"))
            if entry.labels and not labels_match(entry.labels, cfg.labels):
                raise ConfinementError(f"catalogue entry {task.name!r} runs on executors labelled "
                                       f"{orjson.dumps(entry.labels).decode()}; this one is not (submit "
                                       "it through the API, which places it, or give task.labels)")
        if task.callback is not None and task.callback not in tr.callbacks:
            raise ConfinementError("task.callback is not under one of this executor's callback_allow "
                                   "prefixes" + ("" if cfg.callback_allow else " (none are configured)"))
        if task.env:
            self.env_policy.check(task.env)
        base_env = {**self._env, **entry.env} if entry is not None else self._env
        env = {**base_env, **task.env, MARKER: tr.token}  # one copy, whatever the task sets
        creds = self.users.for_task(task.user or (entry.user if entry is not None else None))
        if creds is not None:
            env.update(HOME=creds.home, USER=creds.user, LOGNAME=creds.user)
        if entry is not None:
            argv, workdir = entry.argv(task.cmd_args, cfg.cmd_dir), self.policy.workdir(task.cwd)
        else:
            argv, workdir = self.policy.confine(task.argv, task.cwd)
        wanted = {**entry.limits, **task.limits} if entry is not None and entry.limits else task.limits
        limits = effective(wanted, cfg.limits_default, cfg.limits_max) \
            if wanted or cfg.limits_default or cfg.limits_max else NO_LIMITS
        timeout, limit = task.timeout, task.max_output if task.max_output is not None else cfg.max_output
        if timeout is None and entry is not None:
            timeout = entry.timeout
        if limits.any:
            argv, timeout, limit = self._limited(limits, argv, timeout, limit)
        if tr.kill_reason is not None:
            return Outcome(Status.KILLED, f"killed before it started ({tr.kill_reason})")
        if cfg.log_dir:
            tr.log_file = await asyncio.to_thread(
                TaskLogFile, cfg.log_dir, task.id, time.time(), label=task.label,
                namespace=(entry.namespace if entry is not None else "") or cfg.log_namespace)
        over = (lambda: tr.kill(f"max_output of {limit} bytes exceeded")) \
            if cfg.max_output_action == "kill" else None
        output = tr.output = _OutputGate(self.sink if cfg.logs else None, tr.stream, limit, tr.log_file, over)
        if tr.callbacks and cfg.callback_lines:
            output.tail = bytearray()
        run = Run(argv, cwd=workdir, env=env, stdin=task.stdin,
                  timeout=timeout, kill_grace=cfg.kill_grace,
                  record_max_bytes=cfg.record_max_bytes, on_output=output.put,
                  guard=self._guard, creds=creds,
                  spawner=self._spawner_for(creds) if creds is not None else None)
        await run.start()
        self.stats.start_latency.observe(time.monotonic() - tr.claimed_mono)
        tr.run = run
        if tr.kill_reason is not None:
            run.kill(tr.kill_reason)
        pid = run.pid
        assert pid is not None
        self.sink.note_started(tr.stream, pid, run.started_at)
        log.info("task started", extra={"task_id": task.id, "pid": pid, "attempt": tr.attempt})
        watchers = []
        if limits.max_processes:
            watchers.append(asyncio.ensure_future(self._count_processes(tr, pid, limits.max_processes)))
        if limits.max_cpu_percent:
            watchers.append(asyncio.ensure_future(_throttle(tr, pid, limits.max_cpu_percent)))
        try:
            result = await run.wait()
        finally:
            for watcher in watchers:
                watcher.cancel()
        outcome = outcome_of(result, timeout)
        if tr.limit_hit is not None:  # ended by the executor for a limit: a failure, named
            outcome = dataclasses.replace(outcome, status=Status.FAILED,
                                          summary=f"killed: {tr.limit_hit}")
        elif outcome.status is Status.FAILED and limits.max_memory_mb is not None:
            # An rlimit makes allocations fail rather than killing: say it was in force.
            outcome = dataclasses.replace(outcome, summary=(
                f"{outcome.summary}; memory limit {limits.max_memory_mb:g} MB (RLIMIT_DATA) in force"))
        if output.dropped:
            await output.report_dropped()
            outcome.extra["dropped_bytes"] = output.dropped
        return outcome

    def _spawner_for(self, creds: Credentials) -> Spawner | None:
        """The spawner of a run_as user; None (Popen, slower) where no Python it may run is
        found for one."""
        if creds.uid not in self._spawners:  # decided once per user (Users keeps its creds)
            if interpreter_for(creds) is None:
                log.warning("no python the run_as user may run: its tasks start the slow way",
                            extra={"user": creds.user})
                self._spawners[creds.uid] = None
            else:
                self._spawners[creds.uid] = Spawner(creds)
        return self._spawners[creds.uid]

    def _limited(self, limits: Limits, argv: list[str], timeout: float | None, max_output: int
                 ) -> tuple[list[str], float | None, int]:
        """argv, timeout and output cap under a task's limits. The kernel's limits are set by
        prlimit(1) between the executor and the command: the task starts with them, no window."""
        if limits.max_execution_time_secs is not None:
            timeout = min(timeout or limits.max_execution_time_secs, limits.max_execution_time_secs)
        if limits.max_output_size_bytes is not None:
            max_output = min(max_output or limits.max_output_size_bytes, limits.max_output_size_bytes)
        if limits.rlimits:
            if self._prlimit is None:
                raise ConfinementError("limits max_memory_mb and max_open_files need prlimit "
                                       "(util-linux), which is not on this executor's PATH")
            argv = [self._prlimit, *limits.rlimits, "--", *argv]
        return argv, timeout, max_output

    async def _count_processes(self, tr: TaskRun, pid: int, limit: int) -> None:
        """End the task when its tree holds more than `limit` processes (RLIMIT_NPROC counts
        every process of a uid, and root ignores it: it cannot be per task)."""
        while True:
            await asyncio.sleep(PROCESS_COUNT_INTERVAL)
            count = await asyncio.to_thread(count_processes, pid)
            if count > limit:
                tr.limit_hit = f"{limit} processes limit"
                tr.kill(f"more than {limit} processes")
                return

    # -- control ---------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        redis = self.broker.redis
        inbox = self.keys.control_inbox(self.id)
        attempt = 0
        while True:
            try:
                async with self.broker.deadline(CLAIM_BLOCK):
                    item = await redis.blpop([self.keys.control, inbox], CLAIM_BLOCK)
                self.link.up("control")
                attempt = 0
            except NETWORK_ERRORS as exc:
                self.link.down("control", exc)
                attempt += 1
                await backoff(attempt)
                continue
            if item is None:
                continue
            key, raw = item
            try:
                async with self.broker.deadline():
                    await self._control(raw, routed=key.decode() == inbox)
            except Exception as exc:  # bad luck or a bug: log it, keep serving
                log.warning("control message not handled", extra={"error": repr(exc)})

    async def _control(self, raw: bytes, routed: bool) -> None:
        try:
            ctl = parse_control(raw, self.config.max_message_bytes)
        except ProtocolError as exc:
            log.warning("bad control message", extra={"reason": exc.reason})
            self._track(self.sink.dead_letter(raw, f"control: {exc.reason}", claimed=False))
            return
        if ctl.type in ("drain", "resume"):
            if not routed or ctl.id != self.id:
                log.warning("drain/resume ignored: it goes to an executor's own control list",
                            extra={"target": ctl.id})
                return
            await self.set_draining(ctl.type == "drain", ctl.by)
            return
        if self._kill_local(ctl.id, ctl.by):
            return
        if routed:
            log.info("kill for a task not running here: ignored", extra={"task_id": ctl.id})
            return
        by = f" (on request of {ctl.by})" if ctl.by else ""
        where, detail = await self.broker.call(
            "kill", [self.keys.task(ctl.id), self.keys.scheduled, self.keys.scheduled_ids,
                     *self.keys.waiting],
            [f"{time.time():.6f}", self.config.cancel_ttl, ctl.id, f"killed while waiting{by}"])
        where = where.decode() if isinstance(where, bytes) else where
        if where == "parked":  # it was waiting for its time: it ends here, never run again
            seq, attempt = await self.broker.redis.hmget(self.keys.task(ctl.id), "seq", "attempt")
            try:
                head = RecordHead.of(parse_task(detail), self.id, int(attempt or 0) or None)
            except ProtocolError:
                head = RecordHead(ctl.id, None, None, self.id)
            stream = self.sink.open_stream(head, int(seq or -1) + 1)
            self._track(self.sink.finish(stream, Outcome(Status.CANCELLED, f"cancelled before its time{by}"),
                                         raw=detail, mode="parked"))
            log.info("scheduled task cancelled", extra={"task_id": ctl.id, "by": ctl.by})
            return
        detail = detail.decode() if isinstance(detail, bytes) else detail
        if where == "running":
            if detail == self.id:
                if not self._kill_local(ctl.id, ctl.by):
                    log.info("kill for a task that just finished", extra={"task_id": ctl.id})
                return
            await self.broker.redis.rpush(self.keys.control_inbox(detail), raw)
            log.info("kill routed", extra={"task_id": ctl.id, "to": detail})
        elif where == "waiting":
            log.info("kill for a task waiting for its dependencies: it is cancelled",
                     extra={"task_id": ctl.id})
        elif where == "marked":
            log.info("kill for a task not started: it will be cancelled", extra={"task_id": ctl.id})
        else:
            log.info("kill for a finished task: ignored", extra={"task_id": ctl.id,
                                                               "status": detail})

    def _kill_local(self, task_id: str, by: str | None = None) -> bool:
        tr = self.running.get(task_id)
        if tr is None:
            return False
        log.info("killing task", extra={"task_id": task_id, "by": by})
        if by and tr.kill_reason is None:
            self.sink.note(tr.stream, "killed_by", by)  # ahead of the done record, same batch order
        tr.kill(f"on request of {by}" if by else "on request")
        return True

    async def set_draining(self, draining: bool, by: str | None = None) -> None:
        """An operator's drain (Nomad's node drain): no more claims, running tasks finish;
        the process stays up and `resume` claims again."""
        if draining == self.draining:
            return
        self.draining = draining
        log.info("drained: no more claims" if draining else "resumed: claiming",
                 extra={"executor": self.id, "by": by, "running": len(self.running)})
        self._slot_freed.set()  # wakes the claim loop to notice
        await self.fleet.mark("draining" if draining else "up")
        self.notify_status()

    def notify_status(self) -> None:
        """STATUS= for systemd (set by the CLI when NOTIFY_SOCKET is given)."""
        if self.notifier is not None:
            state = "draining" if self.draining else "claiming"
            self.notifier.send(f"STATUS={state}; {len(self.running)}/{self.config.max_concurrency} running")


async def _throttle(tr: TaskRun, pgid: int, percent: float) -> None:
    """max_cpu_percent by duty cycle: every THROTTLE_PERIOD the task's tree earns percent% of
    the time elapsed as CPU credit (never more than one period's worth saved up) and spends
    what it used; a task in debt is stopped (SIGSTOP to its group) until the credit is back,
    then continued. Accuracy is measured by a test and in docs/security.md."""
    share = percent / 100
    credit = 0.0
    used = await asyncio.to_thread(tree_cpu, pgid)
    since = time.monotonic()
    try:
        while tr.kill_reason is None:
            await asyncio.sleep(THROTTLE_PERIOD)
            now, cpu = time.monotonic(), await asyncio.to_thread(tree_cpu, pgid)
            credit = min(credit + share * (now - since) - (cpu - used), share * THROTTLE_PERIOD)
            used, since = cpu, now
            if credit < 0 and tr.kill_reason is None:
                os.killpg(pgid, signal.SIGSTOP)
                until = time.monotonic() - credit / share
                try:  # in short steps: a kill must not wait for the end of a pause
                    while tr.kill_reason is None and (left := until - time.monotonic()) > 0:
                        await asyncio.sleep(min(left, 0.05))
                finally:
                    os.killpg(pgid, signal.SIGCONT)
                credit, since = 0.0, time.monotonic()
    except ProcessLookupError:
        return  # the group is gone: the task ended
    finally:
        try:
            os.killpg(pgid, signal.SIGCONT)  # never leave it stopped (a kill must land)
        except ProcessLookupError:
            pass


class _OutputGate:
    """Passes output on up to max_output bytes (0 = no cap), counting the rest: to the sink
    (unless logs are off) and to the task's log file."""

    def __init__(self, sink: RedisSink | None, stream: TaskStream, limit: int,
                 log_file: TaskLogFile | None, on_exceeded: Callable[[], None] | None) -> None:
        self.sink = sink
        self.stream = stream
        self.limit = limit
        self.log_file = log_file
        self.on_exceeded = on_exceeded
        self.kept = 0
        self.dropped = 0
        self.tail: bytearray | None = None  # the last TAIL_BYTES, kept when a callback wants them

    async def put(self, kind: MsgType, data: bytes) -> None:
        if self.limit:
            room = self.limit - self.kept
            if len(data) > room:
                self.dropped += len(data) - max(room, 0)
                data = data[:max(room, 0)]
                if self.on_exceeded is not None:
                    self.on_exceeded()
            if not data:
                return
            self.kept += len(data)
        if self.tail is not None:
            self.tail += data[-TAIL_BYTES:]
            del self.tail[:-TAIL_BYTES]
        if self.log_file is not None:
            await asyncio.to_thread(self.log_file.write, data)
        if self.sink is not None:
            await self.sink.put_output(self.stream, kind, data)

    async def report_dropped(self) -> None:
        note = (f"[task-job] {self.dropped} bytes of output dropped "
                f"(max_output {self.limit} bytes)\n").encode()
        if self.sink is not None:
            await self.sink.put_output(self.stream, MsgType.STDERR, note)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a settling operation failed", extra={"error": repr(future.exception())})
