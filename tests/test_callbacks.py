"""Completion callbacks and pueue-NATS log files, against a real executor, Redis and a real
HTTP receiver: a receiver down then up gets every callback (each id once after dedupe, every
one signed), an executor SIGKILLed with callbacks unsent delivers them at its next start, a
producer's callback URL is refused unless under the operator's prefixes, callbacks go out on a
Redis channel, and a labelled task's files follow `<namespace>/<date>/<label>.log`."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiohttp import web

from task_job.callbacks import allowed
from task_job.config import Config
from task_job.embedded import free_port
from task_job.files import file_stem, shared_label_stem

from .conftest import wait_done, wait_until, write_config

SECRET = "callback-secret-" + uuid.uuid4().hex


class Receiver:
    """A webhook receiver on 127.0.0.1; answers 500 to the first `fail_first` requests."""

    def __init__(self, port: int, fail_first: int = 0) -> None:
        self.port = port
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        if len(self.requests) <= self.fail_first:
            return web.Response(status=500)
        return web.Response(text="ok")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_post("/other/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def callbacks(self) -> dict[str, dict[str, Any]]:
        """Deduped by id, each checked for a valid signature."""
        out: dict[str, dict[str, Any]] = {}
        for headers, raw in self.requests:
            want = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers.get("X-Task-Job-Signature", ""), want), headers
            body = orjson.loads(raw)
            assert headers["X-Task-Job-Id"] == body["id"]
            out[body["id"]] = body
        return out


@pytest.fixture
async def receivers() -> Any:
    made: list[Receiver] = []

    def make(port: int | None = None, fail_first: int = 0) -> Receiver:
        made.append(Receiver(port or free_port(), fail_first))
        return made[-1]

    yield make
    for receiver in made:
        await receiver.stop()


def push(r: redis.Redis, config: Config, cmdline: str, **task: Any) -> str:
    task_id = uuid.uuid4().hex[:12]
    r.rpush(config.queue_name, orjson.dumps({"id": task_id, "task": {"cmdline": cmdline, **task}}))
    return task_id


def test_callback_prefixes_compare_parsed_urls() -> None:
    prefixes = ("https://hooks.example.com/tj/", "http://127.0.0.1:9000")
    assert allowed("https://hooks.example.com/tj/a?x=1", prefixes)
    assert allowed("http://127.0.0.1:9000/anything", prefixes)
    for url in ("https://hooks.example.com.evil.net/tj/a",  # a longer host
                "https://hooks.example.com@evil.net/tj/",  # userinfo
                "https://evil@hooks.example.com/tj/a",
                "http://hooks.example.com/tj/a",  # another scheme
                "https://hooks.example.com:444/tj/a",  # another port
                "https://hooks.example.com/tjx",  # not under the path
                "https://hooks.example.com/tj/../admin",  # climbing out
                "https://hooks.example.com/tj/%2e%2e/admin",
                "http://127.0.0.1:90001/", "http://127.0.0.1:9000\r\nX: y", "ftp://127.0.0.1:9000/"):
        assert not allowed(url, prefixes), url
    assert not allowed("https://hooks.example.com/tj/a", ())


async def test_a_receiver_down_then_up_gets_each_callback_signed(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        receivers: Any, tmp_path: Path, cmd_dir: Path) -> None:
    receiver = receivers(fail_first=2)  # not listening yet; then two 500s
    log_dir = tmp_path / "logs"
    config = make_config(callback_url=receiver.url, callback_secret=SECRET, log_dir=str(log_dir),
                         callback_lines=2, server_port=free_port())
    handle = await start_executor(config)
    (cmd_dir / "noisy.sh").write_text('for i in 1 2 3 4 5; do echo "line $i"; done\necho err >&2\nexit 3\n')
    ids = {push(sync_redis, config, "args.sh hello", label="job-1"): "succeeded",
           push(sync_redis, config, "noisy.sh", label="job-1", group="nightly"): "failed",
           push(sync_redis, config, "args.sh unlabelled"): "succeeded",
           push(sync_redis, config, "args.sh x", label="../../escape me"): "succeeded",
           push(sync_redis, config, "/bin/echo outside"): "rejected"}
    for task_id, status in ids.items():
        done = await wait_done(sync_redis, config, task_id, timeout=20)
        assert done.fields["status"] == status, done.fields
    await wait_until(lambda: handle.executor.callbacks.failed > 0, 20, what="a failed delivery")
    spooled = list((Path(config.state_dir) / "callbacks").glob("*.cbspool"))
    assert spooled and sum(p.stat().st_size for p in spooled) > 0  # on disk while the receiver is away
    await receiver.start()
    await wait_until(lambda: set(receiver.callbacks()) == set(ids), 30, what="every callback")
    got = receiver.callbacks()
    assert len(receiver.requests) >= len(ids) + 2  # the 500s were retried
    assert {i: b["status"] for i, b in got.items()} == ids
    first, noisy, plain, escaped, outside = (got[i] for i in ids)
    fields = {"id", "command", "result", "exit_code", "group", "label", "start", "end", "output",
              "log_path", "log_size", "status", "signal", "usage"}
    assert fields <= set(noisy)
    assert (noisy["result"], noisy["exit_code"], noisy["group"], noisy["label"]) == ("Failed", 3, "nightly", "job-1")
    assert noisy["command"] == "noisy.sh" and noisy["output"] in ("line 5\nerr", "err\nline 5")
    assert first["result"] == "Success" and first["group"] == "default" and first["output"] == "[hello]"
    assert outside["result"] == "FailedToSpawn" and outside["log_path"] is None
    assert isinstance(noisy["start"], int) and noisy["end"] >= noisy["start"] and noisy["usage"]
    # pueue-NATS' layout: <namespace>/<date>/<label>.log and .json; the second "job-1" has its own file.
    day = dt.date.today().isoformat()
    folder = log_dir / "default" / day
    plain_name, second = (first, noisy) if first["log_path"] == str(folder / "job-1.log") else (noisy, first)
    assert plain_name["log_path"] == str(folder / "job-1.log")  # whichever started first
    assert second["log_path"] == str(folder / f"{shared_label_stem('job-1', second['id'])}.log")
    assert Path(noisy["log_path"]).read_text().count("line") == 5
    assert noisy["log_size"] == Path(noisy["log_path"]).stat().st_size
    assert orjson.loads(Path(noisy["log_path"]).with_suffix(".json").read_bytes())["status"] == "failed"
    assert plain["log_path"] == str(log_dir / day / f"{plain['id']}.log")  # no label: by id, as before
    assert escaped["log_path"] == str(log_dir / "default" / day / f"{file_stem('../../escape me')}.log")
    assert Path(escaped["log_path"]).parent == log_dir / "default" / day
    assert not list(tmp_path.glob("escape*")) and not list(log_dir.glob("escape*"))
    await wait_until(lambda: handle.executor.callbacks.pending == 0, 10, what="nothing pending")
    metrics = await scrape(config)
    assert metrics[("task_job_callbacks_total", "sent")] == len(receiver.requests) - 2
    assert metrics[("task_job_callbacks_total", "failed")] >= 3  # refused connections, then two 500s
    assert metrics[("task_job_callbacks_pending", "")] == 0 and SECRET not in str(config)


async def scrape(config: Config) -> dict[tuple[str, str], float]:
    """/metrics of the executor's API (its generated token), by (sample, outcome label)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    token = (Path(config.state_dir) / "api-token").read_text().strip()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{config.server_port}/metrics",
                               headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
            text = await resp.text()
    return {(s.name, s.labels.get("outcome", "")): float(s.value)
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_callbacks_unsent_when_the_executor_is_killed_go_out_at_its_next_start(
        make_config: Callable[..., Config], spawn_executor: Any, sync_redis: redis.Redis,
        receivers: Any, tmp_path: Path) -> None:
    receiver = receivers()
    config = make_config(executor_id=f"cb-{uuid.uuid4().hex[:6]}")
    path = write_config(tmp_path / "c.json", config, callback_url=receiver.url, callback_secret=SECRET)
    first = spawn_executor("run", "--config", str(path))
    ids = [push(sync_redis, config, f"args.sh {n}") for n in range(3)]
    for task_id in ids:
        await wait_done(sync_redis, config, task_id, timeout=20)
    await wait_until(lambda: "callback receiver unreachable" in first.output(), 20, what="a failed delivery")
    first.signal(signal.SIGKILL)
    first.wait(10)
    assert list((Path(config.state_dir) / "callbacks").glob("*.cbspool"))
    await receiver.start()
    second = spawn_executor("run", "--config", str(path))
    await wait_until(lambda: set(receiver.callbacks()) == set(ids), 30, what=f"callbacks after restart {ids} {receiver.requests}")
    assert "replaying callbacks an earlier run left unsent" in second.output()
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert not list((Path(config.state_dir) / "callbacks").glob("*.cbspool"))  # all sent: removed


async def test_a_producers_callback_url_only_under_the_operators_prefixes(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        receivers: Any, cmd_dir: Path, tmp_path: Path) -> None:
    ours, theirs = await receivers().start(), await receivers().start()
    config = make_config(callback_allow=(f"http://127.0.0.1:{ours.port}/other/",), callback_secret=SECRET)
    await start_executor(config)
    proof = tmp_path / "proof"
    (cmd_dir / "touch.sh").write_text(f"touch {proof}\n")
    refused = push(sync_redis, config, "touch.sh", callback=theirs.url)
    climbing = push(sync_redis, config, "touch.sh", callback=f"http://127.0.0.1:{ours.port}/other/../hook")
    accepted = push(sync_redis, config, "args.sh ok", callback=f"http://127.0.0.1:{ours.port}/other/hook")
    for task_id in (refused, climbing):
        done = await wait_done(sync_redis, config, task_id, timeout=20)
        assert done.fields["status"] == "rejected" and "callback_allow" in done.data
    assert (await wait_done(sync_redis, config, accepted, timeout=20)).fields["status"] == "succeeded"
    await wait_until(lambda: accepted in ours.callbacks(), 20, what="the allowed callback")
    assert set(ours.callbacks()) == {accepted} and not theirs.requests and not proof.exists()


async def test_callbacks_on_a_redis_channel_and_from_a_catalogue_entry(
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis,
        receivers: Any, tmp_path: Path, cmd_dir: Path, redis_url: str) -> None:
    receiver = await receivers().start()
    catalogue = tmp_path / "tasks.json"
    catalogue.write_text(orjson.dumps([
        {"name": "report", "cluster_type": "ops", "language": "sh", "executable": "report.sh",
         "collected": True, "namespace": "reports", "callback_url": receiver.url,
         "limits": {"max_execution_time_secs": 1}},
        {"name": "gpu-report", "cluster_type": "ops", "language": "sh", "executable": "report.sh",
         "collected": True, "labels": {"gpu": "yes"}}]).decode())
    (cmd_dir / "report.sh").write_text('echo "report $*"\nsleep "$2"\n')
    (cmd_dir / "report.sh").chmod(0o755)
    channel = f"callbacks-{uuid.uuid4().hex[:6]}"
    log_dir = tmp_path / "logs"
    config = make_config(callback_channel=channel, catalogue=str(catalogue), log_dir=str(log_dir),
                         callback_secret=SECRET)
    pubsub = sync_redis.pubsub()
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    await start_executor(config)
    quick = uuid.uuid4().hex[:12]
    slow = uuid.uuid4().hex[:12]
    for task_id, args in ((quick, ["q", "0"]), (slow, ["s", "30"])):
        sync_redis.rpush(config.queue_name, orjson.dumps(
            {"id": task_id, "task": {"name": "report", "cmd_args": args, "label": f"L-{task_id}"}}))
    assert (await wait_done(sync_redis, config, quick, timeout=20)).fields["status"] == "succeeded"
    elsewhere = uuid.uuid4().hex[:12]  # an entry for executors labelled gpu=yes, pushed raw to this one
    sync_redis.rpush(config.queue_name, orjson.dumps({"id": elsewhere, "task": {"name": "gpu-report"}}))
    done = await wait_done(sync_redis, config, elsewhere, timeout=20)
    assert done.fields["status"] == "rejected" and '{"gpu":"yes"}' in done.data
    # the entry's limit (1 s) ends the slow one long before its 30 s sleep
    assert (await wait_done(sync_redis, config, slow, timeout=20)).fields["status"] == "timeout"
    published: dict[str, dict[str, Any]] = {}

    def read_channel() -> bool:
        message = pubsub.get_message(timeout=0.1)
        if message and message["type"] == "message":
            body = orjson.loads(message["data"])
            published[body["id"]] = body
        return set(published) == {quick, slow, elsewhere}

    await wait_until(read_channel, 20, what="both on the channel", interval=0)
    pubsub.close()
    await wait_until(lambda: set(receiver.callbacks()) == {quick, slow}, 20, what="the entry's webhook")
    assert published[elsewhere]["result"] == "FailedToSpawn"
    body = published[quick]
    assert (body["name"], body["command"], body["output"]) == ("report", "report q 0", "report q 0")
    day = dt.date.today().isoformat()
    assert body["log_path"] == str(log_dir / "reports" / day / f"L-{quick}.log")
    assert published[slow]["result"] == "Failed" and published[slow]["status"] == "timeout"
