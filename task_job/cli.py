"""The `task-job` command line (click): run, submit, kill, logs, executors, check-config.

Accepts the original's Go-style flags (`-config=FILE`, `-alsologtostderr`, `-log_dir=DIR`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson
from redis.exceptions import RedisError

from task_job import __version__
from task_job.broker import describe
from task_job.config import Config, load_config
from task_job.errors import BrokerError, ConfigError, ProtocolError, TaskJobError

_GO_FLAG = re.compile(r"-([A-Za-z][A-Za-z0-9_]+)(=.*)?")


def normalize_argv(args: list[str]) -> list[str]:
    """Turn Go-style single-dash long flags into click's: -log_dir=X -> --log-dir=X."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            out.extend(args[i:])
            break
        match = _GO_FLAG.fullmatch(arg)
        if match:
            out.append("--" + match.group(1).replace("_", "-") + (match.group(2) or ""))
        else:
            out.append(arg)
    return out


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"task-job: {message}", err=True)
    sys.exit(code)


def _load(config_path: str | None, check_paths: bool = True, **overrides: Any) -> Config:
    try:
        return load_config(config_path, overrides=overrides, check_paths=check_paths)
    except ConfigError as exc:
        fail(f"config error: {exc}")


config_option = click.option("--config", "config_path", metavar="FILE",
                             help="JSON config file (// comments allowed).")
redis_option = click.option("--redis", "redis_addr", metavar="URL",
                            help="Redis address (host:port, redis://, rediss://, unix://).")
