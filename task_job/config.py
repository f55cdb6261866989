"""Load and validate the configuration: a JSON file (with `//` comments), env, CLI overrides.

Owns the one frozen `Config`; never opens a connection or spawns anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from task_job.errors import ConfigError
from task_job.files import NAMESPACE_RULE, is_namespace
from task_job.limits import ENFORCED, parse_limits

if TYPE_CHECKING:
    from task_job.schedule import Schedule

ENV_PREFIX = "TASK_JOB_"
# TASK_JOB_* variables that are not settings: a task's own marker (a task may run task-job
# itself), the demo's, and the tests' switch for their unprivileged rerun.
NOT_SETTINGS = frozenset({"TASK_JOB_RUN", "TASK_JOB_DEMO", "TASK_JOB_TEST_UNPRIVILEGED"})
CONFINE_MODES = ("strict", "cwd")
LOG_LEVELS = ("debug", "info", "warning", "error")


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "task-job")


SCOPES = ("read", "submit", "kill", "admin")


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One API token: stored only as the SHA-256 of the secret (hex); `allow` globs narrow
    what it may submit (commands relative to cmd_dir after confinement, or catalogue names)."""

    name: str
    sha256: str = field(repr=False)
    scopes: tuple[str, ...] = ("read",)
    allow: tuple[str, ...] = ()


def _schedules(value: Any) -> tuple[Schedule, ...]:
    """`[{"name", "cron" | "every", "task", ...}]` -> Schedules, each checked (errors name it)."""
    from task_job.errors import ProtocolError
    from task_job.schedule import parse_schedule

    if isinstance(value, str):
        value = orjson.loads(value)
    if not isinstance(value, list):
        raise ConfigError("schedules: expected a list of {name, cron or every, task, ...}")
    out: list[Schedule] = []
    for i, entry in enumerate(value):
        try:
            out.append(parse_schedule(entry, f"schedules[{i}]", source="config"))
        except ProtocolError as exc:
            raise ConfigError(exc.reason) from None
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"schedules: name {next(n for n in names if names.count(n) > 1)!r} twice")
    return tuple(out)


def parse_api_tokens(value: Any, where: str = "api_tokens") -> tuple[ApiToken, ...]:
    """`[{"name", "sha256", "scopes", "allow"}]` -> ApiTokens; errors name the entry's path."""
    if isinstance(value, str):
        value = orjson.loads(value)
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of {{name, sha256, scopes, allow}}")
    out: list[ApiToken] = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected an object {{name, sha256, scopes, allow}}")
        unknown = set(entry) - {"name", "sha256", "scopes", "allow"}
        if unknown:
            raise ConfigError(f"{at}.{sorted(unknown)[0]}: unknown key")
        name, digest = entry.get("name"), entry.get("sha256")
        if not isinstance(name, str) or not name or len(name) > 128 or not name.isprintable():
            raise ConfigError(f"{at}.name: a printable name of 1-128 characters is required")
        if name in {t.name for t in out}:
            raise ConfigError(f"{at}.name: {name!r} is used twice")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(f"{at}.sha256: the SHA-256 of the token, 64 hex digits "
                              "(printf %s TOKEN | sha256sum)")
        scopes, allow = entry.get("scopes", ["read"]), entry.get("allow", [])
        for key, items in (("scopes", scopes), ("allow", allow)):
            if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
                raise ConfigError(f"{at}.{key}: expected a list of strings")
        for scope in scopes:
            if scope not in SCOPES:
                raise ConfigError(f"{at}.scopes: unknown scope {scope!r} ({', '.join(SCOPES)})")
        out.append(ApiToken(name, digest.lower(), tuple(scopes), tuple(allow)))
    return tuple(out)


