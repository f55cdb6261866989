"""The API's listeners: TCP on server_host:server_port and/or a unix socket, with TLS and
mutual TLS; the generated token when none is configured. Started by an executor or by
`task-job api`."""

from __future__ import annotations

import grp
import logging
import os
import shutil
import ssl
import stat
from typing import Any

from aiohttp import web

from task_job.api.app import Service, create_app
from task_job.api.auth import Tokens, local_token
from task_job.client import AsyncClient
from task_job.config import Config, is_loopback
from task_job.confine import Policy
from task_job.errors import ConfigError

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 2.0  # seconds open streams (SSE followers) get at shutdown


def wanted(config: Config) -> bool:
    return bool(config.server_port or config.server_socket)


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.server_tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.server_tls_cert, config.server_tls_key)
        if config.server_tls_ca:  # mutual TLS: a client certificate signed by this CA
            ctx.load_verify_locations(config.server_tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server_tls_cert: cannot load the certificate or key: {exc}") from exc
    return ctx


class ApiServer:
    def __init__(self, config: Config, *, executor: Any = None, client: AsyncClient | None = None) -> None:
        self.config = config
        self.executor = executor
        self.client = client or AsyncClient(config)
        self._own_client = client is None
        self._runner: web.AppRunner | None = None
        self.token_file: str | None = None
        self.port = 0  # the bound TCP port (server_port, or the one picked for 0 in tests)

    async def start(self) -> None:
        cfg = self.config
        tokens = cfg.api_tokens
        if not tokens:
            if cfg.server_port and not is_loopback(cfg.server_host):
                raise ConfigError(f"server_host: binding {cfg.server_host} beyond loopback needs api_tokens")
            generated, path = local_token(cfg.state_dir)
            tokens = (generated,)
            self.token_file = str(path)
            log.info("api: no api_tokens configured; an admin token was written for this host",
                     extra={"token_file": str(path)})
        if self.executor is not None:
            policy = self.executor.policy
        else:
            policy = Policy(cmd_dir=cfg.cmd_dir, interpreters=cfg.interpreters, mode=cfg.confine,
                            path_env=os.environ.get("PATH"), script_interpreter=cfg.script_interpreter)
        service = Service(self.client, cfg, Tokens(tokens), policy, self.executor)
        self._runner = web.AppRunner(create_app(service), access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        ctx = _ssl_context(cfg)
        where = []
        if cfg.server_port:
            site = web.TCPSite(self._runner, cfg.server_host, cfg.server_port, ssl_context=ctx)
            await site.start()
            self.port = cfg.server_port
            where.append(f"{'https' if ctx else 'http'}://{cfg.server_host}:{cfg.server_port}")
        if cfg.server_socket:
            self._clear_stale_socket(cfg.server_socket)
            # Plain HTTP: the socket's mode and group guard it, as docker.sock's do (TLS
            # is for TCP listeners); a token is needed all the same.
            usite = web.UnixSite(self._runner, cfg.server_socket)
            await usite.start()
            os.chmod(cfg.server_socket, int(cfg.server_socket_mode, 8))
            if cfg.server_socket_group:
                try:
                    shutil.chown(cfg.server_socket, group=grp.getgrnam(cfg.server_socket_group).gr_gid)
                except (KeyError, PermissionError) as exc:
                    raise ConfigError(f"server_socket_group: cannot give the socket to "
                                      f"{cfg.server_socket_group!r}: {exc}") from exc
            where.append(f"unix:{cfg.server_socket}")
        log.info("api: serving", extra={"listen": where, "tls": bool(ctx),
                                        "mutual_tls": bool(cfg.server_tls_ca)})

    @staticmethod
    def _clear_stale_socket(path: str) -> None:
        """A socket left by a process that died is removed; any other file is refused."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"server_socket: {path} exists and is not a socket")
        os.unlink(path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.config.server_socket:
            try:
                if stat.S_ISSOCK(os.lstat(self.config.server_socket).st_mode):
                    os.unlink(self.config.server_socket)
            except OSError:
                pass
        if self._own_client:
            await self.client.close()