queue_option = click.option("--queue", "queue_name", metavar="NAME", help="queue_name.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="task-job")
def cli() -> None:
    """task-job: run shell-command tasks from a Redis list, confined, with streamed output."""


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("--embedded", is_flag=True, help="Start a private redis-server under state_dir.")
@click.option("--cmd-dir", metavar="DIR", help="cmd_dir: where commands must live.")
@click.option("--executor-id", metavar="ID", help="executor_id (default host:pid).")
@click.option("--max-concurrency", type=int, metavar="N", help="Tasks run at once.")
@click.option("--state-dir", metavar="DIR", help="state_dir (spool, embedded Redis).")
@click.option("--log-dir", metavar="DIR", help="Write logs to DIR/task-job.log.")
@click.option("--alsologtostderr", is_flag=True, help="With --log-dir, log to stderr too.")
@click.option("--logtostderr", is_flag=True, help="Log to stderr only.")
@click.option("--demo", is_flag=True,
              help="Run a sample task end to end, print its records, then stop.")
def run(config_path: str | None, redis_addr: str | None, queue_name: str | None, embedded: bool,
        cmd_dir: str | None, executor_id: str | None, max_concurrency: int | None,
        state_dir: str | None, log_dir: str | None, alsologtostderr: bool, logtostderr: bool,
        demo: bool) -> None:
    """Run an executor until SIGTERM/SIGINT (running tasks drain first)."""
    from task_job.embedded import RedisServer
    from task_job.logs import setup_logging

    overrides = dict(redis_addr=redis_addr, queue_name=queue_name, cmd_dir=cmd_dir,
                     executor_id=executor_id, max_concurrency=max_concurrency,
                     state_dir=state_dir, log_dir=None if logtostderr else log_dir)
    config = _load(config_path, check_paths=not demo, **overrides)
    if demo:
        demo_dir = Path(config.state_dir) / "demo"
        _write_demo_script(demo_dir)
        config = dataclasses.replace(config, cmd_dir=str(demo_dir))
    setup_logging(config.log_level, config.log_dir,
                  to_stderr=alsologtostderr or logtostderr or not config.log_dir)
    server = None
    if embedded or config.redis_addr == "embedded":
        try:
            server = RedisServer(Path(config.state_dir) / "redis", unix_socket=True,
                                 appendonly=True)
            server.lock()
            server.start()
        except (ConfigError, RuntimeError, OSError) as exc:
            fail(f"embedded redis: {exc}")
        config = dataclasses.replace(config, redis_addr=server.url)
        click.echo(f"task-job: embedded redis at {server.url}", err=True)
    _bound_heap()
    try:
        code = _serve(_run(config, demo), config)
    finally:
        if server is not None:
            server.stop()
    sys.exit(code)


def _serve(main: Any, config: Config) -> Any:
    """Run a long-lived process's main coroutine; an operator's mistake or an unreachable
    Redis is one line and a non-zero exit."""
    try:
        return asyncio.run(main)
    except BrokerError as exc:
        fail(str(exc), code=1)
    except TaskJobError as exc:
        fail(str(exc))
    except (RedisError, ConnectionError, OSError) as exc:
        fail(f"redis at {config.redacted_redis_addr}: {describe(exc, config.redis_timeout, config.redis_addr)}", code=1)


DEMO_SCRIPT = """#!/bin/sh
# A sample task: output on both streams, a little time, exit status 0.
echo "hello from task $TASK_JOB_DEMO on $(hostname)"
for i in 1 2 3; do echo "step $i of 3"; sleep 0.2; done
echo "a line on stderr" >&2
echo "args: $*"
"""


def _write_demo_script(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "hello.sh"
    script.write_text(DEMO_SCRIPT)
    script.chmod(0o755)


def _bound_heap() -> None:
    """Serve buffers of 128 KiB and more straight from mmap (glibc). Left to itself, glibc
    raises that threshold as big buffers are freed, and the heap of an executor streaming
    hundreds of MB grows by tens of MB it never returns. Measured in bench/log_throughput.py."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD; a fixed value stops the adjustment
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


async def _run(config: Config, demo: bool) -> int:
    from task_job.executor import Executor
    from task_job.notify import Notifier

    notifier = Notifier.from_env()  # before the executor copies the environment for tasks
    executor = Executor(config)
    executor.notifier = notifier
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, executor.stop)
    loop.add_signal_handler(signal.SIGHUP, executor.reload_catalogue)
    runner = asyncio.create_task(executor.run())
    code = 0
    if demo:
        ready = asyncio.ensure_future(executor.wait_ready())
        await asyncio.wait({ready, runner}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            ready.cancel()
            await runner  # start-up failed: raise its error
        code = await _demo(config)
        executor.stop()
    await runner
    return code


async def _demo(config: Config) -> int:
    from task_job.client import AsyncClient

    async with AsyncClient(config) as client:
        task_id = await client.submit("hello.sh", ["feature/homestead", "$HOME `date` (not expanded)"],
                                      env={"TASK_JOB_DEMO": "demo-1"}, timeout=60)
        click.echo(f"submitted task {task_id}: hello.sh feature/homestead '$HOME `date` (not expanded)'")
        code = 1
        async for record in client.records(task_id, follow=True):
            click.echo(orjson.dumps(record.fields).decode())
            if record.is_done:
                code = 0 if record.fields.get("status") == "succeeded" else 1
        click.echo(f"\nrecords went to {config.logs_channel}. To keep an executor serving this "
                   f"script: task-job run --embedded --cmd-dir {config.cmd_dir}\n"
                   f"then, from another shell: task-job submit --redis {config.redis_addr} "
                   f"--wait -- hello.sh")
        return code


def _parse_env(pairs: tuple[str, ...], option: str = "--env") -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{option} expects KEY=VALUE (got {pair!r})")
        env[key] = value
    return env


def _client_config(config_path: str | None, redis_addr: str | None,
                   queue_name: str | None) -> Config:
    return _load(config_path, check_paths=False, redis_addr=redis_addr, queue_name=queue_name)


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("--id", "task_id", metavar="ID", help="Task id (default: a random uuid).")
@click.option("--timeout", type=float, metavar="S", help="Kill the task after S seconds.")
@click.option("--env", "env_pairs", multiple=True, metavar="K=V", help="Extra environment.")
@click.option("--cwd", metavar="DIR", help="Working directory inside cmd_dir.")
@click.option("--stdin", "stdin_text", metavar="TEXT", help="Text fed to the task's stdin.")
@click.option("--executor", metavar="ID", help="Run it on this executor only (its own queue).")
@click.option("--at", "at_text", metavar="TIME", help="Not before TIME (RFC 3339 with a zone, or unix seconds).")
@click.option("--in", "in_seconds", type=float, metavar="S", help="Not before S seconds from now (Redis' clock).")
@click.option("--label", "label_pairs", multiple=True, metavar="K=V",
              help="Placement selector (the dispatcher matches executors' labels); K=!=V: not V.")
@click.option("--group", metavar="NAME", help="The task's group (groups limits run at once fleet-wide).")
@click.option("--name", "entry", metavar="ENTRY", help="Run this catalogue entry; the arguments after -- are appended.")
@click.option("--after", "after", multiple=True, metavar="ID",
              help="Wait until task ID succeeded (repeatable); cancelled if it ends otherwise.")
@click.option("--wait", is_flag=True, help="Stream the output and exit with the task's code.")
@click.option("--wait-timeout", type=float, metavar="S",
              help="With --wait: give up after S seconds (exit 124; the task runs on).")
@click.argument("command", nargs=-1)
def submit(config_path: str | None, redis_addr: str | None, queue_name: str | None,
           task_id: str | None, timeout: float | None, env_pairs: tuple[str, ...],
           cwd: str | None, stdin_text: str | None, executor: str | None,
           at_text: str | None, in_seconds: float | None,
           label_pairs: tuple[str, ...], group: str | None, entry: str | None, after: tuple[str, ...], wait: bool, wait_timeout: float | None,
           command: tuple[str, ...]) -> None:
    """Push a task: task-job submit [OPTIONS] -- CMD [ARGS...], or --name ENTRY [-- ARGS...]"""
    import shlex

    config = _client_config(config_path, redis_addr, queue_name)
    env = _parse_env(env_pairs)
    if not command and not entry:
        fail("give a command (task-job submit -- CMD [ARGS...]) or a catalogue entry (--name ENTRY)")
    # the command word is kept as given, args verbatim; a catalogue entry takes them all as args
    cmdline, args = ("", list(command)) if entry else (shlex.quote(command[0]), list(command[1:]))
    at = None
    if at_text is not None:
        from task_job.protocol import parse_time

        try:
            at = parse_time(float(at_text) if re.fullmatch(r"[0-9.]+", at_text) else at_text)
        except ProtocolError as exc:
            fail(f"--at: {exc.reason.replace(chr(39) + 'task.enqueue_at' + chr(39), 'the time')}")
    if at is not None and in_seconds is not None:
        fail("--at and --in exclude each other")

    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            ident = await client.submit(cmdline, args, task_id=task_id,
                                        timeout=timeout, env=env or None, cwd=cwd,
                                        stdin=stdin_text, executor=executor, at=at, delay=in_seconds,
                                        labels=_parse_env(label_pairs, "--label") or None,
                                        depends_on=list(after) or None, group=group, name=entry)
            click.echo(ident)
            if not wait:
                return 0
            waiting.append(ident)
            return await _follow(client, ident, as_json=False, timeout=wait_timeout,
                                 just_pushed=True)

    waiting: list[str] = []

    def advise() -> None:  # Ctrl-C: the task goes on without us
        if waiting:
            where = f" --config {config_path}" if config_path else \
                (f" --redis {redis_addr}" if redis_addr else "")
            click.echo(f"task-job: stopped waiting; task {waiting[0]} may still be running. To "
                       f"stop it: task-job kill{where} {waiting[0]}", err=True)

    sys.exit(_run_client(go, config, on_interrupt=advise))


def _exit_code_of(fields: dict[str, Any]) -> int:
    """submit --wait's exit: the task's own code; 128+N when signal N ended it; 124 for a
    timeout (as coreutils' timeout); 125 when task-job did not run it (rejected, cancelled,
    lost). Collisions with a task's own codes are unavoidable: --json tells them apart."""
    status = fields.get("status")
    if status == "succeeded":
        return 0
    if status == "timeout":
        return 124
    if status in ("rejected", "cancelled", "lost"):
        return 125
    code = fields.get("exit_code")
    if isinstance(code, int):
        return code or 1
    sig = fields.get("signal")
    if sig and hasattr(signal.Signals, sig):
        return 128 + int(signal.Signals[sig])
    return 1


async def _print_records(client: Any, task_id: str, *, follow: bool, as_json: bool) -> int:
    code = 0
    async for record in client.records(task_id, follow=follow):
        if as_json:
            click.echo(orjson.dumps(record.fields).decode())
        elif record.is_done:
            status = record.fields.get("status")
            summary = record.data.removeprefix(f"{status}: ")
            click.echo(f"task-job: {task_id} {status}: {summary}", err=True)
        else:
            out = sys.stderr if record.msg_type == "stderr" else sys.stdout
            out.buffer.write(record.payload)
            out.flush()
        if record.is_done:
            code = _exit_code_of(record.fields)
    return code


async def _follow(client: Any, task_id: str, *, as_json: bool, timeout: float | None,
                  just_pushed: bool = False) -> int:
    """Follow a task to its done record, saying plainly when the id is unknown so far (not
    for one just pushed, which has no state until an executor claims it)."""
    kind = "pushed" if just_pushed else (await client.whereabouts(task_id))[0]
    if kind == "unknown":
        click.echo(f"task-job: {task_id} has no state yet (queued, not pushed, expired or "
                   "dead-lettered); waiting for it", err=True)
    try:
        async with asyncio.timeout(timeout):
            return await _print_records(client, task_id, follow=True, as_json=as_json)
    except TimeoutError:
        kind, status = await client.whereabouts(task_id)
        click.echo(f"task-job: gave up waiting after {timeout:g}s; {task_id} is "
                   f"{status or 'unknown'}", err=True)
        return 124


def _run_client(go: Any, config: Config, on_interrupt: Any = None) -> int:
    """Run a client command. Ctrl-C ends it at once (exit 130), after `on_interrupt` has said
    what it must: a client holds nothing worth a graceful close, and a cancellation that
    lands inside the Redis client can be held up there."""
    async def main() -> Any:
        def interrupted() -> None:
            if on_interrupt is not None:
                on_interrupt()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted)
        return await go()

    try:
        return int(asyncio.run(main()))
    except KeyboardInterrupt:
        return 130
    except TaskJobError as exc:
        fail(str(exc))
    except TimeoutError as exc:
        fail(f"redis at {config.redacted_redis_addr}: {describe(exc, config.redis_timeout, config.redis_addr)}", code=1)
    except (RedisError, ConnectionError, OSError) as exc:
        fail(f"redis at {config.redacted_redis_addr}: {describe(exc, config.redis_timeout, config.redis_addr)}", code=1)


@cli.command()
@config_option
@redis_option
@queue_option
@click.argument("task_id")
def kill(config_path: str | None, redis_addr: str | None, queue_name: str | None,
         task_id: str) -> None:
    """Kill a task wherever it runs (or cancel it before it starts)."""
    config = _client_config(config_path, redis_addr, queue_name)

    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            kind, status = await client.whereabouts(task_id)
            if kind == "finished":
                click.echo(f"task-job: {task_id} already finished ({status}): nothing to kill",
                           err=True)
                return 1
            await client.kill(task_id)
        if kind == "unknown":
            click.echo(f"kill sent for {task_id}: no such task yet; it is cancelled if it "
                       f"arrives within cancel_ttl ({config.cancel_ttl}s)")
        else:
            click.echo(f"kill sent for {task_id} ({status})")
        return 0

    sys.exit(_run_client(go, config))


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("-f", "--follow", is_flag=True, help="Stream live until the task is done.")
@click.option("--json", "as_json", is_flag=True, help="Print raw records.")
@click.option("--timeout", type=float, metavar="S", help="With -f: give up after S seconds (exit 124).")
@click.argument("task_id")
def logs(config_path: str | None, redis_addr: str | None, queue_name: str | None,
         follow: bool, as_json: bool, timeout: float | None, task_id: str) -> None:
    """Print a task's output (stdout to stdout, stderr to stderr)."""
    config = _client_config(config_path, redis_addr, queue_name)

    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            if follow:
                return await _follow(client, task_id, as_json=as_json, timeout=timeout)
            kind, status = await client.whereabouts(task_id)
            code = await _print_records(client, task_id, follow=False, as_json=as_json)
            if kind == "unknown":
                click.echo(f"task-job: unknown task {task_id}: no state and no records (never "
                           "claimed, expired, or dead-lettered without an id)", err=True)
                return 1
            if kind != "finished":
                click.echo(f"task-job: {task_id} is {status}; -f follows it", err=True)
            return code

    sys.exit(_run_client(go, config))


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def executors(config_path: str | None, redis_addr: str | None, queue_name: str | None,
              as_json: bool) -> None:
    """List the executors of the fleet."""
    config = _client_config(config_path, redis_addr, queue_name)

    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            rows = await client.executors()
        if as_json:
            _print_json(rows)
            return 0
        click.echo(f"{'ID':40} {'HOST':20} {'STATUS':9} {'RUNNING':>9} {'HEARTBEAT':>10}")
        for row in rows:
            click.echo(f"{row['id']:40} {row.get('host', '?'):20} {row.get('status', '?'):9} "
                       f"{row.get('running', '?'):>4}/{row.get('slots', '?'):<4} "
                       f"{row['heartbeat_age_s']:>9.1f}s")
        return 0

    sys.exit(_run_client(go, config))


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("--id", "dispatcher_id", metavar="ID", help="This dispatcher's id (default host:pid).")
def dispatch(config_path: str | None, redis_addr: str | None, queue_name: str | None,
             dispatcher_id: str | None) -> None:
    """Run a dispatcher: place tasks of the dispatcher queue on matching executors' queues."""
    from task_job.dispatch import Dispatcher
    from task_job.logs import setup_logging

    config = _load(config_path, check_paths=False, redis_addr=redis_addr, queue_name=queue_name,
                   executor_id=dispatcher_id)
    setup_logging(config.log_level, config.log_dir, to_stderr=not config.log_dir)

    async def serve() -> None:
        dispatcher = Dispatcher(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, dispatcher.stop)
        await dispatcher.run()

    _serve(serve(), config)


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("--port", "server_port", type=int, metavar="PORT", help="server_port.")
@click.option("--socket", "server_socket", metavar="PATH", help="server_socket.")
def api(config_path: str | None, redis_addr: str | None, queue_name: str | None,
        server_port: int | None, server_socket: str | None) -> None:
    """Serve the management API without running tasks (a control plane for a fleet); with
    grpc_addr, the gRPC task scheduler's service too."""
    from task_job.logs import setup_logging

    config = _load(config_path, check_paths=False, redis_addr=redis_addr, queue_name=queue_name,
                   server_port=server_port, server_socket=server_socket)
    if not (config.server_port or config.server_socket):
        fail("api: set server_port or server_socket (in the config file, or --port/--socket)")
    setup_logging(config.log_level, config.log_dir, to_stderr=not config.log_dir)

    async def serve() -> None:
        from task_job.api.serve import ApiServer

        server = ApiServer(config)
        stop = _stop_on_signals()
        await server.start()
        if server.token_file:
            click.echo(f"task-job: admin token in {server.token_file}", err=True)
        grpc_server = None
        try:
            if config.grpc_addr:  # the gRPC service beside the API (grpc_addr)
                from task_job.bridges import grpc as bridge

                grpc_server = await bridge.serve(config, addr=config.grpc_addr, tls_cert=config.grpc_tls_cert,
                                                 tls_key=config.grpc_tls_key, tls_ca=config.grpc_tls_ca)
            await stop.wait()
        finally:
            if grpc_server is not None:
                await grpc_server.stop(5)
            await server.stop()

    _serve_listener(serve(), "api")


def _stop_on_signals() -> asyncio.Event:
    """Set on SIGTERM or SIGINT (a server's main coroutine waits on it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _serve_listener(main: Any, what: str) -> None:
    """Run a server that needs no Redis to start: a mistake is one line and a non-zero exit."""
    try:
        asyncio.run(main)
    except TaskJobError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{what}: {exc.strerror or exc}", code=1)


@cli.command("grpc")
@config_option
@redis_option
@queue_option
@click.option("--addr", default="127.0.0.1:50051", show_default=True, metavar="HOST:PORT",
              help="Where to listen (beyond loopback: TLS and mutual TLS or api_tokens).")
@click.option("--tls-cert", default="", metavar="PEM", help="Serve over TLS with this certificate.")
@click.option("--tls-key", default="", metavar="PEM", help="Its private key.")
@click.option("--tls-ca-cert", "tls_ca", default="", metavar="PEM",
              help="Mutual TLS: clients must present a certificate signed by this CA.")
def grpc_command(config_path: str | None, redis_addr: str | None, queue_name: str | None, addr: str,
                 tls_cert: str, tls_key: str, tls_ca: str) -> None:
    """Serve the gRPC task scheduler's SubmitTask/GetResult (methods are catalogue entries;
    pip install 'task-job[grpc]')."""
    from task_job.logs import setup_logging

    config = _load(config_path, check_paths=False, redis_addr=redis_addr, queue_name=queue_name)
    setup_logging(config.log_level, config.log_dir, to_stderr=not config.log_dir)
    try:
        from task_job.bridges import grpc as bridge
    except ImportError as exc:
        fail(f"grpc: {exc.name or exc} is not installed: pip install 'task-job[grpc]'")

    async def serve() -> None:
        stop = _stop_on_signals()
        server = await bridge.serve(config, addr=addr, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
        try:
            await stop.wait()
        finally:
            await server.stop(5)

    _serve_listener(serve(), "grpc")


def _print_json(data: Any) -> None:
    click.echo(orjson.dumps(data).decode())


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("task_id")
def status(config_path: str | None, redis_addr: str | None, queue_name: str | None,
           as_json: bool, task_id: str) -> None:
    """A task's state, executor, times, exit and last output lines."""
    config = _client_config(config_path, redis_addr, queue_name)

    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            found = await client.task(task_id, lines=3)
        if found is None:
            fail(f"unknown task {task_id!r} (never claimed, or its state expired)", code=1)
        if as_json:
            _print_json(found)
            return 0
        done = found.get("done") or {}
        click.echo(f"task      {task_id}\nstatus    {found.get('status')}\n"
                   f"executor  {found.get('executor') or '-'}\nattempt   {found.get('attempt') or '-'}\n"
                   f"claimed   {_when(found.get('claimed_at'))}\nstarted   {_when(found.get('started_at'))}\n"
                   f"finished  {_when(found.get('finished_at'))}\nexit      "
                   f"{found.get('exit_code') if found.get('exit_code') is not None else '-'}")
        if done.get("data"):
            click.echo(f"summary   {done['data']}")
        for kind in ("stdout", "stderr"):
            for line in found[f"{kind}_last"]:
                click.echo(f"{kind}    {line}")
        return 0

    sys.exit(_run_client(go, config))


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("--status", "status_", metavar="STATUS", help="queued, running, or a done status.")
@click.option("--executor", metavar="ID", help="Tasks of one executor.")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows at most.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tasks(config_path: str | None, redis_addr: str | None, queue_name: str | None,
          status_: str | None, executor: str | None, limit: int, as_json: bool) -> None:
    """Running, queued and recent finished tasks."""
    config = _client_config(config_path, redis_addr, queue_name)

    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            try:
                rows, _ = await client.tasks(status=status_, executor=executor, limit=limit)
            except ValueError as exc:
                fail(str(exc))
        if as_json:
            _print_json(rows)
            return 0
        click.echo(f"{'ID':34} {'STATUS':10} {'EXECUTOR':28} {'EXIT':>4}  FINISHED")
        for row in rows:
            code = row.get("exit_code")
            click.echo(f"{str(row.get('id'))[:34]:34} {row.get('status', '?'):10} "
                       f"{str(row.get('executor') or '-')[:28]:28} {'-' if code is None else code:>4}  "
                       f"{_when(row.get('finished_at'))}")
        return 0

    sys.exit(_run_client(go, config))