@dataclass(frozen=True)
class Config:
    """Every setting of an executor; see config.example.json for each key's meaning."""

    # Keys of the original task-job, with its names and defaults.
    server_port: int = 0
    redis_addr: str = field(default="127.0.0.1:6379", repr=False)
    redis_tls_ca: str = ""
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    wait_replicas: int = -1
    queue_name: str = "queue_job_task"
    queue_control_name: str = ""  # "" -> <queue_name>_control
    logs: bool = True
    logs_channel: str = ""  # "" -> <queue_name>_logs
    logs_http: str = field(default="", repr=False)
    cmd_dir: str = "/tmp"
    # New keys.
    executor_id: str = ""  # "" -> <hostname>:<pid>
    labels: dict[str, str] = field(default_factory=dict)  # a list of names x means {x: "true"}
    max_concurrency: int = 8
    kill_grace: float = 5.0
    drain_timeout: float = 30.0
    interpreters: tuple[str, ...] = ("sh", "bash", "python3", "perl")
    confine: str = "strict"
    state_dir: str = field(default_factory=default_state_dir)
    die_with_executor: bool = True
    heartbeat_interval: float = 5.0
    dead_after: float = 30.0
    max_message_bytes: int = 1 << 20
    record_max_bytes: int = 64 << 10
    buffer_bytes: int = 8 << 20
    max_output: int = 0
    task_ttl: int = 7 * 86400
    task_log_max_records: int = 10000
    task_log_ttl: int = 86400
    logs_http_headers: dict[str, str] = field(default_factory=dict, repr=False)
    http_batch_bytes: int = 512 << 10  # chosen by bench/http_batching.py (docs/operations.md)
    http_linger_ms: float = 0.0
    http_timeout: float = 10.0
    log_dir: str = ""
    log_retention_days: int = 7
    max_output_action: str = "truncate"
    log_level: str = "info"
    # Hardening (docs/security.md).
    task_env_allow: tuple[str, ...] = ("*",)
    task_env_deny: tuple[str, ...] = ()
    script_interpreter: str = "bash"
    perl_args_unchecked: tuple[str, ...] = ()
    label_max_bytes: int = 1024
    cancel_ttl: int = 3600
    dead_max_len: int = 10000
    logs_max_len: int = 0
    redis_timeout: float = 10.0
    # Task isolation (docs/security.md): hetuflow's resource_limits keys.
    run_as: str = ""  # "" = the executor's own user
    allowed_users: tuple[str, ...] = ()  # users task.user may name (run_as is always allowed)
    limits_default: dict[str, float] = field(default_factory=dict)
    limits_max: dict[str, float] = field(default_factory=dict)
    # The management API (docs/api.md): off unless server_port or server_socket is set.
    server_host: str = "127.0.0.1"
    server_socket: str = ""
    server_socket_mode: str = "0660"
    server_socket_group: str = ""
    server_tls_cert: str = ""
    server_tls_key: str = field(default="", repr=False)
    server_tls_ca: str = ""
    api_tokens: tuple[ApiToken, ...] = ()
    metrics_public: bool = False
    # Routing (docs/routing.md).
    dispatch_queue: str = ""  # "" -> <queue_name>_dispatch
    unroutable_after: float = 300.0
    block_on: str = "auto"  # the list a claim waits on: auto, shared, inbox
    # Scheduling (docs/protocol.md): fleet-wide concurrency of task.group.
    groups: dict[str, int] = field(default_factory=dict)  # {"deploy": {"parallel": 2}} in JSON
    schedules: tuple[Schedule, ...] = ()  # cron and interval schedules, written to Redis at start
    depends_timeout: float = 86400.0  # the longest a task waits for its depends_on
    # Named tasks (task_job/catalogue.py): celery-service's external-task YAML (or JSON).
    catalogue: str = ""
    facade_token: str = ""  # celery-service's routes without a header act as this api token
    sync_timeout: float = 300.0  # the longest POST /sync/... waits
    facade_session_ttl: float = 3600.0  # finished async sessions are listed this long
    # Completion callbacks (task_job/callbacks.py) and pueue-NATS log files.
    callback_url: str = field(default="", repr=False)  # every finished task is POSTed here
    callback_channel: str = ""  # ... and/or published on this Redis pub/sub channel
    callback_allow: tuple[str, ...] = ()  # URL prefixes task.callback may name (none by default)
    callback_secret: str = field(default="", repr=False)  # signs each POST (X-Task-Job-Signature)
    callback_lines: int = 10  # lines of output in a callback's `output`
    log_namespace: str = "default"  # <log_dir>/<namespace>/<date>/<label>.log for labelled tasks
    # The pueue-NATS worker's subjects (task_job/bridges/nats.py; pip install 'task-job[nats]').
    nats_url: str = field(default="", repr=False)  # "" = off; nats://[user:pass@]host:4222, tls://...
    nats_prefix: str = "pueued"  # <prefix>.worker.<id>, <prefix>.registry, <prefix>.tasks.callback
    nats_worker_id: str = ""  # "" = the executor id made subject-safe (pueue's WORKER_ID)
    nats_creds: str = ""  # a NATS credentials file (JWT and NKey seed)
    nats_tls_ca: str = ""  # verify the server with this CA (tls:// URLs)
    nats_tls_cert: str = ""  # present this client certificate
    nats_tls_key: str = ""
    nats_callbacks: str = "nats"  # publish callbacks on <prefix>.tasks.callback for: nats (its tasks), all
    nats_stream: str = ""  # JetStream: a durable consumer on this stream (reliable); "" = core NATS
    nats_registry_interval: float = 30.0  # seconds between UP records on <prefix>.registry
    # The gRPC task scheduler's service from the executor itself (task_job/bridges/grpc.py).
    grpc_addr: str = ""  # "" = off (task-job grpc serves it alone); e.g. 127.0.0.1:50051
    grpc_tls_cert: str = ""
    grpc_tls_key: str = field(default="", repr=False)
    grpc_tls_ca: str = ""  # mutual TLS

    def __post_init__(self) -> None:
        # Derived defaults, as the original: an empty string means "use the default".
        if not self.queue_control_name:
            object.__setattr__(self, "queue_control_name", f"{self.queue_name}_control")
        if not self.logs_channel:
            object.__setattr__(self, "logs_channel", f"{self.queue_name}_logs")
        if not self.dispatch_queue:
            object.__setattr__(self, "dispatch_queue", f"{self.queue_name}_dispatch")
        if not self.executor_id:
            object.__setattr__(self, "executor_id", f"{socket.gethostname()}:{os.getpid()}")

    @property
    def redacted_redis_addr(self) -> str:
        return redact_url(self.redis_addr)

    @property
    def replicas_to_wait(self) -> int:
        """Replicas that must acknowledge each claim and batch (-1: 1 with Sentinel, else 0)."""
        if self.wait_replicas >= 0:
            return self.wait_replicas
        return 1 if self.redis_addr.startswith("sentinel://") else 0

    def redacted(self) -> dict[str, Any]:
        """Every setting, fit to print or log: passwords in URLs and header values hidden."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("redis_addr", "logs_http", "callback_url", "nats_url"):
                value = redact_url(value)
            elif f.name == "callback_secret":
                value = "***" if value else ""
            elif f.name == "logs_http_headers":
                value = {k: "***" for k in value}
            elif f.name == "groups":
                value = {g: {"parallel": n} for g, n in value.items()}
            elif f.name == "schedules":
                value = [orjson.loads(s.to_json()) for s in value]
            elif f.name == "api_tokens":
                value = [{"name": t.name, "sha256": "***", "scopes": list(t.scopes),
                          "allow": list(t.allow)} for t in value]
            out[f.name] = value
        return out

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Config({shown})"


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, fit for logs; a comma-separated list of
    URLs (nats_url's cluster) has each of its URLs redacted."""
    if "://" not in url:
        return url
    if url.count("://") > 1:
        return ",".join(redact_url(part) for part in url.split(","))
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    creds, host = parts.netloc.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def parse_sentinel(url: str) -> tuple[list[tuple[str, int]], str, str | None, str | None]:
    """sentinel://[user:password@]host:port[,host:port]/master -> (nodes, master, user, pw)."""
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    user = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, _, password = creds.partition(":") if ":" in creds else ("", "", creds)
    nodes = []
    for node in netloc.split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"redis_addr: bad sentinel address {node!r} (host:port)")
        nodes.append((host, int(port)))
    master = path.strip("/")
    if not master:
        raise ConfigError("redis_addr: sentinel:// needs the master name: sentinel://h:p,h:p/mymaster")
    return nodes, master, user or None, password or None


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _field_default(f: dataclasses.Field[Any]) -> Any:
    factory = f.default_factory
    return factory() if callable(factory) else f.default


