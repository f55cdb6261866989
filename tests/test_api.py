"""The management API over real HTTP, a real unix socket and real TLS, against a running
executor and Redis: every endpoint, every scope allowed and denied, `allow` narrowing, live
logs over SSE resumed with Last-Event-ID, metrics parsed, the description checked."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from task_job.config import ApiToken, Config
from task_job.embedded import free_port

from .conftest import wait_done, wait_until

TOKENS = {"reader": ("read",), "submitter": ("submit",), "killer": ("kill", "read"),
          "admin": ("admin",), "teamA": ("submit", "read")}


def _secret(name: str) -> str:
    return f"secret-{name}-0123456789"


def api_tokens() -> tuple[ApiToken, ...]:
    return tuple(ApiToken(name, hashlib.sha256(_secret(name).encode()).hexdigest(), scopes,
                          ("teamA/*",) if name == "teamA" else ())
                 for name, scopes in TOKENS.items())


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {_secret(name)}"}


class Api:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base, self.session = base, session

    async def call(self, method: str, path: str, token: str | None = "admin",
                   **kw: Any) -> tuple[int, Any]:
        headers = {**(auth(token) if token else {}), **kw.pop("headers", {})}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as resp:
            body = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, orjson.loads(body)
            return resp.status, body.decode()


@pytest.fixture
def scripts(cmd_dir: Path) -> Path:
    for rel, text in {"hello.sh": "#!/bin/sh\necho \"hello $1\"\necho oops >&2\nexit ${2:-0}\n",
                      "slow.sh": "#!/bin/sh\nfor i in $(seq 1 $1); do echo line $i; sleep 0.05; done\n",
                      "teamA/a.sh": "#!/bin/sh\necho A\n", "teamB/b.sh": "#!/bin/sh\necho B\n"}.items():
        path = cmd_dir / rel
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    return cmd_dir


@pytest.fixture
async def api(make_config: Callable[..., Config], start_executor: Any, scripts: Path
              ) -> AsyncIterator[tuple[Api, Config, Any]]:
    config = make_config(server_port=free_port(), api_tokens=api_tokens())
    handle = await start_executor(config)
    async with aiohttp.ClientSession() as session:
        yield Api(f"http://127.0.0.1:{config.server_port}", session), config, handle


def task(cmdline: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "task": {"cmdline": cmdline, "cmd_args": list(args), **extra}}


async def test_submit_and_wait_returns_the_done_record_with_the_last_lines(api: Any) -> None:
    client, config, handle = api
    msg = task("hello.sh", "world", "3")
    status, body = await client.call("POST", "/api/v1/tasks?wait=30", "submitter", json=msg)
    assert status == 200, body
    assert body["id"] == msg["id"] and body["status"] == "failed"
    assert body["done"]["exit_code"] == 3 and body["done"]["submitted_by"] == "token:submitter"
    assert body["stdout_last"] == "hello world" and body["stderr_last"] == "oops"
    status, state = await client.call("GET", f"/api/v1/tasks/{msg['id']}", "reader")
    assert status == 200 and state["status"] == "failed" and state["exit_code"] == 3
    assert state["submitted_by"] == "token:submitter" and isinstance(state["finished_at"], float)


async def test_bad_bodies_and_unknown_ids_get_clear_errors(api: Any) -> None:
    client, _, _ = api
    status, body = await client.call("POST", "/api/v1/tasks", "submitter", json={"task": {}})
    assert status == 400 and body["error"]["field"] == "task.cmdline", body
    status, body = await client.call("POST", "/api/v1/tasks", "submitter", data=b"{nope")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = await client.call("POST", "/api/v1/tasks", "submitter",
                                     json=task("hello.sh", timeout="soon"))
    assert status == 400 and body["error"]["field"] == "task.timeout", body
    status, body = await client.call("GET", "/api/v1/tasks/no-such-task", "reader")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await client.call("POST", "/api/v1/tasks/no-such-task/kill", "killer")
    assert status == 404
    status, body = await client.call("GET", "/api/v1/tasks?status=bogus", "reader")
    assert status == 400 and body["error"]["field"] == "status"
    msg = task("hello.sh")
    assert (await client.call("POST", "/api/v1/tasks?wait=30", "submitter", json=msg))[0] == 200
    status, body = await client.call("POST", "/api/v1/tasks", "submitter", json=msg)
    assert status == 409 and body["error"]["field"] == "id"


@pytest.mark.parametrize(("method", "path", "scope"), [
    ("GET", "/api/v1/tasks", "read"), ("GET", "/api/v1/executors", "read"),
    ("GET", "/api/v1/queues", "read"), ("GET", "/api/v1/dead", "read"),
    ("GET", "/metrics", "read"), ("GET", "/readyz", "read"),
    ("POST", "/api/v1/tasks", "submit"), ("POST", "/api/v1/tasks/x/kill", "kill"),
    ("POST", "/api/v1/executors/x/drain", "admin"), ("POST", "/api/v1/dead/" + "0" * 40 + "/requeue", "admin"),
    ("GET", "/api/v1/schedules", "read"), ("POST", "/api/v1/schedules/x/pause", "admin"),
    ("DELETE", "/api/v1/schedules/x", "admin"),
])
async def test_each_scope_is_required_and_enough(api: Any, method: str, path: str, scope: str) -> None:
    client, _, _ = api
    body = task("hello.sh") if path == "/api/v1/tasks" and method == "POST" else None
    status, _ = await client.call(method, path, None, json=body)
    assert status == 401
    status, _ = await client.call(method, path, None, json=body, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    holders = {"read": "reader", "submit": "submitter", "kill": "killer", "admin": "admin"}
    for name, scopes in TOKENS.items():
        status, reply = await client.call(method, path, name, json=body)
        allowed = scope in scopes or "admin" in scopes
        if not allowed:
            assert status == 403 and "scope" in reply["error"]["message"], (name, status, reply)
        elif name == "teamA" and body is not None:  # its allow globs refuse hello.sh
            assert status == 403 and "may not run" in reply["error"]["message"]
        else:
            assert status not in (401, 403), (name, status, reply)
    assert holders[scope] in TOKENS
    assert (await client.call("GET", "/healthz", None))[0] == 200  # the one open route


async def test_allow_globs_judge_where_the_command_really_leads(api: Any) -> None:
    client, _, _ = api
    ok = task("teamA/a.sh")
    status, body = await client.call("POST", "/api/v1/tasks?wait=30", "teamA", json=ok)
    assert status == 200 and body["status"] == "succeeded" and body["stdout_last"] == "A"
    for sneaky in (task("teamA/../teamB/b.sh"), task("bash", "teamA/../teamB/b.sh"),
                   task("sh", "teamB/b.sh"), task("../teamB/b.sh", cwd="teamA")):
        status, body = await client.call("POST", "/api/v1/tasks", "teamA", json=sneaky)
        assert status == 403 and "teamB/b.sh" in body["error"]["message"], (sneaky, body)
    status, body = await client.call("POST", "/api/v1/tasks", "teamA", json=task("../etc/passwd"))
    assert status == 400 and body["error"]["field"] == "task.cmdline"
    # the same commands from a token without allow globs are queued
    status, _ = await client.call("POST", "/api/v1/tasks", "submitter", json=task("teamB/b.sh"))
    assert status == 202


async def test_logs_follow_over_sse_and_resume_with_last_event_id(api: Any) -> None:
    client, _, _ = api
    msg = task("slow.sh", "40")
    assert (await client.call("POST", "/api/v1/tasks", "submitter", json=msg))[0] == 202
    url = f"{client.base}/api/v1/tasks/{msg['id']}/logs?follow=1"
    seen: list[tuple[int, dict[str, Any]]] = []

    async def read(headers: dict[str, str], stop_after: int | None) -> None:
        async with client.session.get(url, headers={**auth("reader"), **headers}) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            event: dict[str, str] = {}
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith(":"):
                    continue
                if line:
                    key, _, value = line.partition(": ")
                    event[key] = value
                    continue
                if "data" in event:
                    seen.append((int(event["id"]), orjson.loads(event["data"])))
                    if stop_after is not None and len(seen) >= stop_after:
                        return  # a dropped connection, mid-task
                    if event.get("event") == "done":
                        return
                event = {}

    await read({}, stop_after=5)
    await read({"Last-Event-ID": str(seen[-1][0])}, stop_after=None)
    seqs = [seq for seq, _ in seen]
    assert seqs == list(range(len(seqs))), seqs  # no gap, no repeat
    assert seen[-1][1]["msg_type"] == "done" and seen[-1][1]["status"] == "succeeded"
    out = "".join(r["data"] for _, r in seen if r["msg_type"] == "stdout")
    assert out.split("\n")[:-1] == [f"line {i}" for i in range(1, 41)]
    status, body = await client.call("GET", f"/api/v1/tasks/{msg['id']}/logs", "reader")
    assert status == 200 and len(body["records"]) == len(seen)


async def test_kill_drain_resume_and_listings(api: Any, sync_redis: redis.Redis) -> None:
    client, config, handle = api
    msg = task("slow.sh", "400")
    assert (await client.call("POST", "/api/v1/tasks", "submitter", json=msg))[0] == 202
    await wait_until(lambda: msg["id"] in handle.executor.running, what="the task running")
    status, body = await client.call("GET", "/api/v1/tasks?status=running", "reader")
    assert status == 200 and [t["id"] for t in body["tasks"]] == [msg["id"]]
    assert body["tasks"][0]["message"]["task"]["cmdline"] == "slow.sh"
    status, body = await client.call("POST", f"/api/v1/tasks/{msg['id']}/kill", "killer")
    assert status == 202
    status, done = await client.call("POST", "/api/v1/tasks?wait=0", "submitter", json=task("hello.sh"))
    assert status in (200, 202)

    async def finished() -> bool:
        _, state = await client.call("GET", f"/api/v1/tasks/{msg['id']}", "reader")
        return state.get("status") == "killed"
    await wait_until(finished, what="the kill")
    _, state = await client.call("GET", f"/api/v1/tasks/{msg['id']}", "reader")
    assert "token:killer" in state["done"]["data"] and state["killed_by"] == "token:killer"
    status, body = await client.call("POST", f"/api/v1/tasks/{msg['id']}/kill", "killer")
    assert status == 409
    status, body = await client.call("GET", "/api/v1/tasks?status=killed", "reader")
    assert [t["id"] for t in body["tasks"]] == [msg["id"]]
    status, body = await client.call("GET", f"/api/v1/tasks?executor={config.executor_id}&limit=1", "reader")
    assert status == 200 and len(body["tasks"]) == 1 and body["next"]
    status, more = await client.call("GET", f"/api/v1/tasks?executor={config.executor_id}&cursor={body['next']}", "reader")
    assert status == 200 and body["tasks"][0]["id"] not in {t["id"] for t in more["tasks"]}

    # drain: no more claims, the executor stays up; resume: claims again
    status, _ = await client.call("POST", f"/api/v1/executors/{config.executor_id}/drain", "admin")
    assert status == 202
    await wait_until(lambda: handle.executor.draining, what="drained")
    status, ready = await client.call("GET", "/readyz", "reader")
    assert status == 503 and ready["checks"]["claiming"] == "drained"
    async def registry_says_draining() -> Any:
        _, row = await client.call("GET", f"/api/v1/executors/{config.executor_id}", "reader")
        return row if row["status"] == "draining" else None
    row = await wait_until(registry_says_draining, what="the registry saying draining")
    assert isinstance(row["slots"], int) and row["dead_after"] == config.dead_after
    parked = task("hello.sh")
    await client.call("POST", "/api/v1/tasks", "submitter", json=parked)
    # a claim in flight when the drain came is given back: the task stays queued
    await wait_until(lambda: sync_redis.llen(config.queue_name) == 1, what="the task queued")
    status, q = await client.call("GET", "/api/v1/queues", "reader")
    assert q["queue"]["depth"] == 1 and q["executors"][0]["processing"] == 0
    status, body = await client.call("GET", "/api/v1/tasks?status=queued", "reader")
    assert [t["id"] for t in body["tasks"]] == [parked["id"]]
    await client.call("POST", f"/api/v1/executors/{config.executor_id}/resume", "admin")
    status, body = await client.call("POST", "/api/v1/tasks?wait=30", "submitter", json=task("hello.sh"))
    assert status == 200 and body["status"] == "succeeded"
    status, ready = await client.call("GET", "/readyz", "reader")
    assert status == 200 and ready["ready"] is True
    assert (await client.call("POST", "/api/v1/executors/nobody-here/drain", "admin"))[0] == 404


async def test_dead_letters_listed_and_requeued_once(api: Any, sync_redis: redis.Redis) -> None:
    client, config, _ = api
    sync_redis.rpush(config.queue_name, b'{"task": {"cmdline": "hello.sh"}}')  # no id: dead
    await wait_until(lambda: sync_redis.llen(f"{config.queue_name}_dead") == 1, what="the dead letter")
    status, body = await client.call("GET", "/api/v1/dead", "reader")
    (row,) = body["dead"]
    assert "missing 'id'" in row["reason"] and len(row["id"]) == 40
    status, reply = await client.call("POST", f"/api/v1/dead/{row['id']}/requeue", "admin")
    assert status == 202
    await wait_until(lambda: sync_redis.llen(f"{config.queue_name}_dead") == 1, what="dead again")
    # dead again (still no id), so a new entry; the old id is gone for good
    status, reply = await client.call("POST", f"/api/v1/dead/{row['id']}/requeue", "admin")
    assert status in (202, 404)


async def test_metrics_parse_and_move(api: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client, _, _ = api

    async def sample(name: str, **labels: str) -> float:
        _, text = await client.call("GET", "/metrics", "reader")
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    before = await sample("task_job_tasks_finished_total", status="succeeded")
    await client.call("POST", "/api/v1/tasks?wait=30", "submitter", json=task("hello.sh"))
    assert await sample("task_job_tasks_finished_total", status="succeeded") == before + 1
    assert await sample("task_job_executors", status="up") >= 1
    assert await sample("task_job_claim_to_start_seconds_count") >= 1
    assert await sample("task_job_records_delivered_total", sink="redis") >= 3


async def test_events_stream_task_changes(api: Any) -> None:
    client, _, _ = api
    url = f"{client.base}/api/v1/events"
    msg = task("hello.sh")
    statuses = []
    import asyncio

    async with asyncio.timeout(30), client.session.get(url, headers=auth("reader")) as resp:
        assert resp.status == 200
        await resp.content.readline()  # ": subscribed": the subscription is in place
        await client.call("POST", "/api/v1/tasks", "submitter", json=msg)
        async for raw in resp.content:
            line = raw.decode()
            if line.startswith("data: "):
                event = orjson.loads(line[6:])
                if event.get("id") == msg["id"]:
                    statuses.append(event["status"])
                    if event["status"] != "running":
                        break
    assert statuses == ["running", "succeeded"]


async def test_whoami_and_fleet_snapshots_on_the_events_stream(api: Any) -> None:
    import asyncio

    client, config, _ = api
    status, me = await client.call("GET", "/api/v1/whoami", "submitter")  # no read scope needed
    assert status == 200 and me == {"name": "submitter", "scopes": ["submit"], "allow": []}
    assert (await client.call("GET", "/api/v1/whoami", None))[0] == 401
    assert (await client.call("GET", "/api/v1/events?snapshot=0.5", "reader"))[0] == 400
    snapshots = []
    async with asyncio.timeout(30), client.session.get(f"{client.base}/api/v1/events?snapshot=1",
                                                       headers=auth("reader")) as resp:
        event = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "fleet":
                snapshots.append((asyncio.get_running_loop().time(), orjson.loads(line[6:])))
                if len(snapshots) == 2:
                    break
    (t0, first), (t1, second) = snapshots
    assert [e["id"] for e in first["executors"]] == [config.executor_id] and first["executors"][0]["status"] == "up"
    assert first["queues"]["queue"]["depth"] == 0 and 0.5 < t1 - t0 < 3


async def test_a_dag_is_held_whole_or_refused_naming_its_cycle(api: Any, sync_redis: redis.Redis) -> None:
    client, config, _ = api
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    cyclic = {"id": f"dag-{uuid.uuid4().hex[:6]}", "tasks": [task("hello.sh", depends_on=[b]) | {"id": a},
                                                              task("hello.sh", depends_on=[a]) | {"id": b}]}
    status, body = await client.call("POST", "/api/v1/tasks", "submitter", json=cyclic)
    assert status == 400 and "cycle" in body["error"]["message"], body
    good = {"id": cyclic["id"], "tasks": [task("hello.sh") | {"id": a}, task("hello.sh", depends_on=[a]) | {"id": b}]}
    status, body = await client.call("POST", "/api/v1/tasks", "submitter", json=good)
    assert status == 202 and body == {"id": good["id"], "status": "accepted", "tasks": [a, b]}
    assert (await client.call("POST", "/api/v1/tasks", "submitter", json=good))[0] == 409
    done = await wait_done(sync_redis, config, b, timeout=20)
    assert done.fields["status"] == "succeeded" and done.fields["submitted_by"] == "token:submitter"
    status, body = await client.call("POST", "/api/v1/tasks", "teamA", json={
        "id": f"dag-{uuid.uuid4().hex[:6]}", "tasks": [task("teamA/a.sh"), task("teamB/b.sh")]})
    assert status == 403  # every task of a DAG judged by the token's allow globs


async def test_schedules_added_listed_run_paused_and_removed(api: Any, sync_redis: redis.Redis) -> None:
    client, config, _ = api
    spec = {"name": "hourly", "cron": "0 * * * *", "timezone": "Europe/Berlin",
            "task": {"cmdline": "hello.sh", "cmd_args": ["sched"]}}
    status, body = await client.call("POST", "/api/v1/schedules", "submitter", json=spec)
    assert status == 403  # a schedule runs unattended: admin only
    status, row = await client.call("POST", "/api/v1/schedules", "admin", json={**spec, "source": "forged"})
    assert status == 201 and row["next_run"] % 3600 == 0 and row["source"] == "token:admin", row
    status, body = await client.call("POST", "/api/v1/schedules", "admin", json=spec)
    assert status == 409 and body["error"]["field"] == "name"
    status, body = await client.call("POST", "/api/v1/schedules", "admin", json={**spec, "cron": "0 25 * * *"})
    assert status == 400 and "cron" in body["error"]["message"]
    status, body = await client.call("POST", "/api/v1/schedules?replace=1", "admin", json={**spec, "every": 3600, "cron": None})
    assert status == 201 and body["every"] == 3600
    status, run = await client.call("POST", "/api/v1/schedules/hourly/run", "admin")
    assert status == 202 and run["id"].startswith("hourly:run-")
    done = await wait_done(sync_redis, config, run["id"], timeout=20)
    assert done.fields["status"] == "succeeded" and done.fields["submitted_by"] == "schedule:hourly"
    status, row = await client.call("GET", "/api/v1/schedules/hourly", "reader")
    assert status == 200 and row["last_id"] == run["id"] and row["last_status"] == "succeeded"
    status, row = await client.call("POST", "/api/v1/schedules/hourly/pause", "admin")
    assert status == 200 and row["paused"] and row["next_run"] is None
    status, row = await client.call("POST", "/api/v1/schedules/hourly/resume", "admin")
    assert status == 200 and not row["paused"] and row["next_run"] % 3600 == 0
    status, listing = await client.call("GET", "/api/v1/schedules", "reader")
    assert [r["name"] for r in listing["schedules"]] == ["hourly"]
    assert (await client.call("DELETE", "/api/v1/schedules/hourly", "admin"))[0] == 200
    assert (await client.call("GET", "/api/v1/schedules/hourly", "reader"))[0] == 404
    assert (await client.call("POST", "/api/v1/schedules/hourly/run", "admin"))[0] == 404


async def test_openapi_description_matches_the_routes(api: Any) -> None:
    from task_job.api.app import ROUTES

    client, _, _ = api
    status, doc = await client.call("GET", "/api/v1/openapi.json", "reader")
    assert status == 200 and doc["openapi"].startswith("3.1")
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert described == {(m, p) for m, p, _ in ROUTES}
    for method, path, handler in ROUTES:
        op = doc["paths"][path][method.lower()]
        assert op.get("x-scope") == (handler.scope if handler.scope != "metrics" else "read")


async def test_unix_socket_tls_and_mutual_tls(make_config: Callable[..., Config], start_executor: Any,
                                              scripts: Path, tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert = ca.issue_cert("client@example")
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    sock = str(tmp_path / "api.sock")
    config = make_config(server_port=free_port(), api_tokens=api_tokens(), server_socket=sock,
                         server_socket_mode="0600", server_tls_cert=str(tmp_path / "server.pem"),
                         server_tls_key=str(tmp_path / "server.pem"), server_tls_ca=str(tmp_path / "ca.pem"))
    await start_executor(config)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):  # no client certificate: refused
            async with session.get(f"https://127.0.0.1:{config.server_port}/healthz", ssl=trusted):
                pass
    trusted.load_cert_chain(str(tmp_path / "client.pem"))
    async with aiohttp.ClientSession() as session:
        api = Api(f"https://127.0.0.1:{config.server_port}", session)
        status, body = await api.call("POST", "/api/v1/tasks?wait=30", "submitter",
                                      json=task("hello.sh", "tls"), ssl=trusted)
        assert status == 200 and body["stdout_last"] == "hello tls"
    connector = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=connector) as session:
        api = Api("http://x", session)  # plain HTTP on the socket: its mode guards it
        status, body = await api.call("GET", "/api/v1/executors", "reader")
        assert status == 200 and body["executors"][0]["id"] == config.executor_id
        assert (await api.call("GET", "/api/v1/executors", None))[0] == 401


async def test_no_tokens_configured_makes_a_private_admin_token(
        make_config: Callable[..., Config], start_executor: Any, scripts: Path) -> None:
    config = make_config(server_port=free_port())
    await start_executor(config)
    path = Path(config.state_dir) / "api-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{config.server_port}"
        async with session.get(base + "/api/v1/queues") as resp:
            assert resp.status == 401
        async with session.get(base + "/api/v1/queues", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200

    def with_the_generated_token() -> list[dict[str, Any]]:
        from task_job import Client

        with Client(url=f"http://127.0.0.1:{config.server_port}", state_dir=config.state_dir) as c:
            return c.executors()

    import asyncio

    assert [e["id"] for e in await asyncio.to_thread(with_the_generated_token)] == [config.executor_id]


def test_binding_beyond_loopback_without_tokens_is_refused(tmp_path: Path) -> None:
    from task_job.config import load_config
    from task_job.errors import ConfigError

    with pytest.raises(ConfigError, match="beyond loopback needs api_tokens"):
        load_config(overrides={"server_port": 8080, "server_host": "0.0.0.0"}, check_paths=False)
    load_config(overrides={"server_port": 8080, "server_host": "::1"}, check_paths=False)



async def test_systemd_notify_ready_status_watchdog_stopping(
        config: Config, spawn_executor: Any, scripts: Path, tmp_path: Path,
        sync_redis: redis.Redis) -> None:
    """A real executor under a NOTIFY_SOCKET the test owns: READY=1 once claiming, STATUS
    lines, WATCHDOG=1 as WatchdogSec asks, STOPPING=1 at SIGTERM; tasks never see the socket."""
    import signal
    import time

    from .conftest import wait_done, write_config

    (scripts / "env.sh").write_text("#!/bin/sh\necho \"[${NOTIFY_SOCKET:-none}]\"\n")
    (scripts / "env.sh").chmod(0o755)
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.2)
    got: list[str] = []

    def receive_until(line: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.extend(listener.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue
            if any(g.startswith(line) for g in got):
                return
        raise AssertionError(f"no {line} in {got}")

    try:
        proc = spawn_executor("run", "--config", str(write_config(tmp_path / "c.json", config)),
                              env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        receive_until("READY=1")
        receive_until("STATUS=claiming")
        receive_until("WATCHDOG=1")
        msg = task("env.sh")
        sync_redis.rpush(config.queue_name, orjson.dumps(msg))
        await wait_done(sync_redis, config, msg["id"])
        from .conftest import records_of
        out = "".join(r.data for r in records_of(sync_redis, config, msg["id"]) if r.msg_type == "stdout")
        assert out == "[none]\n"
        proc.signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert proc.wait(30) == 0
    finally:
        listener.close()


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(api: Any) -> None:
    """schemathesis, as a real process, against the served description: generated requests
    to every operation but the endless streams; no 5xx, every reply as described."""
    import asyncio
    import shutil
    import sys

    client, _, _ = api
    st = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert st is not None, "schemathesis is in the test extra"
    proc = await asyncio.create_subprocess_exec(
        st, "run", f"{client.base}/api/v1/openapi.json", "-H", f"Authorization: Bearer {_secret('admin')}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance", "--max-examples", "15", "--request-timeout", "20",
        "--exclude-path", "/api/v1/events", "--exclude-path", "/api/v1/tasks/{id}/logs",
        "--phases", "examples,fuzzing", "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 240)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.decode()[-6000:]


@pytest.mark.parametrize("transport", ["redis", "http", "socket"])
async def test_the_sync_client_has_the_same_methods_over_redis_and_http(
        make_config: Callable[..., Config], start_executor: Any, scripts: Path, tmp_path: Path,
        transport: str) -> None:
    import asyncio

    from task_job import Client

    sock = str(tmp_path / "api.sock")
    config = make_config(server_port=free_port(), api_tokens=api_tokens(), server_socket=sock)
    await start_executor(config)

    def scenario() -> None:
        if transport == "redis":
            client = Client(config)
        elif transport == "http":
            client = Client(url=f"http://127.0.0.1:{config.server_port}", token=_secret("admin"))
        else:
            client = Client(url="http://x", unix_socket=sock, token=_secret("admin"))
        with client:
            task_id = client.submit("slow.sh", ["5"])
            records = list(client.logs(task_id, follow=True))
            assert [r.data for r in records if r.msg_type == "stdout"] and records[-1].is_done
            assert "".join(r.data for r in records if r.msg_type == "stdout") == \
                "".join(f"line {i}\n" for i in range(1, 6))
            done = client.wait(task_id, timeout=30)
            assert done.fields["status"] == "succeeded"
            status = client.status(task_id)
            assert status is not None and status["status"] == "succeeded"
            assert client.status("no-such-task") is None
            assert task_id in {t["id"] for t in client.tasks(status="succeeded")}
            assert [e["id"] for e in client.executors()] == [config.executor_id]
            long = client.submit("slow.sh", ["400"])
            for record in client.logs(long, follow=True):
                if record.msg_type == "stdout":
                    client.kill(long)
                    break
            assert client.wait(long, timeout=30).fields["status"] == "killed"
            assert len(list(client.logs(long))) >= 2

    await asyncio.to_thread(scenario)


async def test_redis_going_away_gives_503_then_the_api_recovers(
        own_redis: Any, make_config: Callable[..., Config], start_executor: Any, scripts: Path) -> None:
    config = make_config(redis_addr=own_redis.url, server_port=free_port(), api_tokens=api_tokens())
    await start_executor(config)
    async with aiohttp.ClientSession() as session:
        client = Api(f"http://127.0.0.1:{config.server_port}", session)
        assert (await client.call("GET", "/readyz", "reader"))[0] == 200
        own_redis.stop()
        status, body = await client.call("GET", "/api/v1/queues", "reader")
        assert status == 503 and body["error"]["code"] == "unavailable"
        status, body = await client.call("GET", "/readyz", "reader")
        assert status == 503 and body["checks"]["redis"].startswith("unavailable")
        status, body = await client.call("POST", "/api/v1/tasks", "submitter", json=task("hello.sh"))
        assert status == 503
        own_redis.start()

        async def ready() -> bool:
            return (await client.call("GET", "/readyz", "reader"))[0] == 200
        await wait_until(ready, 30, what="ready again")
        status, body = await client.call("POST", "/api/v1/tasks?wait=30", "submitter", json=task("hello.sh"))
        assert status == 200 and body["status"] == "succeeded"
        status, body = await client.call("GET", "/api/v1/tasks?cursor=finished:zzz", "reader")
        assert status == 400 and body["error"]["field"] == "cursor"