@cli.command()
@config_option
@redis_option
@queue_option
@click.option("--requeue", "requeue_id", metavar="ID", help="Put this dead letter back on the queue.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead(config_path: str | None, redis_addr: str | None, queue_name: str | None,
         requeue_id: str | None, as_json: bool) -> None:
    """Dead letters with their reasons; --requeue ID after a fix."""
    config = _client_config(config_path, redis_addr, queue_name)

    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            if requeue_id:
                try:
                    row = await client.requeue_dead(requeue_id, by=f"cli:{_user()}")
                except ProtocolError as exc:
                    fail(exc.reason, code=1)
                if row is None:
                    fail(f"no dead letter {requeue_id} (requeued already, or trimmed)", code=1)
                click.echo(f"requeued {requeue_id}")
                return 0
            rows, _ = await client.dead_letters(limit=1000)
        if as_json:
            _print_json(rows)
            return 0
        for row in rows:
            click.echo(f"{row['id']}  {_when(row.get('ts'))}  {row.get('reason')}")
        return 0

    sys.exit(_run_client(go, config))


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _drain_command(resume: bool) -> Any:
    @config_option
    @redis_option
    @queue_option
    @click.argument("executor_id")
    def command(config_path: str | None, redis_addr: str | None, queue_name: str | None,
                executor_id: str) -> None:
        config = _client_config(config_path, redis_addr, queue_name)

        async def go() -> int:
            from task_job.client import AsyncClient

            async with AsyncClient(config) as client:
                if not await client.drain(executor_id, by=f"cli:{_user()}", resume=resume):
                    fail(f"no executor {executor_id!r} is registered", code=1)
            click.echo(f"{'resume' if resume else 'drain'} sent to {executor_id}")
            return 0

        sys.exit(_run_client(go, config))

    command.__doc__ = ("Let a drained executor claim again." if resume else
                       "Stop an executor claiming; its running tasks finish (resume undoes it).")
    return command


