"""Named tasks from a catalogue in celery-service's own format, against a real executor
(a subprocess) and Redis: entries run with the request's arguments appended, shell entries
keep request arguments as data, a bad entry is left out while the good ones serve, SIGHUP
and a changed file reload it, and a catalogue that cannot be read keeps the last good one."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from task_job.broker import Keys
from task_job.catalogue import kebab, load
from task_job.config import Config

from .conftest import records_of, wait_done, wait_until, write_config

# celery-service's example, as its README gives it (demo3 and demopython are binaries), and
# one bad entry (a language it does not know).
CATALOGUE = """\
- name: demo1
  cluster_type: TendbCluster
  language: sh
  executable: echo hello
  args: ["aaa", "bbb"]
  collected: false
- name: demo2
  cluster_type: TendbCluster
  language: sh
  executable: s.sh
  collected: true
- name: demo3
  cluster_type: TendbCluster
  language: binary
  executable: testbin
  collected: true
- name: demopython
  cluster_type: sqlsvr
  language: binary
  executable: aaa
  collected: true
- name: demoperl
  cluster_type: redis
  language: perl
  executable: kkk.pl
  collected: true
- name: demoruby
  cluster_type: redis
  language: ruby
  executable: r.rb
  collected: true
"""


@pytest.fixture
def catalogued(make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path, cmd_dir: Path,
               sync_redis: redis.Redis) -> tuple[Config, Path, Any]:
    for name, text in {"s.sh": 'echo "s.sh got: $*"\n',  # no shebang: run by sh -c
                       "testbin": '#!/bin/sh\necho "testbin got: $*"\n',
                       "aaa": '#!/usr/bin/env python3\nimport sys\nprint("aaa got:", " ".join(sys.argv[1:]))\n',
                       "kkk.pl": 'print "kkk.pl got: @ARGV\\n";\n'}.items():
        (cmd_dir / name).write_text(text)
        (cmd_dir / name).chmod(0o755)
    path = tmp_path / "external-tasks.yaml"
    path.write_text(CATALOGUE)
    config = make_config(executor_id=f"cat-{uuid.uuid4().hex[:6]}")
    proc = spawn_executor("run", "--config", str(write_config(tmp_path / "c.json", config, catalogue=str(path))))
    wait_for = Keys.for_config(config).executors
    assert proc.proc.poll() is None
    return config, path, (proc, wait_for)


async def run_named(r: redis.Redis, config: Config, name: str, *args: str) -> tuple[dict[str, Any], str]:
    task_id = uuid.uuid4().hex
    r.rpush(config.queue_name, orjson.dumps({"id": task_id, "task": {"name": name, "cmd_args": list(args)}}))
    done = await wait_done(r, config, task_id, timeout=20)
    out = "".join(rec.data for rec in records_of(r, config, task_id) if rec.msg_type == "stdout")
    return {**done.fields, "data": done.data}, out


def test_cluster_types_become_celery_service_routes() -> None:
    assert [kebab(c) for c in ("TendbCluster", "TendbHA", "sqlsvr", "redis")] == \
        ["tendb-cluster", "tendb-ha", "sqlsvr", "redis"]


def test_a_bad_entry_is_left_out_with_one_line_and_the_rest_load(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(CATALOGUE + "- name: demo1\n  cluster_type: x\n  language: sh\n  executable: echo x\n"
                    "  collected: false\n- name: abs\n  cluster_type: x\n  language: binary\n"
                    "  executable: /bin/true\n  collected: true\n- {name: nocollected, cluster_type: x, "
                    "language: binary, executable: x}\n")
    catalogue = load(str(path))
    assert sorted(catalogue.entries) == ["demo1", "demo2", "demo3", "demoperl", "demopython"]
    assert len(catalogue.errors) == 4
    assert any("'demoruby'" in e and "language" in e for e in catalogue.errors)
    assert any("used twice" in e for e in catalogue.errors)
    assert any("'abs'" in e and "absolute" in e for e in catalogue.errors)
    assert any("'nocollected'" in e and "collected" in e for e in catalogue.errors)


async def test_celery_service_entries_run_with_the_request_arguments_appended(
        catalogued: tuple[Config, Path, Any], sync_redis: redis.Redis) -> None:
    config, _, (proc, executors) = catalogued
    await wait_until(lambda: sync_redis.zcard(executors) == 1, 60, what="the executor")
    done, out = await run_named(sync_redis, config, "demo1", "123", "456")
    assert done["status"] == "succeeded" and out == "hello aaa bbb 123 456\n"
    for name, expect in (("demo2", "s.sh got: x y\n"), ("demo3", "testbin got: x y\n"),
                         ("demopython", "aaa got: x y\n"), ("demoperl", "kkk.pl got: x y\n")):
        done, out = await run_named(sync_redis, config, name, "x", "y")
        assert (done["status"], out) == ("succeeded", expect), (name, done)
    done, _ = await run_named(sync_redis, config, "demoruby")
    assert done["status"] == "rejected" and "no catalogue entry 'demoruby'" in done["data"]
    assert "catalogue entry left out" in proc.output() and "demoruby" in proc.output()


async def test_request_arguments_to_a_shell_entry_stay_data(
        catalogued: tuple[Config, Path, Any], sync_redis: redis.Redis, tmp_path: Path) -> None:
    config, _, (_, executors) = catalogued
    await wait_until(lambda: sync_redis.zcard(executors) == 1, 60, what="the executor")
    proof = tmp_path / "pwned"
    hostile = [f"; touch {proof} #", f"$(touch {proof})", f"`touch {proof}`", f"| touch {proof}", "\"'\\"]
    done, out = await run_named(sync_redis, config, "demo1", *hostile)
    assert done["status"] == "succeeded"
    assert out == "hello aaa bbb " + " ".join(hostile) + "\n"  # verbatim
    done, out = await run_named(sync_redis, config, "demo2", *hostile)
    assert out == "s.sh got: " + " ".join(hostile) + "\n"
    assert not proof.exists()


async def test_sighup_and_a_changed_file_reload_and_an_unreadable_file_keeps_the_last_good(
        catalogued: tuple[Config, Path, Any], sync_redis: redis.Redis) -> None:
    config, path, (proc, executors) = catalogued
    await wait_until(lambda: sync_redis.zcard(executors) == 1, 60, what="the executor")
    path.write_text(CATALOGUE + "- {name: demo4, cluster_type: TendbHA, language: sh, executable: echo four, "
                    "collected: false}\n")
    proc.signal(signal.SIGHUP)
    await wait_until(lambda: "demo4" in proc.output(), 10, what="the reload")
    done, out = await run_named(sync_redis, config, "demo4", "x")
    assert (done["status"], out) == ("succeeded", "four x\n")
    path.write_text("- [this is: not, a catalogue")  # unreadable: demo4 stays
    proc.signal(signal.SIGHUP)
    await wait_until(lambda: "catalogue not reloaded" in proc.output(), 10, what="the refusal")
    done, out = await run_named(sync_redis, config, "demo4", "y")
    assert (done["status"], out) == ("succeeded", "four y\n")
    # a changed file is noticed without a signal
    path.write_text(CATALOGUE + "- {name: demo5, cluster_type: x, language: sh, executable: echo five, "
                    "collected: false}\n")
    await wait_until(lambda: "demo5" in proc.output(), 15, what="the reload on change")
    done, out = await run_named(sync_redis, config, "demo5")
    assert (done["status"], out) == ("succeeded", "five\n")


FACADE_EXTRA = """\
- {name: sleeper, cluster_type: TendbHA, language: sh, executable: sleep 60, collected: false}
- {name: failer, cluster_type: TendbHA, language: sh, executable: 'echo out; echo "it broke" >&2; exit 3', collected: false}
"""


@pytest.fixture
async def facade(make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path, cmd_dir: Path,
                 sync_redis: redis.Redis) -> Any:
    import hashlib

    import aiohttp

    from task_job.embedded import free_port

    (cmd_dir / "s.sh").write_text('echo "s.sh got: $*"\n')
    (cmd_dir / "s.sh").chmod(0o755)
    path = tmp_path / "external-tasks.yaml"
    path.write_text(CATALOGUE + FACADE_EXTRA)
    port = free_port()
    tokens = [{"name": "celery", "sha256": hashlib.sha256(b"celery-secret-0123456789").hexdigest(),
               "scopes": ["submit", "read", "kill"], "allow": ["demo*", "sleeper", "failer"]},
              {"name": "admin", "sha256": hashlib.sha256(b"admin-secret-0123456789").hexdigest(), "scopes": ["admin"]}]
    config = make_config(executor_id=f"fac-{uuid.uuid4().hex[:6]}")
    spawn_executor("run", "--config", str(write_config(
        tmp_path / "c.json", config, catalogue=str(path), server_port=port, api_tokens=tokens,
        facade_token="celery", sync_timeout=20, facade_session_ttl=1)))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        async def up() -> bool:
            try:
                async with session.get("/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, 60, interval=0.1, what="the API")
        yield session


async def call(session: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with session.request(method, path, data=None if body is None else orjson.dumps(body)) as resp:
        return resp.status, orjson.loads(await resp.read())


async def test_the_celery_service_routes_answer_in_its_shapes_without_a_token(facade: Any, tmp_path: Path) -> None:
    status, listed = await call(facade, "GET", "/list")
    assert status == 200 and listed["code"] == 0 and listed["msg"] == ""
    paths = {(r["method"], r["path"]) for r in listed["data"]}
    assert {("POST", "/sync/tendb-cluster/demo1"), ("POST", "/async/tendb-cluster/demo1"),
            ("POST", "/sync/sqlsvr/demopython"), ("POST", "/async/redis/demoperl"),
            ("POST", "/async/kill"), ("POST", "/async/query"), ("GET", "/list")} <= paths
    assert not any("demoruby" in p for _, p in paths)  # the bad entry is not served
    assert await call(facade, "POST", "/sync/tendb-cluster/demo1", ["123", "456"]) == \
        (200, {"code": 0, "data": "hello aaa bbb 123 456", "msg": ""})
    proof = tmp_path / "pwned"
    hostile = f"; touch {proof} #"
    assert await call(facade, "POST", "/sync/tendb-cluster/demo1", [hostile]) == \
        (200, {"code": 0, "data": f"hello aaa bbb {hostile}", "msg": ""})
    assert not proof.exists()
    assert await call(facade, "POST", "/sync/tendb-ha/failer") == (200, {"code": 1, "data": "out", "msg": "it broke"})
    assert (await call(facade, "POST", "/sync/redis/demo1", []))[0] == 404  # not its cluster type
    assert (await call(facade, "POST", "/sync/tendb-cluster/demo1", {"not": "an array"}))[0] == 400
    assert (await call(facade, "GET", "/api/v1/tasks"))[0] == 401  # the facade token serves only these routes


async def test_async_sessions_run_are_queried_killed_and_cleaned_up(facade: Any) -> None:
    status, started = await call(facade, "POST", "/async/tendb-cluster/demo2", ["a"])
    assert status == 200 and started["code"] == 0 and started["msg"] == ""
    session = started["data"]
    uuid.UUID(session)

    async def row(sid: str) -> dict[str, Any]:
        code_and_rows = await call(facade, "POST", "/async/query", {"session_id": sid})
        return code_and_rows[1]["data"][0]  # type: ignore[no-any-return]

    await wait_until(lambda: _done(row(session)), 20, what="the session done")
    done = await row(session)
    assert done["message"] == "s.sh got: a" and done["error"] == "" and done["done"] is True
    assert "T" in done["start_at"] and done["start_at"][-6] in "+-"  # RFC 3339 with the offset
    _, long_run = await call(facade, "POST", "/async/tendb-ha/sleeper")
    await wait_until(lambda: _running(facade, long_run["data"]), 20, what="the sleeper running")
    assert await call(facade, "POST", "/async/kill", {"session_id": long_run["data"]}) == (200, {"code": 0, "data": "", "msg": ""})
    await wait_until(lambda: _done(row(long_run["data"])), 20, what="the kill")
    assert "killed" in (await row(long_run["data"]))["error"]
    # finished more than facade_session_ttl (1 s) ago: the listing of all cleans them up
    await wait_until(lambda: _listed_none(facade), 20, interval=0.3, what="the cleanup")
    assert (await call(facade, "POST", "/async/query", {"session_id": session}))[1]["code"] == 1


async def _done(row: Any) -> bool:
    return bool((await row)["done"])


async def _running(session: Any, sid: str) -> bool:
    status, body = await call(session, "POST", "/async/query", {"session_id": sid})
    return status == 200 and body["code"] == 0 and not body["data"][0]["done"] and \
        body["data"][0]["message"] == "" and body["data"][0]["error"] == ""


async def _listed_none(session: Any) -> bool:
    _, body = await call(session, "POST", "/async/query")
    return body["code"] == 0 and body["data"] == []


async def test_submit_by_name_from_the_cli(catalogued: tuple[Config, Path, Any], sync_redis: redis.Redis,
                                           tmp_path: Path) -> None:
    import subprocess
    import sys

    config, _, (_, executors) = catalogued
    await wait_until(lambda: sync_redis.zcard(executors) == 1, 60, what="the executor")
    path = write_config(tmp_path / "client.json", config)
    result = subprocess.run([sys.executable, "-m", "task_job.cli", "submit", "--config", str(path), "--name", "demo1",
                             "--wait", "--", "1", "$(id)"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.splitlines()[1] == "hello aaa bbb 1 $(id)", result
    nothing = subprocess.run([sys.executable, "-m", "task_job.cli", "submit", "--config", str(path)],
                             capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 2 and "--name ENTRY" in nothing.stderr


def test_the_api_places_a_named_task_by_its_entrys_labels(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from task_job.api.facade import with_entry_labels

    path = tmp_path / "e.json"
    path.write_text('[{"name": "gpu", "cluster_type": "x", "language": "binary", "executable": "g",'
                    ' "collected": true, "labels": {"gpu": "yes"}, "limits": {"max_memory_mb": 64}},'
                    ' {"name": "bad", "cluster_type": "x", "language": "binary", "executable": "g",'
                    ' "collected": true, "labels": {"gpu": 1}}]')
    catalogue = load(str(path))
    assert catalogue.entries["gpu"].limits == {"max_memory_mb": 64}
    assert len(catalogue.errors) == 1 and "'labels.gpu'" in catalogue.errors[0]
    service = SimpleNamespace(catalogue=catalogue)
    body: dict[str, Any] = {"id": "1", "task": {"name": "gpu"}}
    with_entry_labels(service, body)
    assert body["task"]["labels"] == {"gpu": "yes"}
    own: dict[str, Any] = {"id": "2", "task": {"name": "gpu", "labels": {"zone": "a"}}}
    with_entry_labels(service, own)
    assert own["task"]["labels"] == {"zone": "a"}  # the task's own selectors win
