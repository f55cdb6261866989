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