cli.command("drain")(_drain_command(resume=False))
cli.command("resume")(_drain_command(resume=True))


@cli.command()
@config_option
@redis_option
@queue_option
@click.argument("path", metavar="FILE")
def dag(config_path: str | None, redis_addr: str | None, queue_name: str | None, path: str) -> None:
    """Submit a whole DAG from FILE ('-': stdin): {"id", "tasks": [task messages with
    depends_on]}, all-or-nothing."""
    config = _client_config(config_path, redis_addr, queue_name)
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        message = orjson.loads(text)
    except (OSError, orjson.JSONDecodeError) as exc:
        fail(f"{path}: {exc}")
    if not isinstance(message, dict):
        fail(f"{path}: expected a JSON object {{\"id\", \"tasks\": [...]}}")

    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            accepted = await client.submit_dag(message)
        click.echo(f"DAG {accepted.id} accepted: {' '.join(t.id for t in accepted.tasks)}")
        return 0

    sys.exit(_run_client(go, config))


@cli.group()
def schedule() -> None:
    """Cron and interval schedules, stored in Redis and fired once per tick by the fleet."""


def _scheduler_command(go_with: Any, config: Config) -> None:
    async def go() -> int:
        from task_job.client import AsyncClient

        async with AsyncClient(config) as client:
            return int(await go_with(client))

    sys.exit(_run_client(go, config))


