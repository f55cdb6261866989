"""The pueue-NATS worker's subjects over task-job (README, Other transports): an executor with
`nats_url` subscribes to `<prefix>.worker.<worker id>`, turns each message — a plain command
line or pueue-NATS' JSON — into a task on its own queue, registers a Eureka-shaped record on
`<prefix>.registry` (UP at start and every `nats_registry_interval`, DOWN at stop), and its
tasks' callbacks are published on `<prefix>.tasks.callback` (callbacks.py, at least once).

Confinement holds as for every producer: the pueue worker finds commands with `which`,
task-job runs only what confinement admits, or a catalogue entry the command's first word
names. Core NATS drops what is published while nobody listens; with `nats_stream` a durable
JetStream consumer takes the subject instead, each message acknowledged only once its task is
on the Redis queue, its id derived from the stream sequence when it has none of its own (a
redelivery is then a known id, never a second run). Needs `pip install 'task-job[nats]'`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import socket
import ssl
import time
import uuid
from typing import Any

import nats
import orjson
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError
from redis.exceptions import RedisError

from task_job.callbacks import NATS_PREFIX
from task_job.catalogue import Catalogue
from task_job.client import AsyncClient
from task_job.config import Config, redact_url
from task_job.errors import BrokerError, ProtocolError
from task_job.fleet import backoff, ip_address

log = logging.getLogger(__name__)

APP = "pueued-worker"
JSON_KEYS = {"command", "path", "envs", "start_immediately", "stashed", "group", "enqueue_at",
             "dependencies", "label", "print_task_id", "id"}
FETCH_BATCH = 64


class Refused(ValueError):
    """A message that cannot become a task; `fields` keeps what the callback can still say."""

    def __init__(self, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields


def worker_id(config: Config) -> str:
    """pueue's WORKER_ID: nats_worker_id, or the executor id made one subject token."""
    return config.nats_worker_id or re.sub(r"[^A-Za-z0-9_-]", "_", config.executor_id)[:64]