# Declared defaults ("" for the derived names, which Config fills in itself).
DEFAULTS = {name: _field_default(f) for name, f in FIELDS.items()}


def strip_comments(text: str) -> str:
    """Remove `//` line comments outside JSON strings (the original's example file has them)."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch == "/" and text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _coerce(name: str, value: Any, from_env: bool) -> Any:
    """Convert a value to the type of key `name`, or raise ConfigError naming the key."""
    default = DEFAULTS[name]
    kind = type(default)
    where = f"{ENV_PREFIX}{name.upper()}" if from_env else name
    if isinstance(value, str) and value.strip() == "":
        return default  # "" means "use the default", as in the original
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError("expected an integer")
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if name == "api_tokens":
            return parse_api_tokens(value, where)
        if name == "schedules":
            return _schedules(value)
        if name == "groups":
            if isinstance(value, str):
                value = orjson.loads(value)
            if not isinstance(value, dict):
                raise ValueError('expected {"name": {"parallel": N}}')
            out: dict[str, int] = {}
            for group, spec in value.items():
                parallel = spec.get("parallel") if isinstance(spec, dict) else None
                if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
                    raise ValueError(f"{group}.parallel: a whole number of at least 1")
                out[str(group)] = parallel
            return out
        if name == "labels":
            if isinstance(value, str):
                value = orjson.loads(value) if value.lstrip()[:1] in ("[", "{") else value.split(",")
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return {v.strip(): "true" for v in value if v.strip()}
            if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in value.items()):
                return dict(value)
            raise ValueError("expected an object of strings, or a list of names")
        if kind is dict and name in ("limits_default", "limits_max"):
            if isinstance(value, str):
                value = orjson.loads(value)
            return parse_limits(value, where)
        if kind is dict:
            if isinstance(value, str):
                value = orjson.loads(value)
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise ValueError("expected an object of strings")
            return dict(value)
        if kind is tuple:
            if isinstance(value, str):
                value = orjson.loads(value) if value.lstrip().startswith("[") else value.split(",")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of strings")
            return tuple(v.strip() for v in value if v.strip())
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: {exc} (got {value!r})") from exc


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    check_paths: bool = True,
) -> Config:
    """File, then `TASK_JOB_<KEY>` variables, then CLI overrides; validated."""
    values: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from exc
        try:
            data = orjson.loads(strip_comments(text)) if text.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: must hold a JSON object")
        for key, value in data.items():
            if key not in FIELDS:
                raise ConfigError(f"{key}: unknown key in {path}")
            values[key] = _coerce(key, value, from_env=False)
    environ = os.environ if env is None else env
    for name in environ:
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):].lower() not in FIELDS \
                and name not in NOT_SETTINGS:
            near = difflib.get_close_matches(name[len(ENV_PREFIX):].lower(), FIELDS, 1)
            hint = f" (did you mean {ENV_PREFIX}{near[0].upper()}?)" if near else ""
            raise ConfigError(f"{name}: unknown setting{hint}; every TASK_JOB_<KEY> names a "
                              "config key")
    for key in FIELDS:
        raw = environ.get(f"{ENV_PREFIX}{key.upper()}")
        if raw is not None:
            values[key] = _coerce(key, raw, from_env=True)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, from_env=False)
    config = Config(**values)
    validate(config, check_paths=check_paths)
    return config


def _positive(config: Config, key: str, allow_zero: bool = False) -> None:
    value = getattr(config, key)
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def validate(config: Config, *, check_paths: bool = True) -> None:
    for key in ("max_concurrency", "heartbeat_interval", "dead_after", "max_message_bytes",
                "record_max_bytes", "buffer_bytes", "task_ttl", "task_log_max_records",
                "task_log_ttl"):
        _positive(config, key)
    for key in ("label_max_bytes", "cancel_ttl", "redis_timeout"):
        _positive(config, key)
    for key in ("kill_grace", "drain_timeout", "max_output", "server_port", "dead_max_len",
                "logs_max_len"):
        _positive(config, key, allow_zero=True)
    if config.wait_replicas < -1:
        raise ConfigError("wait_replicas: must be -1 (auto), 0 or more")
    if config.server_port > 65535:
        raise ConfigError(f"server_port: {config.server_port} is not a port")
    if config.dead_after <= max(config.heartbeat_interval, 1.0):
        # An executor's claim blocks for up to 1 s: a frozen executor's last claim must land
        # before it can be declared dead and taken over.
        raise ConfigError("dead_after: must be longer than heartbeat_interval and than 1 s")
    if config.buffer_bytes < 2 * config.record_max_bytes:
        raise ConfigError("buffer_bytes: must be at least twice record_max_bytes")
    if config.confine not in CONFINE_MODES:
        raise ConfigError(f"confine: must be one of {', '.join(CONFINE_MODES)} (got {config.confine!r})")
    if config.max_output_action not in ("truncate", "kill"):
        raise ConfigError("max_output_action: must be truncate or kill")
    if config.logs_http and not config.logs_http.startswith(("http://", "https://")):
        raise ConfigError(f"logs_http: expected an http:// or https:// URL (got {redact_url(config.logs_http)!r})")
    for key in ("http_batch_bytes", "http_timeout", "log_retention_days"):
        _positive(config, key)
    _positive(config, "http_linger_ms", allow_zero=True)
    if config.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}")
    if not config.queue_name:
        raise ConfigError("queue_name: must not be empty")
    for key in ("limits_default", "limits_max"):
        for name in getattr(config, key):
            if name not in ENFORCED:
                raise ConfigError(f"{key}.{name}: cannot be enforced by this executor yet")
    for name, value in config.limits_default.items():
        if name in config.limits_max and value > config.limits_max[name]:
            raise ConfigError(f"limits_default.{name}: above limits_max ({config.limits_max[name]:g})")
    for key in ("task_env_allow", "task_env_deny"):
        for pattern in getattr(config, key):
            if not re.fullmatch(r"[A-Za-z0-9_*?\[\]!-]+", pattern):
                raise ConfigError(f"{key}: {pattern!r} is not a glob of variable names")
    if "/" in config.script_interpreter and not os.path.isabs(config.script_interpreter):
        raise ConfigError("script_interpreter: a bare name found on PATH or an absolute path")
    for script in config.perl_args_unchecked:
        if os.path.isabs(script) or ".." in script.split("/"):
            raise ConfigError(f"perl_args_unchecked: {script!r} must be a path relative to cmd_dir")
    addr = config.redis_addr
    if addr != "embedded" and "://" in addr:
        scheme = addr.split("://", 1)[0]
        if scheme not in ("redis", "rediss", "unix", "sentinel"):
            raise ConfigError(f"redis_addr: unsupported scheme {scheme!r} (redis, rediss, unix, sentinel)")
        if scheme == "sentinel":
            parse_sentinel(addr)
    elif addr != "embedded":
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"redis_addr: expected host:port or a redis:// URL (got {addr!r})")
    for key in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key"):
        if getattr(config, key) and check_paths and not os.path.isfile(getattr(config, key)):
            raise ConfigError(f"{key}: {getattr(config, key)} is not a file")
    if bool(config.redis_tls_cert) != bool(config.redis_tls_key):
        raise ConfigError("redis_tls_key: redis_tls_cert and redis_tls_key go together")
    validate_server(config, check_paths)
    if config.block_on not in ("auto", "shared", "inbox"):
        raise ConfigError(f"block_on: one of auto, shared, inbox (got {config.block_on!r})")
    _positive(config, "unroutable_after")
    _positive(config, "depends_timeout")
    _positive(config, "sync_timeout")
    _positive(config, "facade_session_ttl")
    if config.facade_token and config.api_tokens and \
            config.facade_token not in {t.name for t in config.api_tokens}:
        raise ConfigError(f"facade_token: {config.facade_token!r} is not the name of one of api_tokens")
    validate_callbacks(config)
    validate_nats(config)
    validate_grpc(config)
    if check_paths:
        if not os.path.isdir(config.cmd_dir):
            raise ConfigError(f"cmd_dir: {config.cmd_dir} is not a directory")
        if config.log_dir and os.path.exists(config.log_dir) and not os.path.isdir(config.log_dir):
            raise ConfigError(f"log_dir: {config.log_dir} is not a directory")


def validate_nats(config: Config) -> None:
    if not config.nats_url:
        return
    for url in config.nats_url.split(","):
        if not url.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ConfigError(f"nats_url: nats://, tls://, ws:// or wss:// URLs, comma-separated "
                              f"(got {redact_url(url.strip())!r})")
    token = r"[A-Za-z0-9_-]{1,64}"
    if not re.fullmatch(rf"{token}(\.{token})*", config.nats_prefix):
        raise ConfigError("nats_prefix: subject tokens of letters, digits, '_', '-', joined by '.'")
    if config.nats_worker_id and not re.fullmatch(token, config.nats_worker_id):
        raise ConfigError("nats_worker_id: 1-64 letters, digits, '_', '-' (one subject token)")
    if config.nats_stream and not re.fullmatch(token, config.nats_stream):
        raise ConfigError("nats_stream: 1-64 letters, digits, '_', '-'")
    if config.nats_callbacks not in ("nats", "all"):
        raise ConfigError("nats_callbacks: nats or all")
    if bool(config.nats_tls_cert) != bool(config.nats_tls_key):
        raise ConfigError("nats_tls_key: nats_tls_cert and nats_tls_key go together")
    _positive(config, "nats_registry_interval")


def validate_grpc(config: Config) -> None:
    if config.grpc_addr and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}", config.grpc_addr):
        raise ConfigError(f"grpc_addr: HOST:PORT (got {config.grpc_addr!r})")
    if bool(config.grpc_tls_cert) != bool(config.grpc_tls_key):
        raise ConfigError("grpc_tls_key: grpc_tls_cert and grpc_tls_key go together")
    if config.grpc_tls_ca and not config.grpc_tls_cert:
        raise ConfigError("grpc_tls_ca: mutual TLS needs grpc_tls_cert and grpc_tls_key")


def validate_callbacks(config: Config) -> None:
    if config.callback_url and not config.callback_url.startswith(("http://", "https://")):
        raise ConfigError(f"callback_url: expected an http:// or https:// URL "
                          f"(got {redact_url(config.callback_url)!r})")
    for prefix in config.callback_allow:
        parts = urlsplit(prefix)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"callback_allow: {prefix!r} is not an http:// or https:// URL prefix "
                              "with a host")
    if config.callback_channel and not config.callback_channel.isprintable():
        raise ConfigError("callback_channel: a printable channel name")
    if config.callback_lines < 0:
        raise ConfigError("callback_lines: 0 or more")
    if not is_namespace(config.log_namespace):
        raise ConfigError(f"log_namespace: {NAMESPACE_RULE}")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_server(config: Config, check_paths: bool) -> None:
    if not re.fullmatch(r"0?[0-7]{3}", config.server_socket_mode):
        raise ConfigError(f"server_socket_mode: an octal mode such as 0660 (got {config.server_socket_mode!r})")
    for key in ("server_tls_cert", "server_tls_key", "server_tls_ca"):
        if getattr(config, key) and check_paths and not os.path.isfile(getattr(config, key)):
            raise ConfigError(f"{key}: {getattr(config, key)} is not a file")
    if bool(config.server_tls_cert) != bool(config.server_tls_key):
        raise ConfigError("server_tls_key: server_tls_cert and server_tls_key go together")
    if config.server_tls_ca and not config.server_tls_cert:
        raise ConfigError("server_tls_ca: mutual TLS needs server_tls_cert and server_tls_key")
    if config.server_port and not config.api_tokens and not is_loopback(config.server_host):
        raise ConfigError(f"server_host: binding {config.server_host} beyond loopback needs "
                          "api_tokens (a generated token is for this host only)")


def cmd_dir_is_shared(cmd_dir: str) -> bool:
    """True when users other than the owner can write into cmd_dir (or its resolution)."""
    try:
        st = os.stat(os.path.realpath(cmd_dir))
    except OSError:
        return False
    return bool(st.st_mode & 0o022)