@schedule.command("add")
@config_option
@redis_option
@queue_option
@click.argument("name")
@click.option("--cron", "cron", metavar="EXPR", help="Five fields, or six with leading seconds.")
@click.option("--every", type=int, metavar="S", help="Every S seconds (ticks at multiples of S).")
@click.option("--timezone", default="UTC", show_default=True, metavar="ZONE", help="The cron's zone.")
@click.option("--overlap", type=click.Choice(["allow", "skip", "replace"]), default="skip",
              show_default=True, help="When the last instance still runs at a tick.")
@click.option("--catch-up", "catch_up", type=click.Choice(["skip", "one", "all"]), default="skip",
              show_default=True, help="Ticks missed while no executor ran.")
@click.option("--catch-up-window", type=float, default=86400.0, show_default=True, metavar="S",
              help="Missed ticks older than S seconds are not caught up.")
@click.option("--jitter", type=float, default=0.0, metavar="S", help="Start each instance up to S seconds late.")
@click.option("--timeout", type=float, metavar="S", help="Kill each instance after S seconds.")
@click.option("--env", "env_pairs", multiple=True, metavar="K=V", help="Extra environment.")
@click.option("--cwd", metavar="DIR", help="Working directory inside cmd_dir.")
@click.option("--executor", metavar="ID", help="Run it on this executor only.")
@click.option("--label", "label_pairs", multiple=True, metavar="K=V", help="Placement selector.")
@click.option("--replace", is_flag=True, help="Redefine an existing schedule of this name.")
@click.argument("command", nargs=-1, required=True)
def schedule_add(config_path: str | None, redis_addr: str | None, queue_name: str | None,
                 name: str, cron: str | None, every: int | None, timezone: str, overlap: str,
                 catch_up: str, catch_up_window: float, jitter: float, timeout: float | None,
                 env_pairs: tuple[str, ...], cwd: str | None, executor: str | None,
                 label_pairs: tuple[str, ...], replace: bool, command: tuple[str, ...]) -> None:
    """Add a schedule: task-job schedule add NAME --every 60 -- CMD [ARGS...]"""
    import shlex

    from task_job.protocol import build_task
    from task_job.schedule import parse_schedule

    config = _client_config(config_path, redis_addr, queue_name)
    task = orjson.loads(build_task("x", shlex.quote(command[0]), list(command[1:]), type=None,
                                   timeout=timeout, env=_parse_env(env_pairs) or None, cwd=cwd,
                                   executor=executor,
                                   labels=_parse_env(label_pairs, "--label") or None))["task"]
    spec = {"name": name, "cron": cron, "every": every, "timezone": timezone, "overlap": overlap,
            "catch_up": catch_up, "catch_up_window": catch_up_window, "jitter": jitter, "task": task}
    try:
        parsed = parse_schedule({k: v for k, v in spec.items() if v is not None}, source="cli")
    except ProtocolError as exc:
        fail(exc.reason)

    async def go(client: Any) -> int:
        if not await client.scheduler.put(parsed, replace=replace):
            click.echo(f"task-job: schedule {name!r} exists (--replace redefines it)", err=True)
            return 1
        row = await client.scheduler.row(parsed)
        click.echo(f"schedule {name} added; next run {_when(row['next_run'])}")
        return 0

    _scheduler_command(go, config)