def translate(data: bytes, *, task_id: str, executor: str, cmd_dir: str, catalogue: Catalogue) -> dict[str, Any]:
    """A pueue-NATS message as a task message for this executor's queue (raises Refused)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("the message is not UTF-8 text") from None
    body: dict[str, Any]
    if text.lstrip().startswith("{"):
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise Refused(f"the message is not valid JSON: {exc}", command=text[:200]) from None
        if not isinstance(body, dict):
            raise Refused("a JSON message must be an object", command=text[:200])
    else:
        body = {"command": text.strip()}
    command = body.get("command")
    fields = {"command": command if isinstance(command, str) else None,
              "label": body.get("label") if isinstance(body.get("label"), str) else None,
              "group": body.get("group") if isinstance(body.get("group"), str) else None}
    unknown = sorted(set(body) - JSON_KEYS)
    if unknown:
        raise Refused(f"unknown field {unknown[0]!r} (pueue-NATS sends {', '.join(sorted(JSON_KEYS - {'id'}))})",
                      **fields)
    if not isinstance(command, str) or not command.strip():
        raise Refused("'command' is required: a command line", **fields)
    if body.get("stashed"):
        raise Refused("stashed: true is not supported (task-job has no stash; enqueue_at delays a task)", **fields)
    if isinstance(body.get("id"), (str, int)) and not isinstance(body.get("id"), bool):
        task_id = str(body["id"])
    spec: dict[str, Any]
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise Refused(f"'command' cannot be split: {exc}", **fields) from None
    if words and catalogue.get(words[0]) is not None:  # a catalogue entry: PATH lookup as its author allows
        spec = {"name": words[0], "cmd_args": words[1:]}
    else:
        spec = {"cmdline": command}
    path = body.get("path")
    if path is not None:
        if not isinstance(path, str):
            raise Refused("'path' must be a string", **fields)
        if os.path.isabs(path):
            root = os.path.realpath(cmd_dir)
            real = os.path.realpath(path)
            if real != root and not real.startswith(root.rstrip("/") + "/"):
                raise Refused(f"path {path!r} is outside cmd_dir", **fields)
            path = os.path.relpath(real, root)
        if path not in ("", "."):
            spec["cwd"] = path
    for key, target in (("envs", "env"), ("group", "group"), ("label", "label"), ("enqueue_at", "enqueue_at")):
        if body.get(key) is not None:
            spec[target] = body[key]
    if body.get("dependencies"):
        spec["depends_on"] = body["dependencies"]
    spec["executor"] = executor
    return {"id": task_id, "type": "start", "via": "nats", "task": spec}


def _ssl(config: Config) -> ssl.SSLContext | None:
    if not (config.nats_tls_ca or config.nats_tls_cert or config.nats_url.startswith("tls://")):
        return None
    context = ssl.create_default_context(cafile=config.nats_tls_ca or None)
    if config.nats_tls_cert:
        context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
    return context


class NatsBridge:
    """One executor's NATS side: its subject in, its registry record and callbacks out."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self.config: Config = executor.config
        prefix = self.config.nats_prefix
        self.worker = worker_id(self.config)
        self.subject = f"{prefix}.worker.{self.worker}"
        self.registry_subject = f"{prefix}.registry"
        self.callback_subject = f"{prefix}.tasks.callback"
        self.client = AsyncClient(self.config)
        self.nc: Any = None
        self.received = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._sub: Any = None
        self._ip = "127.0.0.1"
        self.ready = asyncio.Event()  # set once subscribed and registered

    async def run(self) -> None:
        """Connect (retrying for as long as NATS is away: the executor serves its Redis queue
        meanwhile), take the worker subject, register UP, then refresh the record until
        cancelled by stop_receiving()."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bad credentials file, a refused subscription: Redis work goes on
            log.exception("nats bridge stopped; the executor serves its Redis queue without it")

    async def _run(self) -> None:
        cfg = self.config
        self._ip = await asyncio.to_thread(ip_address)
        self.nc = await nats.connect(
            servers=[u.strip() for u in cfg.nats_url.split(",")], name=f"task-job {cfg.executor_id}",
            user_credentials=cfg.nats_creds or None, tls=_ssl(cfg), allow_reconnect=True,
            max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=5,
            error_cb=self._error, disconnected_cb=self._disconnected, reconnected_cb=self._reconnected)
        if cfg.nats_stream:
            sub = self._sub = await self._consumer()
            self._tasks.append(asyncio.ensure_future(self._fetch_loop(sub)))
        else:
            self._sub = await self.nc.subscribe(self.subject, cb=self._core_message)
        await self.nc.flush()
        await self.register("UP")
        self.ready.set()
        log.info("nats bridge listening", extra={"subject": self.subject, "server": redact_url(cfg.nats_url),
                                                 "jetstream": cfg.nats_stream or None})
        await self._registry_loop()

    async def publish(self, subject: str, raw: bytes) -> None:
        """For callbacks.py: publish and flush, so a callback counts as sent only once the
        server has it."""
        if self.nc is None or not self.nc.is_connected:
            raise ConnectionError("not connected to NATS")
        await self.nc.publish(subject, raw)
        await self.nc.flush(timeout=5)

    async def stop_receiving(self, runner: asyncio.Task[None] | None = None) -> None:
        """The executor stops: no more messages, DOWN on the registry; the connection stays
        for the callbacks of the tasks still finishing (close() ends it). `runner`: the task
        running run(), cancelled (still connecting, or refreshing the record)."""
        self._stopping.set()
        tasks = [*self._tasks, *([runner] if runner is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.nc is None or not self.nc.is_connected or not self.ready.is_set():
            return
        try:
            if self._sub is not None:
                await self._sub.unsubscribe()
            await self.register("DOWN")
        except Exception as exc:  # going down anyway
            log.warning("nats DOWN record not sent", extra={"error": repr(exc)})

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:  # every callback was flushed as it was published: nothing is left to drain
                await self.nc.close()
            except Exception as exc:
                log.warning("nats connection did not close cleanly", extra={"error": repr(exc)})
        await self.client.close()

    # -- registry --------------------------------------------------------------------------

    def record(self, status: str) -> bytes:
        host = socket.gethostname()
        return orjson.dumps({
            "hostName": host, "app": APP, "ipAddr": self._ip, "status": status,
            "port": 0, "securePort": 0, "dataCenterInfo": {"name": "MyOwn", "metadata": {}},
            "metadata": {"uuid": self.worker, "inbox": self.subject, "executor": self.config.executor_id},
            "lastUpdatedTimestamp": int(time.time() * 1000),
        })

    async def register(self, status: str) -> None:
        await self.nc.publish(self.registry_subject, self.record(status))
        await self.nc.flush(timeout=5)

    async def _registry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.nats_registry_interval)
            try:
                status = "DOWN" if self.executor.draining else "UP"
                await self.register(status)
            except Exception as exc:  # reconnecting: the next beat tries again
                log.warning("nats registry record not sent", extra={"error": repr(exc)})

    # -- messages --------------------------------------------------------------------------

    async def _core_message(self, msg: Any) -> None:
        """Core NATS cannot redeliver: a message Redis cannot take yet is held and retried
        (later messages wait behind it in the subscription, in order) until it is queued."""
        task_id = uuid.uuid4().hex
        attempt = 0
        while not await self.handle(msg.data, task_id):
            if self._stopping.is_set():
                log.error("nats message lost: redis unreachable and the executor stops",
                          extra={"task_id": task_id})
                return
            attempt += 1
            await backoff(attempt)

    async def handle(self, data: bytes, task_id: str) -> bool:
        """Turn one message into a task; True when it is settled (queued, a known id again,
        or refused with a callback), False when Redis could not take it (to be redelivered)."""
        if data.strip() == b"pong":  # the dispatcher's answer to our UP record
            log.info("nats registry acknowledged (pong)", extra={"subject": self.subject})
            return True
        self.received += 1
        try:
            message = translate(data, task_id=task_id, executor=self.config.executor_id,
                                cmd_dir=self.config.cmd_dir, catalogue=self.executor.catalogue)
            await self.client.submit_message(message, by=f"nats:{self.subject}")
        except Refused as exc:
            if await self._known(task_id):  # a redelivery of one refused before, or another's id
                log.info("nats message refused for a known id: no second record",
                         extra={"task_id": task_id, "reason": exc.reason})
                return True
            self._refuse(task_id, data, exc.reason, exc.fields)
            return True
        except ProtocolError as exc:
            if "already known" in exc.reason:  # a redelivery: it was queued the first time
                log.info("nats message for a known id: not run again", extra={"task_id": exc.task_id or task_id})
                return True
            if not await self._known(exc.task_id or task_id):
                self._refuse(exc.task_id or task_id, data, exc.reason, {"command": None})
            return True
        except (BrokerError, RedisError, ConnectionError, OSError, TimeoutError) as exc:
            log.warning("nats message not queued: redis unreachable", extra={"error": repr(exc)})
            return False
        except Exception:  # a bug must not end the subscription: redelivered (JetStream) or lost (core)
            log.exception("nats message not queued")
            return False
        log.info("task received over nats", extra={"task_id": message["id"], "subject": self.subject})
        return True

    async def _known(self, task_id: str) -> bool:
        """Whether an id has a state already (JetStream redelivers what it did not see acked)."""
        try:
            return (await self.client.whereabouts(task_id))[0] != "unknown"
        except Exception:  # Redis away: refuse (again); a duplicate rejection beats a lost one
            return False

    def _refuse(self, task_id: str, data: bytes, reason: str, fields: dict[str, Any]) -> None:
        """A message that is not a task: a rejected done record (as for a bad message on the
        queue) and a callback saying why."""
        log.warning("nats message refused", extra={"task_id": task_id, "reason": reason})
        self.executor.reject_message(data, reason, task_id)
        now = time.time()
        self.executor.callbacks.send([NATS_PREFIX + self.callback_subject], orjson.dumps({
            "id": task_id, "command": fields.get("command") or data.decode("utf-8", "replace")[:200],
            "result": "FailedToSpawn", "exit_code": None, "group": fields.get("group") or "default",
            "label": fields.get("label"), "start": None, "end": int(now), "output": "",
            "log_path": None, "log_size": None, "status": "rejected", "signal": None, "usage": None,
            "summary": f"rejected: {reason}", "executor": self.config.executor_id}), task_id)

    async def _consumer(self) -> Any:
        """The durable pull consumer on nats_stream for this worker's subject (the stream is
        made when missing)."""
        cfg = self.config
        js = self.nc.jetstream()
        try:
            await js.stream_info(cfg.nats_stream)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=cfg.nats_stream, subjects=[f"{cfg.nats_prefix}.worker.*"]))
            log.warning("jetstream stream created", extra={"stream": cfg.nats_stream,
                                                           "subjects": f"{cfg.nats_prefix}.worker.*"})
        return await js.pull_subscribe(self.subject, durable=f"task-job-{self.worker}", stream=cfg.nats_stream,
                                       config=ConsumerConfig(ack_wait=60, max_deliver=-1))

    async def _fetch_loop(self, sub: Any) -> None:
        """A message is acknowledged once its task is on the queue (or refused for good), and
        nak'd to come back a second later when Redis cannot take it."""
        while not self._stopping.is_set():
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=1)
            except NatsTimeout:
                continue
            except Exception as exc:  # reconnecting
                log.warning("jetstream fetch failed", extra={"error": repr(exc)})
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if await self.handle(msg.data, f"{self.config.nats_stream}-{seq}"):
                    await msg.ack()
                else:
                    await msg.nak(delay=1)

    # -- connection events -----------------------------------------------------------------

    async def _error(self, exc: Exception) -> None:
        log.warning("nats error", extra={"error": repr(exc)})

    async def _disconnected(self) -> None:
        log.warning("nats disconnected; reconnecting", extra={"server": redact_url(self.config.nats_url)})

    async def _reconnected(self) -> None:
        log.warning("nats reconnected", extra={"server": redact_url(self.config.nats_url)})
        try:
            await self.register("UP")
        except Exception as exc:
            log.warning("nats registry record not sent", extra={"error": repr(exc)})
