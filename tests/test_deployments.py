"""How operators reach Redis: ACL users, mutual TLS, and Sentinel with a real failover."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from task_job.client import AsyncClient
from task_job.config import Config
from task_job.embedded import RedisServer, SentinelServer, free_port

from .conftest import done_of, records_of, wait_done, wait_until


async def test_acl_user_and_password_work_and_the_password_is_never_logged(
        tmp_path: Path, make_config: Callable[..., Config], start_executor: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path / "acl").start()
    try:
        with redis.Redis.from_url(server.url) as admin:
            admin.execute_command("ACL", "SETUSER", "tj", "on", ">s3cr3t-pw", "~*", "&*", "+@all")
            admin.execute_command("ACL", "SETUSER", "default", "off")
        config = make_config(redis_addr=f"redis://tj:s3cr3t-pw@127.0.0.1:{server.port}/0")
        caplog.set_level(logging.INFO)
        await start_executor(config)
        with redis.Redis(port=server.port, username="tj", password="s3cr3t-pw") as r:
            async with AsyncClient(config) as client:
                task_id = await client.submit("install.sh", ["acl"])
                assert (await wait_done(r, config, task_id)).fields["status"] == "succeeded"
        fields = [str(vars(record)) for record in caplog.records]
        assert not [f for f in fields if "s3cr3t-pw" in f]
        started = next(r for r in caplog.records if r.getMessage() == "executor started")
        assert started.redis == f"redis://tj:***@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


class TlsProxy:
    """A TLS endpoint (client certificate required) relaying to a plain Redis."""

    def __init__(self, upstream_port: int, context: ssl.SSLContext) -> None:
        self.upstream_port = upstream_port
        self.context = context
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.handshakes = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                 ssl=self.context)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> Iterator[tuple[trustme.CA, dict[str, str]]]:
    ca = trustme.CA()
    client_cert = ca.issue_cert("task-job-executor")
    files = {"ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "client.pem"),
             "key": str(tmp_path / "client.key")}
    ca.cert_pem.write_to_path(files["ca"])
    client_cert.cert_chain_pems[0].write_to_path(files["cert"])
    client_cert.private_key_pem.write_to_path(files["key"])
    yield ca, files


@pytest.fixture
async def tls_proxy(tls_files: tuple[trustme.CA, dict[str, str]],
                    redis_server: RedisServer, redis_url: str) -> AsyncIterator[TlsProxy]:
    ca, _ = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the executor must show its cert
    proxy = TlsProxy(redis_server.port, context)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_rediss_with_ca_and_client_certificate_runs_tasks(
        tls_proxy: TlsProxy, tls_files: tuple[trustme.CA, dict[str, str]],
        make_config: Callable[..., Config], start_executor: Any, sync_redis: redis.Redis) -> None:
    _, files = tls_files
    config = make_config(redis_addr=f"rediss://127.0.0.1:{tls_proxy.port}/0",
                         redis_tls_ca=files["ca"], redis_tls_cert=files["cert"],
                         redis_tls_key=files["key"])
    await start_executor(config)
    async with AsyncClient(config) as client:
        task_id = await client.submit("install.sh", ["over tls"])
        done = await client.wait(task_id, timeout=15)
    assert done.fields["status"] == "succeeded"
    assert tls_proxy.handshakes >= 2
    assert done_of(sync_redis, config, task_id)  # it really went to that Redis


async def test_rediss_without_the_client_certificate_is_refused(
        tls_proxy: TlsProxy, tls_files: tuple[trustme.CA, dict[str, str]],
        make_config: Callable[..., Config]) -> None:
    from task_job.broker import Broker
    from task_job.errors import BrokerError

    _, files = tls_files
    config = make_config(redis_addr=f"rediss://127.0.0.1:{tls_proxy.port}/0",
                         redis_tls_ca=files["ca"])
    broker = Broker(config)
    with pytest.raises(BrokerError, match=f"redis at rediss://127.0.0.1:{tls_proxy.port}"):
        await broker.start()
    await broker.close()


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, list[SentinelServer]]]:
    master = RedisServer(tmp_path / "master").start()
    replica = RedisServer(tmp_path / "replica",
                          extra_args=("--replicaof", "127.0.0.1", str(master.port))).start()
    sentinels = []
    try:
        for i in range(3):
            sentinels.append(SentinelServer(tmp_path / f"sentinel{i}", master.port).start())
        yield master, replica, sentinels
    finally:
        for process in (*sentinels, replica, master):
            process.stop()


def master_port(sentinel: SentinelServer) -> int:
    with redis.Redis(port=sentinel.port) as s:
        return int(s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")[1])


async def test_sentinel_failover_mid_run_loses_no_claimed_task(
        sentinel_cluster: tuple[RedisServer, RedisServer, list[SentinelServer]],
        make_config: Callable[..., Config], start_executor: Any) -> None:
    master, replica, sentinels = sentinel_cluster
    with redis.Redis(port=replica.port) as r:
        await wait_until(lambda: r.info("replication").get("master_link_status") == "up", 15,
                         what="replica in sync")
    with redis.Redis(port=sentinels[0].port) as s:
        await wait_until(lambda: s.execute_command("SENTINEL", "REPLICAS", "mymaster"), 15,
                         what="sentinel sees the replica")
    nodes = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
    config = make_config(redis_addr=f"sentinel://{nodes}/mymaster", max_concurrency=4)
    assert config.replicas_to_wait == 1
    await start_executor(config)
    ids = [f"f{i}" for i in range(24)]
    async with AsyncClient(config) as client:
        for task_id in ids:
            await client.submit("sleep.sh", ["0.3"], task_id=task_id)
        await client.broker.redis.execute_command("WAIT", 1, 1000)
        with redis.Redis(port=master.port) as m:
            await wait_until(lambda: len([i for i in ids if done_of(m, config, i)]) >= 4,
                             20, what="some tasks done before the failover")
        master.stop(signal.SIGKILL)
        await wait_until(lambda: master_port(sentinels[0]) == replica.port, 30,
                         what="sentinels promote the replica")
    with redis.Redis(port=replica.port) as r:
        await wait_until(lambda: all(done_of(r, config, i) for i in ids), 60,
                         what="every task done on the new master")
        for task_id in ids:
            dones = done_of(r, config, task_id)
            assert len(dones) == 1, (task_id, dones)
            assert dones[0].fields["status"] == "succeeded", dones[0].fields
            seqs = [rec.seq for rec in records_of(r, config, task_id)]
            assert seqs == list(range(len(seqs)))


def _cli_error(*args: str) -> list[str]:
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "task_job.cli", *args], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "TASK_JOB_REDIS_TIMEOUT": "2"})
    assert result.returncode == 1, result
    return result.stderr.strip().splitlines()


def test_redis_errors_read_as_one_line_an_operator_can_act_on(
        tmp_path: Path, tls_proxy: TlsProxy, redis_server: RedisServer) -> None:
    server = RedisServer(tmp_path / "pw").start()
    try:
        with redis.Redis(port=server.port) as admin:
            admin.config_set("requirepass", "right-pw")
        (line,) = _cli_error("logs", "--redis", f"redis://:wrong-pw@127.0.0.1:{server.port}/0", "x")
        assert line == (f"task-job: redis at redis://:***@127.0.0.1:{server.port}/0: wrong user "
                        "name or password (check redis_addr, or the ACL user)")
        (line,) = _cli_error("logs", "--redis", f"127.0.0.1:{server.port}", "x")
        assert "needs a password" in line, line
    finally:
        server.stop()
    (line,) = _cli_error("logs", "--redis", f"rediss://127.0.0.1:{redis_server.port}/0", "x")
    assert "rediss:// needs a TLS port" in line, line
    (line,) = _cli_error("logs", "--redis", f"redis://127.0.0.1:{tls_proxy.port}/0", "x")
    assert line.startswith(f"task-job: redis at redis://127.0.0.1:{tls_proxy.port}/0: "), line
    assert "TLS" in line or "no reply" in line or "closed" in line, line
