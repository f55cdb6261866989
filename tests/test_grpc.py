"""The gRPC task scheduler's service against a real executor, Redis and a real gRPC client:
SubmitTask in sync mode returns the result, async plus GetResult later, a dependency
honoured, Any arguments turned into text (and a type that cannot be refused naming it),
mutual TLS with certificates the test makes (a client without one refused), and tokens with
the API's scopes where no mutual TLS vouches for the caller."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2

from task_job.api.auth import Tokens
from task_job.bridges import grpc as bridge
from task_job.bridges import taskscheduler_pb2 as pb
from task_job.bridges import taskscheduler_pb2_grpc as pb_grpc
from task_job.client import AsyncClient
from task_job.config import ApiToken, Config
from task_job.embedded import free_port
from task_job.errors import ConfigError

from .conftest import wait_until

ENTRIES = [
    {"name": "echo-args", "cluster_type": "demo", "language": "sh", "executable": "args.sh", "collected": True},
    {"name": "sleepy", "cluster_type": "demo", "language": "sh", "executable": "sleep.sh", "collected": True},
    {"name": "broken", "cluster_type": "demo", "language": "sh", "executable": "fail.sh", "collected": True},
]


def packed(message: Any) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(message)
    return value


@pytest.fixture
async def scheduler(make_config: Callable[..., Config], start_executor: Any,
                    tmp_path: Path) -> AsyncIterator[tuple[Config, str]]:
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(orjson.dumps(ENTRIES).decode())
    config = make_config(catalogue=str(catalogue), sync_timeout=20.0)
    await start_executor(config)
    addr = f"127.0.0.1:{free_port()}"
    server = await bridge.serve(config, addr=addr)
    yield config, addr
    await server.stop(1)


async def test_sync_submit_returns_the_result_and_async_is_read_later(scheduler: tuple[Config, str]) -> None:
    _, addr = scheduler
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.TaskSchedulerStub(channel)
        args = [packed(wrappers_pb2.StringValue(value="a b; touch /tmp/x")), packed(wrappers_pb2.Int32Value(value=-7)),
                packed(wrappers_pb2.UInt64Value(value=2**63)), packed(wrappers_pb2.BoolValue(value=True)),
                packed(wrappers_pb2.DoubleValue(value=1.5)), packed(wrappers_pb2.FloatValue(value=0.1)),
                packed(wrappers_pb2.BytesValue(value="é".encode())),
                packed(struct_pb2.ListValue(values=[struct_pb2.Value(number_value=1),
                                                    struct_pb2.Value(string_value="x")])),
                packed(struct_pb2.Struct(fields={"k": struct_pb2.Value(number_value=3)}))]
        reply = await stub.SubmitTask(pb.TaskRequest(task_id="grpc-sync-1", method="echo-args", args=args))
        assert (reply.task_id, reply.status) == ("grpc-sync-1", pb.SUCCESS)
        assert reply.result == '[a b; touch /tmp/x]\n[-7]\n[9223372036854775808]\n[true]\n[1.5]\n[0.1]\n[é]\n[[1,"x"]]\n[{"k":3}]\n'
        assert reply.detail == "succeeded: exit status 0"
        failed = await stub.SubmitTask(pb.TaskRequest(method="broken"))
        assert failed.status == pb.FAILED and failed.detail.startswith("failed: exit status 2")
        assert uuid.UUID(hex=failed.task_id)  # made by task-job when the request has none

        started = await stub.SubmitTask(pb.TaskRequest(method="sleepy", args=[packed(wrappers_pb2.StringValue(value="1"))],
                                                       is_async=True))
        assert started.status == pb.PENDING and started.task_id
        first = await stub.GetResult(pb.ResultRequest(task_id=started.task_id))
        assert first.status in (pb.PENDING, pb.RUNNING)

        async def finished() -> Any:
            got = await stub.GetResult(pb.ResultRequest(task_id=started.task_id))
            return got if got.status == pb.SUCCESS else None

        done = await wait_until(finished, 20, interval=0.05, what="the async task")
        assert done.result == "started\n"

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetResult(pb.ResultRequest(task_id="never-submitted"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.SubmitTask(pb.TaskRequest(method="rm"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "catalogue entry" in (unknown.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as odd:
            await stub.SubmitTask(pb.TaskRequest(method="echo-args", args=[packed(pb.ResultRequest(task_id="x"))]))
        assert odd.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "taskscheduler.ResultRequest" in (odd.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await stub.SubmitTask(pb.TaskRequest(task_id="grpc-sync-1", method="echo-args"))
        assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_dependency_is_honoured(scheduler: tuple[Config, str]) -> None:
    config, addr = scheduler
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.TaskSchedulerStub(channel)
        first = await stub.SubmitTask(pb.TaskRequest(method="sleepy", is_async=True,
                                                     args=[packed(wrappers_pb2.StringValue(value="1"))]))
        then = await stub.SubmitTask(pb.TaskRequest(method="echo-args", deps=[first.task_id], is_async=True,
                                                    args=[packed(wrappers_pb2.StringValue(value="after"))]))
        assert (await stub.GetResult(pb.ResultRequest(task_id=then.task_id))).status == pb.PENDING
        after_failure = await stub.SubmitTask(pb.TaskRequest(method="broken", is_async=True))
        never = await stub.SubmitTask(pb.TaskRequest(method="echo-args", deps=[after_failure.task_id]))
        assert never.status == pb.FAILED and "cancelled" in never.detail and after_failure.task_id in never.detail
        done = await stub.SubmitTask(pb.TaskRequest(task_id=uuid.uuid4().hex, method="echo-args",
                                                    deps=[then.task_id]))  # sync: waits through both
        assert done.status == pb.SUCCESS
    async with AsyncClient(config) as client:
        a, b = await client.task(first.task_id), await client.task(then.task_id)
        assert a and b and b["done"]["started_at"] >= a["done"]["finished_at"]
        assert b["done"]["status"] == "succeeded"


async def test_mutual_tls_admits_a_client_with_a_certificate_and_refuses_one_without(
        make_config: Callable[..., Config], start_executor: Any, tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    server_cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert = ca.issue_cert("client@example")
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(orjson.dumps(ENTRIES).decode())
    config = make_config(catalogue=str(catalogue))
    await start_executor(config)
    addr = f"127.0.0.1:{free_port()}"
    server = await bridge.serve(config, addr=addr, tls_cert=str(tmp_path / "server.crt"),
                                tls_key=str(tmp_path / "server.key"), tls_ca=str(tmp_path / "ca.pem"))
    try:
        root = ca.cert_pem.bytes()
        with_cert = grpc.ssl_channel_credentials(root, client_cert.private_key_pem.bytes(),
                                                 client_cert.cert_chain_pems[0].bytes())
        async with grpc.aio.secure_channel(addr, with_cert) as channel:
            reply = await pb_grpc.TaskSchedulerStub(channel).SubmitTask(
                pb.TaskRequest(method="echo-args", args=[packed(wrappers_pb2.StringValue(value="tls"))]))
            assert (reply.status, reply.result) == (pb.SUCCESS, "[tls]\n")
        async with grpc.aio.secure_channel(addr, grpc.ssl_channel_credentials(root)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.TaskSchedulerStub(channel).SubmitTask(pb.TaskRequest(method="echo-args"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(addr) as channel:  # plaintext to a TLS port
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.TaskSchedulerStub(channel).SubmitTask(pb.TaskRequest(method="echo-args"), timeout=10)
    finally:
        await server.stop(1)


def _token(name: str) -> str:
    return f"grpc-token-{name}-0123456789"


async def test_without_mutual_tls_calls_need_a_token_with_the_apis_scopes(
        make_config: Callable[..., Config], start_executor: Any, tmp_path: Path) -> None:
    tokens = tuple(ApiToken(name, hashlib.sha256(_token(name).encode()).hexdigest(), scopes, allow)
                   for name, scopes, allow in (("reader", ("read",), ()), ("runner", ("submit", "read"), ("echo-*",))))
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(orjson.dumps(ENTRIES).decode())
    config = make_config(catalogue=str(catalogue), api_tokens=tokens)
    await start_executor(config)
    # What serve() builds beyond loopback without mutual TLS (bound here to loopback all the same).
    server = grpc.aio.server()
    async with AsyncClient(config) as client:
        pb_grpc.add_TaskSchedulerServicer_to_server(
            bridge.TaskScheduler(client, config, Tokens(tokens), open_access=False), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TaskSchedulerStub(channel)

                async def code(request: Any, token: str | None, call: str = "SubmitTask") -> Any:
                    metadata = (("authorization", f"Bearer {token}"),) if token else None
                    try:
                        return await getattr(stub, call)(request, metadata=metadata)
                    except grpc.aio.AioRpcError as exc:
                        return exc.code()

                run = pb.TaskRequest(method="echo-args", args=[packed(wrappers_pb2.StringValue(value="ok"))])
                assert await code(run, None) == grpc.StatusCode.UNAUTHENTICATED
                assert await code(run, "wrong-token-0123456789") == grpc.StatusCode.UNAUTHENTICATED
                assert await code(run, _token("reader")) == grpc.StatusCode.PERMISSION_DENIED
                assert await code(pb.TaskRequest(method="sleepy"), _token("runner")) == grpc.StatusCode.PERMISSION_DENIED
                reply = await code(run, _token("runner"))
                assert (reply.status, reply.result) == (pb.SUCCESS, "[ok]\n")
                read = await code(pb.ResultRequest(task_id=reply.task_id), _token("reader"), "GetResult")
                assert read.status == pb.SUCCESS
        finally:
            await server.stop(1)


def test_a_listener_beyond_loopback_needs_tls_and_a_way_to_authenticate() -> None:
    assert bridge.check_listen("127.0.0.1:50051", "", "", None)
    assert bridge.check_listen("[::1]:50051", "", "", None)
    with pytest.raises(ConfigError, match="tls-cert"):
        bridge.check_listen("0.0.0.0:50051", "", "", Tokens(()))
    with pytest.raises(ConfigError, match="mutual TLS"):
        bridge.check_listen("10.0.0.5:50051", "cert.pem", "", None)
    assert not bridge.check_listen("10.0.0.5:50051", "cert.pem", "", Tokens(()))  # tokens needed
    assert bridge.check_listen("10.0.0.5:50051", "cert.pem", "ca.pem", None)  # mutual TLS


async def test_an_executor_serves_the_service_itself_with_grpc_addr(
        make_config: Callable[..., Config], start_executor: Any, tmp_path: Path) -> None:
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(orjson.dumps(ENTRIES[:1]).decode())
    addr = f"127.0.0.1:{free_port()}"
    handle = await start_executor(make_config(catalogue=str(catalogue), grpc_addr=addr))
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.TaskSchedulerStub(channel)
        reply = await stub.SubmitTask(pb.TaskRequest(method="echo-args", args=[packed(wrappers_pb2.StringValue(value="x"))]))
        assert (reply.status, reply.result) == (pb.SUCCESS, "[x]\n")
        catalogue.write_text(orjson.dumps(ENTRIES).decode())
        handle.executor.reload_catalogue()  # the executor's own catalogue, as SIGHUP reloads it
        assert (await stub.SubmitTask(pb.TaskRequest(method="broken"))).status == pb.FAILED
    await handle.stop()
    async with grpc.aio.insecure_channel(addr) as channel:  # stopped with the executor
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.TaskSchedulerStub(channel).GetResult(pb.ResultRequest(task_id="x"), timeout=5)


async def test_task_job_grpc_and_the_api_process_serve_it_and_an_open_listener_is_refused(
        make_config: Callable[..., Config], start_executor: Any, spawn_executor: Any, tmp_path: Path) -> None:
    import signal

    from .conftest import write_config

    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(orjson.dumps(ENTRIES).decode())
    config = make_config(catalogue=str(catalogue))
    await start_executor(config)
    path = write_config(tmp_path / "grpc.json", config, catalogue=str(catalogue))
    refused = spawn_executor("grpc", "--config", str(path), "--addr", f"0.0.0.0:{free_port()}")
    assert refused.wait(30) == 2 and "beyond loopback" in refused.output()
    addr = f"127.0.0.1:{free_port()}"
    server = spawn_executor("grpc", "--config", str(path), "--addr", addr)
    async with grpc.aio.insecure_channel(addr) as channel:
        await wait_until(lambda: "gRPC service listening" in server.output(), 30, interval=0.05, what="the listener")
        reply = await pb_grpc.TaskSchedulerStub(channel).SubmitTask(
            pb.TaskRequest(method="echo-args", args=[packed(wrappers_pb2.StringValue(value="cli"))]))
        assert (reply.status, reply.result) == (pb.SUCCESS, "[cli]\n")
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    # the API process serves it beside the API with grpc_addr
    addr = f"127.0.0.1:{free_port()}"
    api = spawn_executor("api", "--config", str(write_config(
        tmp_path / "api.json", config, catalogue=str(catalogue), server_port=free_port(), grpc_addr=addr)))
    await wait_until(lambda: "gRPC service listening" in api.output(), 30, interval=0.05, what="the API's gRPC")
    async with grpc.aio.insecure_channel(addr) as channel:
        reply = await pb_grpc.TaskSchedulerStub(channel).SubmitTask(
            pb.TaskRequest(method="echo-args", args=[packed(wrappers_pb2.StringValue(value="api"))]))
        assert (reply.status, reply.result) == (pb.SUCCESS, "[api]\n")
    api.signal(signal.SIGTERM)
    assert api.wait(30) == 0


async def test_redis_away_is_unavailable_and_the_service_recovers(
        own_redis: Any, make_config: Callable[..., Config], tmp_path: Path) -> None:
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(orjson.dumps(ENTRIES).decode())
    config = make_config(redis_addr=own_redis.url, catalogue=str(catalogue), redis_timeout=2.0)
    addr = f"127.0.0.1:{free_port()}"
    server = await bridge.serve(config, addr=addr)
    try:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb_grpc.TaskSchedulerStub(channel)
            own_redis.stop()
            for call, request in ((stub.GetResult, pb.ResultRequest(task_id="x")),
                                  (stub.SubmitTask, pb.TaskRequest(method="echo-args", is_async=True))):
                with pytest.raises(grpc.aio.AioRpcError) as away:
                    await call(request, timeout=20)
                assert away.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "redis unreachable" in (away.value.details() or "")
            own_redis.start()

            async def answers() -> bool:
                try:
                    await stub.GetResult(pb.ResultRequest(task_id="x"), timeout=20)
                except grpc.aio.AioRpcError as exc:
                    return exc.code() == grpc.StatusCode.NOT_FOUND
                return False

            await wait_until(answers, 30, interval=0.2, what="the service answering again")
    finally:
        await server.stop(1)


async def test_hostile_requests_get_clear_refusals_and_the_service_serves_on(
        scheduler: tuple[Config, str]) -> None:
    _, addr = scheduler
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.TaskSchedulerStub(channel)
        for request, says in (
                (pb.TaskRequest(task_id="bad\nid", method="echo-args"), "control characters"),
                (pb.TaskRequest(task_id="x" * 300, method="echo-args"), "longer than"),
                (pb.TaskRequest(method="echo-args", args=[packed(wrappers_pb2.StringValue(value="y" * (2 << 20)))]),
                 "exceeds"),
                (pb.TaskRequest(method="echo-args", deps=["bad\ndep"]), "depends_on"),
                (pb.TaskRequest(method="../echo-args"), "catalogue entry")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SubmitTask(request)
            assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            assert says in (refused.value.details() or ""), refused.value.details()
        reply = await stub.SubmitTask(pb.TaskRequest(method="echo-args", args=[packed(wrappers_pb2.StringValue(value="ok"))]))
        assert (reply.status, reply.result) == (pb.SUCCESS, "[ok]\n")
