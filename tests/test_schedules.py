"""Cron and interval schedules against real Redis and executors as subprocesses: each tick
fired exactly once across the fleet while an executor is SIGKILLed, overlap skip and
replace with instances longer than the period, catch-up after every executor was stopped,
and the `task-job schedule` commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from task_job.broker import Keys
from task_job.client import AsyncClient
from task_job.config import Config

from .conftest import done_of, wait_done, wait_until, write_config

FAST = dict(heartbeat_interval=0.3, dead_after=1.5)


@pytest.fixture
def scripts(cmd_dir: Path) -> Path:
    for name, body in (("now.sh", "echo ran"), ("nap.sh", "sleep ${1:-2}")):
        (cmd_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (cmd_dir / name).chmod(0o755)
    return cmd_dir


def fleet(make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path, n: int,
          schedules: list[dict[str, Any]], prefix: str = "s", slots: int = 4) -> dict[str, Any]:
    procs = {}
    for i in range(n):
        cfg = make_config(executor_id=f"{prefix}{i}", state_dir=str(tmp_path / f"{prefix}{i}"),
                          max_concurrency=slots, **FAST)
        procs[cfg.executor_id] = spawn_executor("run", "--config", str(write_config(
            tmp_path / f"{prefix}{i}.json", cfg, schedules=schedules)))
    return procs


def state(r: redis.Redis, keys: Keys, name: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.schedule(name)).items()}


def last_run(r: redis.Redis, keys: Keys, name: str) -> int:
    return int(float(state(r, keys, name).get("last_run", 0)))


def fired(r: redis.Redis, keys: Keys, name: str) -> dict[int, float]:
    """tick -> when it was fired, for every instance of a schedule (from their state)."""
    out = {}
    for key in r.scan_iter(match=keys.task(f"{name}:*"), count=1000):
        tick = key.decode().rsplit(":", 1)[1]
        if tick.isdigit():
            out[int(tick)] = float(r.hget(key, "fired_at") or 0)
    return out


async def test_every_second_on_three_executors_fires_each_tick_exactly_once_through_a_sigkill(
        make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path, scripts: Path,
        sync_redis: redis.Redis) -> None:
    config = make_config(**FAST)
    keys = Keys.for_config(config)
    procs = fleet(make_config, spawn_executor, tmp_path, 3, [
        {"name": "tick", "every": 1, "catch_up": "all", "overlap": "allow", "task": {"cmdline": "now.sh"}}])
    first = await wait_until(lambda: last_run(sync_redis, keys, "tick"), 60, what="the first tick")
    await wait_until(lambda: last_run(sync_redis, keys, "tick") >= first + 5, 30, what="five ticks")
    victim = next(iter(procs.values()))
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    await wait_until(lambda: last_run(sync_redis, keys, "tick") >= first + 10, 30, what="ten ticks")
    async with AsyncClient(config) as client:
        assert await client.scheduler.pause("tick")
    end = last_run(sync_redis, keys, "tick")
    ticks = fired(sync_redis, keys, "tick")
    assert sorted(ticks) == list(range(min(ticks), end + 1)) and min(ticks) <= first
    for tick in ticks:  # each instance ran (or was lost with the victim) with one done record
        done = await wait_done(sync_redis, config, f"tick:{tick}", timeout=30)
        assert done.fields["status"] in ("succeeded", "lost")
        assert len(done_of(sync_redis, config, f"tick:{tick}")) == 1
    assert int(state(sync_redis, keys, "tick")["fired"]) == len(ticks)
    assert sync_redis.llen(keys.dead) == 0  # no tick pushed twice (a duplicate is dead-lettered)


async def test_overlap_skip_waits_for_the_running_instance_and_replace_kills_it(
        make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path, scripts: Path,
        sync_redis: redis.Redis) -> None:
    config = make_config(**FAST)
    keys = Keys.for_config(config)
    fleet(make_config, spawn_executor, tmp_path, 2, [
        {"name": "skipper", "every": 1, "overlap": "skip", "task": {"cmdline": "nap.sh", "cmd_args": ["2.5"]}},
        {"name": "replacer", "every": 1, "overlap": "replace", "task": {"cmdline": "nap.sh", "cmd_args": ["60"]}},
        {"name": "piler", "every": 1, "overlap": "allow", "task": {"cmdline": "nap.sh", "cmd_args": ["60"]}}],
        slots=32)
    await wait_until(lambda: int(state(sync_redis, keys, "skipper").get("fired", 0)) >= 3, 60, what="three skippers")
    async with AsyncClient(config) as client:
        for name in ("skipper", "replacer", "piler"):
            await client.scheduler.pause(name)
        skipper = sorted(fired(sync_redis, keys, "skipper"))
        replacer = sorted(fired(sync_redis, keys, "replacer"))
        piler = sorted(fired(sync_redis, keys, "piler"))
        assert int(state(sync_redis, keys, "skipper")["skipped"]) >= 2 * (len(skipper) - 1)
        spans = []
        for tick in skipper:
            done = await wait_done(sync_redis, config, f"skipper:{tick}", timeout=30)
            assert done.fields["status"] == "succeeded"
            spans.append((done.fields["started_at"], done.fields["finished_at"]))
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, spans  # never two at once
        # replace: each instance killed by the next (within kill_grace), the last by us
        assert len(replacer) >= 3
        await client.kill(f"replacer:{replacer[-1]}")
        for earlier, later in zip(replacer, replacer[1:], strict=False):
            done = await wait_done(sync_redis, config, f"replacer:{earlier}", timeout=30)
            assert done.fields["status"] == "killed" and "schedule:replacer" in done.data
            assert done.fields["finished_at"] <= later + 3.0
        # allow: they pile up, all running at once
        running = [t for t in piler if sync_redis.hget(keys.task(f"piler:{t}"), "status") == b"running"]
        assert len(running) >= 2
        for tick in piler:
            await client.kill(f"piler:{tick}")


async def test_catch_up_after_every_executor_was_stopped_for_five_ticks(
        make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path, scripts: Path,
        sync_redis: redis.Redis) -> None:
    config = make_config(**FAST)
    keys = Keys.for_config(config)
    grace = 0.3
    schedules = [{"name": f"c-{mode}", "every": 1, "catch_up": mode, "misfire_grace": grace, "overlap": "allow",
                  "task": {"cmdline": "now.sh"}} for mode in ("skip", "one", "all")]
    (proc,) = fleet(make_config, spawn_executor, tmp_path, 1, schedules, prefix="a").values()
    for s in schedules:
        await wait_until(lambda s=s: int(state(sync_redis, keys, s["name"]).get("fired", 0)) >= 2, 60,
                         what="two ticks each")
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    stopped = sync_redis.time()[0]
    await wait_until(lambda: sync_redis.time()[0] >= stopped + 6, 20, what="six seconds of Redis' clock")
    fleet(make_config, spawn_executor, tmp_path, 1, schedules, prefix="b")
    for s in schedules:
        await wait_until(lambda s=s: last_run(sync_redis, keys, s["name"]) >= stopped + 9, 60,
                         what="ticks after the restart")
    async with AsyncClient(config) as client:
        for s in schedules:
            await client.scheduler.pause(s["name"])
    got = {mode: fired(sync_redis, keys, f"c-{mode}") for mode in ("skip", "one", "all")}

    def hole(ticks: dict[int, float]) -> list[int]:
        before = max(t for t in ticks if t <= stopped)
        after = min(t for t in ticks if t > stopped)
        return list(range(before + 1, after))

    # all: every missed tick fired, late, once
    ticks = sorted(got["all"])
    assert ticks == list(range(ticks[0], ticks[-1] + 1))
    assert sum(1 for t, at in got["all"].items() if at - t > 2) >= 4
    # one: the missed ticks but the latest dropped; the latest fired alone
    assert len(hole(got["one"])) >= 4
    restart_fire = min(at for t, at in got["one"].items() if t > stopped)
    assert sum(1 for at in got["one"].values() if abs(at - restart_fire) < 0.05) == 1
    # skip: nothing fired later than its grace
    assert len(hole(got["skip"])) >= 4
    assert all(at - t <= grace + 0.3 for t, at in got["skip"].items()), got["skip"]


def cli(*args: str, config_path: Path) -> subprocess.CompletedProcess[str]:
    verb, rest = args[0], args[1:]
    return subprocess.run([sys.executable, "-m", "task_job.cli", "schedule", verb, "--config", str(config_path), *rest],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"})


async def test_schedule_commands_and_config_schedules_in_one_list(
        make_config: Callable[..., Config], spawn_executor: Any, tmp_path: Path, scripts: Path,
        sync_redis: redis.Redis) -> None:
    config = make_config(**FAST)
    keys = Keys.for_config(config)
    path = write_config(tmp_path / "client.json", config)
    fleet(make_config, spawn_executor, tmp_path, 1, [
        {"name": "nightly", "cron": "0 0 12 * * ?", "timezone": "Europe/Berlin", "task": {"cmdline": "now.sh"}}],
        prefix="cfg")
    await wait_until(lambda: sync_redis.hexists(keys.schedules, "nightly"), 60, what="the config's schedule")
    added = cli("add", "hourly", "--cron", "0 * * * *", "--", "now.sh", "a b", config_path=path)
    assert added.returncode == 0 and "next run" in added.stdout, added.stderr
    again = cli("add", "hourly", "--every", "5", "--", "now.sh", config_path=path)
    assert again.returncode == 1 and "exists" in again.stderr
    bad = cli("add", "bad", "--cron", "61 * * * *", "--", "now.sh", config_path=path)
    assert bad.returncode == 2 and "cron" in bad.stderr
    listed = cli("list", config_path=path)
    assert listed.returncode == 0
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(lines) == {"nightly", "hourly"}, listed.stdout
    assert "config of cfg0" in lines["nightly"] and lines["hourly"].rstrip().endswith("cli")
    assert cli("pause", "hourly", config_path=path).stdout.strip() == "schedule hourly: paused"
    assert sync_redis.zscore(keys.schedule_due, "hourly") is None and "paused" in cli("list", config_path=path).stdout
    assert cli("resume", "hourly", config_path=path).returncode == 0
    next_run = sync_redis.zscore(keys.schedule_due, "hourly")
    assert next_run is not None and next_run % 3600 == 0
    ran = cli("run-now", "hourly", config_path=path)
    assert ran.returncode == 0 and ran.stdout.startswith("hourly:run-")
    done = await wait_done(sync_redis, config, ran.stdout.strip(), timeout=20)
    assert done.fields["status"] == "succeeded" and done.fields.get("submitted_by") == "schedule:hourly"
    await wait_until(lambda: '"last_status": "succeeded"' in cli("list", "--json", config_path=path).stdout.replace('":"', '": "'),
                     20, what="last_status in the list")
    assert cli("remove", "hourly", config_path=path).returncode == 0
    assert cli("remove", "hourly", config_path=path).returncode == 1
    # another executor's config says otherwise: the last to start wins, and says so
    (other,) = fleet(make_config, spawn_executor, tmp_path, 1, [
        {"name": "nightly", "cron": "0 3 * * *", "task": {"cmdline": "now.sh"}}], prefix="late").values()
    await wait_until(lambda: b"config of late0" in (sync_redis.hget(keys.schedules, "nightly") or b""), 60,
                     what="the later definition")
    await wait_until(lambda: "schedule redefined" in other.output(), 10, what="the warning")
    assert "cron 0 3 * * *" in cli("list", config_path=path).stdout