@schedule.command("list")
@config_option
@redis_option
@queue_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_list(config_path: str | None, redis_addr: str | None, queue_name: str | None,
                  as_json: bool) -> None:
    """Every schedule: when, what, next and last run, last status, where it came from."""
    config = _client_config(config_path, redis_addr, queue_name)

    async def go(client: Any) -> int:
        rows = await client.scheduler.listing()
        if as_json:
            click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
            return 0
        click.echo(f"{'NAME':<20} {'WHEN':<18} {'NEXT RUN':<25} {'LAST RUN':<25} {'LAST':<10} SOURCE")
        for r in rows:
            if "error" in r:
                click.echo(f"{r['name']!s:<20} error: {r['error']}")
                continue
            when = f"cron {r['cron']}" if r.get("cron") else f"every {r['every']}s"
            nxt = "paused" if r["paused"] else _when(r["next_run"])
            click.echo(f"{r['name']:<20} {when:<18} {nxt:<25} {_when(r['last_run']):<25} "
                       f"{r['last_status'] or '-':<10} {r.get('source') or '-'}")
        return 0

    _scheduler_command(go, config)


def _schedule_action(action: str) -> Any:
    @config_option
    @redis_option
    @queue_option
    @click.argument("name")
    def command(config_path: str | None, redis_addr: str | None, queue_name: str | None,
                name: str) -> None:
        config = _client_config(config_path, redis_addr, queue_name)

        async def go(client: Any) -> int:
            sched = client.scheduler
            if action == "run-now":
                instance = await sched.run_now(name)
                done = instance is not None
            elif action == "remove":
                done = await sched.remove(name)
            else:
                done = await sched.pause(name, paused=action == "pause")
            if not done:
                click.echo(f"task-job: no schedule {name!r} (task-job schedule list)", err=True)
                return 1
            click.echo(instance if action == "run-now" else f"schedule {name}: {action}d")
            return 0

        _scheduler_command(go, config)

    command.__doc__ = {"remove": "Remove a schedule (its running instance runs on).",
                       "pause": "Stop a schedule firing until resumed.",
                       "resume": "Fire a paused schedule again, from its next tick.",
                       "run-now": "Fire one instance now (id NAME:run-<ms>), outside the ticks."}[action]
    return command


for _action in ("remove", "pause", "resume", "run-now"):
    schedule.command(_action)(_schedule_action(_action))


@cli.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file; print the effective settings."""
    config = _load(path)
    click.echo(f"ok: {path}")
    for name, value in config.redacted().items():
        click.echo(f"  {name} = {value!r}")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli.main(args=normalize_argv(sys.argv[1:]), prog_name="task-job")


if __name__ == "__main__":
    main()
