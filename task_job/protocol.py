"""Parse and build the wire messages: Task, Control and Record (TaskLog). Pure, no I/O.

Everything that leaves or enters Redis as JSON passes through here; past this module there
are no raw dicts. Parsing never raises anything but `ProtocolError`.
"""

from __future__ import annotations

import base64
import functools
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from task_job.errors import ProtocolError
from task_job.limits import parse_limits

MAX_ID_LENGTH = 256


class Status(StrEnum):
    """The `status` of a `done` record."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    KILLED = "killed"
    CANCELLED = "cancelled"
    LOST = "lost"
    REJECTED = "rejected"


TERMINAL_STATUSES = frozenset(Status)


class MsgType(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"
    DONE = "done"
    RETRY = "retry"  # an attempt that will be retried ended (not a done record)


ON_LOST_CHOICES = ("fail", "requeue")
RETRY_ON = ("failed", "timeout", "lost")
VIA = ("nats", "grpc")  # transports that mark their tasks (bridges/)


@dataclass(frozen=True, slots=True)
class Task:
    """A task as pushed by a producer; `raw` is the exact message, kept to remove it later."""

    id: str
    cmdline: str
    argv: tuple[str, ...]
    type: str | None = None
    tube: str | None = None
    cmd_args: tuple[str, ...] = ()
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    stdin: str | None = None
    max_output: int | None = None
    on_lost: str = "fail"
    retries: int = 0
    limits: dict[str, float] = field(default_factory=dict)  # task.limits, checked (limits.py)
    user: str | None = None  # task.user: one of the executor's allowed_users
    submitted_by: str | None = None  # set by the API: the token's name (or the peer)
    labels: dict[str, Any] = field(default_factory=dict)  # task.labels: placement selectors
    enqueue_at: float | None = None  # task.enqueue_at (unix seconds): parked until then
    delay: float | None = None  # task.delay (seconds): parked this long from its claim
    retry_on: tuple[str, ...] = ()  # statuses that start another attempt ((): none; see retrying)
    retry_delay: float = 0.0  # seconds before the 2nd attempt, doubling, with jitter
    retry_delay_max: float = 3600.0
    group: str | None = None  # task.group: fleet-wide concurrency by the groups config
    depends_on: tuple[str, ...] = ()  # task.depends_on: ids that must succeed first
    depends_timeout: float | None = None  # the longest it waits for them (None: config's)
    name: str | None = None  # task.name: a catalogue entry instead of cmdline (argv is then ())
    label: str | None = None  # task.label: the pueue-NATS label (log file name, callbacks)
    callback: str | None = None  # task.callback: a webhook URL, under the operator's callback_allow
    via: str | None = None  # top-level `via`: the transport it came by ("nats": called back there)

    @property
    def retrying(self) -> bool:
        """Whether `retries` means retries after failures (docs/protocol.md): a message with
        on_lost "requeue" and retries but neither retry_on nor retry_delay keeps the older
        meaning (a bound on requeues of a lost run), so no non-idempotent script starts being
        re-run after a failure."""
        return self.retries > 0 and bool(self.retry_on)
    executor: str | None = None  # task.executor: the one executor that may run it
    raw: bytes = b""


CONTROL_TYPES = ("kill", "drain", "resume")


@dataclass(frozen=True, slots=True)
class Control:
    """A control message: `kill` a task (`id`), or `drain`/`resume` an executor (`id` is the
    executor's; sent to its own control list only). `by`: who asked (token name or peer)."""

    id: str
    type: str
    by: str | None = None


def _decode_object(raw: bytes | str, max_bytes: int | None) -> dict[str, Any]:
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a JSON object, not {_kind(obj)}")
    return obj


def _kind(value: Any) -> str:
    return {
        dict: "an object", list: "an array", str: "a string", bool: "a boolean",
        int: "a number", float: "a number", type(None): "null",
    }.get(type(value), type(value).__name__)


def _read_id(obj: dict[str, Any]) -> str:
    if "id" not in obj:
        raise ProtocolError("missing 'id'")
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ProtocolError(f"'id' must be a string or an integer, not {_kind(value)}")
    text = str(value)
    if not text:
        raise ProtocolError("'id' is empty")
    if len(text) > MAX_ID_LENGTH:
        raise ProtocolError(f"'id' is longer than {MAX_ID_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ProtocolError("'id' contains control characters")
    return text


def _label(obj: dict[str, Any], key: str, task_id: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    raise ProtocolError(f"'{key}' must be a string, not {_kind(value)}", task_id)


def _number(value: Any, key: str, task_id: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"'{key}' must be a number, not {_kind(value)}", task_id)
    if not math.isfinite(value):
        raise ProtocolError(f"'{key}' must be finite", task_id)
    return float(value)


def _int(value: Any, key: str, task_id: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{key}' must be an integer, not {_kind(value)}", task_id)
    if value < minimum:
        raise ProtocolError(f"'{key}' must be at least {minimum}", task_id)
    return value


def _string(value: Any, key: str, task_id: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"'{key}' must be a string, not {_kind(value)}", task_id)
    if "\x00" in value:
        raise ProtocolError(f"'{key}' contains a NUL character", task_id)
    return value


# Without quotes, backslashes or whitespace beyond space, tab, CR and LF (the only whitespace
# shlex knows), shlex.split(posix=True) is str.split(): the common case skips shlex's
# character-by-character lexer.
_NEEDS_SHLEX = re.compile(r"[\"'\\\x0b\x0c\x1c-\x1f\x85]|[^\x00-\x7f]")


def split_cmdline(cmdline: str) -> list[str]:
    """task.cmdline split into words, as a POSIX shell would (quotes, escapes), with no shell."""
    if _NEEDS_SHLEX.search(cmdline) is None:
        return cmdline.split()
    return shlex.split(cmdline, comments=False, posix=True)


DEFAULT_LABEL_MAX_BYTES = 1024


def parse_task(raw: bytes | str, max_bytes: int | None = None,
               label_max_bytes: int = DEFAULT_LABEL_MAX_BYTES) -> Task:
    """Parse and validate a task message, or raise `ProtocolError` saying why.

    `type` and `tube`, echoed on every record, are bounded by `label_max_bytes`."""
    obj = _decode_object(raw, max_bytes)
    task_id = _read_id(obj)
    for key in ("type", "tube"):
        value = obj.get(key)
        if isinstance(value, str) and len(value) * 4 > label_max_bytes \
                and len(value.encode("utf-8", "surrogatepass")) > label_max_bytes:
            raise ProtocolError(f"'{key}' is longer than label_max_bytes ({label_max_bytes} bytes)", task_id)
    spec = obj.get("task")
    if spec is None:
        raise ProtocolError("missing 'task'", task_id)
    if not isinstance(spec, dict):
        raise ProtocolError(f"'task' must be an object, not {_kind(spec)}", task_id)

    name = None
    if spec.get("name") is not None:  # a catalogue entry instead of a command line
        name = _string(spec["name"], "task.name", task_id)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ProtocolError("'task.name' must name a catalogue entry (letters, digits, '_', '.', '-')", task_id)
        if spec.get("cmdline") is not None:
            raise ProtocolError("'task.name' and 'task.cmdline' exclude each other", task_id)
        cmdline, words = "", []
    elif "cmdline" not in spec:
        raise ProtocolError("missing 'task.cmdline'", task_id)
    else:
        cmdline = _string(spec["cmdline"], "task.cmdline", task_id)
        try:
            words = split_cmdline(cmdline)
        except ValueError as exc:
            raise ProtocolError(f"'task.cmdline' cannot be split: {exc}", task_id) from exc
        if not words:
            raise ProtocolError("'task.cmdline' is empty", task_id)

    raw_args = spec.get("cmd_args")
    if raw_args is None:
        raw_args = []
    if not isinstance(raw_args, list):
        raise ProtocolError(f"'task.cmd_args' must be an array, not {_kind(raw_args)}", task_id)
    cmd_args = tuple(_string(a, f"task.cmd_args[{i}]", task_id) for i, a in enumerate(raw_args))

    timeout: float | None = None
    if spec.get("timeout") is not None:
        value = _number(spec["timeout"], "task.timeout", task_id)
        timeout = value if value > 0 else None

    env: dict[str, str] = {}
    raw_env = spec.get("env")
    if raw_env is not None:
        if not isinstance(raw_env, dict):
            raise ProtocolError(f"'task.env' must be an object, not {_kind(raw_env)}", task_id)
        for key, value in raw_env.items():
            if not key or "=" in key or "\x00" in key:
                raise ProtocolError(f"'task.env' has an invalid name {key!r}", task_id)
            env[key] = _string(value, f"task.env.{key}", task_id)

    cwd = None if spec.get("cwd") is None else _string(spec["cwd"], "task.cwd", task_id)
    stdin = spec.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        raise ProtocolError(f"'task.stdin' must be a string, not {_kind(stdin)}", task_id)
    max_output = None
    if spec.get("max_output") is not None:
        max_output = _int(spec["max_output"], "task.max_output", task_id)
    on_lost = spec.get("on_lost") or "fail"
    if on_lost not in ON_LOST_CHOICES:
        raise ProtocolError(f"'task.on_lost' must be one of {', '.join(ON_LOST_CHOICES)}", task_id)
    retries = 0 if spec.get("retries") is None else _int(spec["retries"], "task.retries", task_id)
    user = None if spec.get("user") is None else _string(spec["user"], "task.user", task_id)
    limits: dict[str, float] = {}
    if spec.get("limits") is not None:
        try:
            limits = parse_limits(spec["limits"], "task.limits")
        except ValueError as exc:
            raise ProtocolError(str(exc), task_id) from exc

    labels = parse_selectors(spec.get("labels"), task_id)
    group = None if spec.get("group") is None else _string(spec["group"], "task.group", task_id)
    if group is not None and (not group or len(group) > 128 or "}" in group or not group.isprintable()):
        raise ProtocolError("'task.group' must be a printable name of 1-128 characters", task_id)
    retry_on: tuple[str, ...] = ()
    if spec.get("retry_on") is not None:
        value = spec["retry_on"]
        if not isinstance(value, list) or not all(v in RETRY_ON for v in value):
            raise ProtocolError(f"'task.retry_on' must be a list among {', '.join(RETRY_ON)}", task_id)
        retry_on = tuple(value)
    retry_delay = 0.0 if spec.get("retry_delay") is None else _number(spec["retry_delay"], "task.retry_delay", task_id)
    retry_delay_max = 3600.0 if spec.get("retry_delay_max") is None else \
        _number(spec["retry_delay_max"], "task.retry_delay_max", task_id)
    if retry_delay < 0 or retry_delay_max < 0:
        raise ProtocolError("'task.retry_delay' and 'task.retry_delay_max' must be 0 or more", task_id)
    enqueue_at = None if spec.get("enqueue_at") is None else parse_time(spec["enqueue_at"], task_id)
    delay = None
    if spec.get("delay") is not None:
        delay = _number(spec["delay"], "task.delay", task_id)
        if delay < 0:
            raise ProtocolError("'task.delay' must be 0 or more seconds", task_id)
        if enqueue_at is not None:
            raise ProtocolError("'task.delay' and 'task.enqueue_at' exclude each other", task_id)
    target = None if spec.get("executor") is None else _string(spec["executor"], "task.executor", task_id)
    depends_on = _depends_on(spec.get("depends_on"), task_id)
    depends_timeout = None
    if spec.get("depends_timeout") is not None:
        depends_timeout = _number(spec["depends_timeout"], "task.depends_timeout", task_id)
        if depends_timeout <= 0:
            raise ProtocolError("'task.depends_timeout' must be more than 0 seconds", task_id)
    label = None if spec.get("label") is None else _string(spec["label"], "task.label", task_id)
    if label is not None and (not label or len(label) > 256 or not label.isprintable()):
        raise ProtocolError("'task.label' must be a printable string of 1-256 characters", task_id)
    callback = None if spec.get("callback") is None else _string(spec["callback"], "task.callback", task_id)
    if callback is not None and (len(callback) > 2048 or not callback.startswith(("http://", "https://"))):
        raise ProtocolError("'task.callback' must be an http:// or https:// URL of at most 2048 characters",
                            task_id)
    by = obj.get("submitted_by")
    if by is not None and (not isinstance(by, str) or len(by) > 256 or not by.isprintable()):
        raise ProtocolError("'submitted_by' must be a printable string of at most 256 characters", task_id)
    via = obj.get("via")
    if via is not None and via not in VIA:
        raise ProtocolError(f"'via' must be one of {', '.join(VIA)}", task_id)
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    return Task(
        id=task_id, cmdline=cmdline, argv=(*words, *cmd_args),
        type=_label(obj, "type", task_id), tube=_label(obj, "tube", task_id),
        cmd_args=cmd_args, timeout=timeout, env=env, cwd=cwd, stdin=stdin,
        max_output=max_output, on_lost=on_lost, retries=retries, limits=limits, user=user,
        submitted_by=by, labels=labels, executor=target, enqueue_at=enqueue_at, delay=delay,
        retry_on=_retry_on(retry_on, spec, on_lost), retry_delay=retry_delay,
        retry_delay_max=retry_delay_max, group=group, depends_on=depends_on,
        depends_timeout=depends_timeout, name=name, label=label, callback=callback, via=via, raw=data,
    )


MAX_DEPENDS = 1000


def _depends_on(value: Any, task_id: str) -> tuple[str, ...]:
    """task.depends_on: task ids (numbers are taken as their decimal text, as pueue sends them)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_DEPENDS:
        raise ProtocolError(f"'task.depends_on' must be a list of at most {MAX_DEPENDS} task ids", task_id)
    out: list[str] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ProtocolError(f"'task.depends_on' holds task ids, not {_kind(item)}", task_id)
        text = str(item)
        if not text or len(text) > MAX_ID_LENGTH or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            raise ProtocolError(f"'task.depends_on': {text[:64]!r} is not a task id", task_id)
        if text == task_id:
            raise ProtocolError("'task.depends_on' names the task itself", task_id)
        if text not in out:
            out.append(text)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Dag:
    """A whole DAG in one message: `{"id": "dag-7", "tasks": [<task message>, ...]}`."""

    id: str
    tasks: tuple[Task, ...]


def is_dag(obj: Any) -> bool:
    return isinstance(obj, dict) and "tasks" in obj and "task" not in obj


def parse_dag(raw: bytes | str, max_bytes: int | None = None, label_max_bytes: int = 256) -> Dag:
    """A DAG message, all of it checked: every task as an executor reads it, ids unique, no
    cycle (named, as `a -> b -> a`). Whether outside ids are known is Redis' to say."""
    obj = _decode_object(raw, max_bytes)
    dag_id = _read_id(obj)
    tasks = obj.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ProtocolError("'tasks' must be a non-empty list of task messages", dag_id)
    by = obj.get("submitted_by")
    parsed: list[Task] = []
    for i, item in enumerate(tasks):
        if not isinstance(item, dict):
            raise ProtocolError(f"tasks[{i}]: a task message, not {_kind(item)}", dag_id)
        if by is not None:
            item = {**item, "submitted_by": by}
        try:
            parsed.append(parse_task(orjson.dumps(item), None, label_max_bytes))
        except ProtocolError as exc:
            raise ProtocolError(f"tasks[{i}]: {exc.reason}", dag_id) from None
    ids = [t.id for t in parsed]
    for task_id in ids:
        if ids.count(task_id) > 1 or task_id == dag_id:
            raise ProtocolError(f"task id {task_id!r} appears twice in the DAG", dag_id)
    cycle = find_cycle({t.id: t.depends_on for t in parsed})
    if cycle:
        raise ProtocolError(f"the DAG has a cycle: {' -> '.join(cycle)}", dag_id)
    return Dag(dag_id, tuple(parsed))


def find_cycle(edges: dict[str, tuple[str, ...]]) -> list[str]:
    """A cycle among the ids of `edges` (id -> the ids it depends on), as a path, or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in edges:
        if state.get(root):
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0:
                state[node] = 1
                path.append(node)
            deps = [d for d in edges.get(node, ()) if d in edges]
            if i < len(deps):
                stack.append((node, i + 1))
                nxt = deps[i]
                if state.get(nxt) == 1:
                    return [*path[path.index(nxt):], nxt]
                if not state.get(nxt):
                    stack.append((nxt, 0))
            else:
                state[node] = 2
                path.pop()
    return []


def _retry_on(given: tuple[str, ...], spec: dict[str, Any], on_lost: str) -> tuple[str, ...]:
    """The statuses that start another attempt: as given; by default failed and timeout —
    except for a message that sets on_lost "requeue" and retries and neither retry_on nor
    retry_delay, whose retries keep their older meaning alone."""
    if given or not spec.get("retries"):
        return given
    if on_lost == "requeue" and spec.get("retry_delay") is None:
        return ()
    return ("failed", "timeout")


def with_due(message: dict[str, Any], due: float) -> bytes:
    """A task message with its `task.delay` fixed into `task.enqueue_at`, so that a task
    parked once for its delay is not parked again when it comes back due."""
    spec = {k: v for k, v in message["task"].items() if k != "delay"}
    return orjson.dumps({**message, "task": {**spec, "enqueue_at": due}})


def parse_time(value: Any, task_id: str | None = None) -> float:
    """task.enqueue_at: unix seconds, or RFC 3339 with a zone ("2026-11-25T10:00:00Z",
    "...+08:00"); a time without a zone is refused (whose clock would it be?)."""
    from datetime import datetime

    if isinstance(value, bool):
        raise ProtocolError("'task.enqueue_at' must be RFC 3339 or unix seconds", task_id)
    if isinstance(value, (int, float)):
        if value != value or value < 0:
            raise ProtocolError("'task.enqueue_at' must be a time", task_id)
        return float(value)
    if not isinstance(value, str):
        raise ProtocolError("'task.enqueue_at' must be RFC 3339 or unix seconds", task_id)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ProtocolError(f"'task.enqueue_at' is not RFC 3339: {value[:64]!r}", task_id) from exc
    if when.tzinfo is None:
        raise ProtocolError("'task.enqueue_at' needs a zone (Z or +hh:mm)", task_id)
    return when.timestamp()


def parse_selectors(value: Any, task_id: str | None = None) -> dict[str, Any]:
    """task.labels: {"os": "linux"} (equal), {"gpu": "!=none"} (not equal, or absent),
    {"zone": ["a", "b"]} (one of). Matched against executors' labels (docs/routing.md)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"'task.labels' must be an object, not {_kind(value)}", task_id)
    out: dict[str, Any] = {}
    for key, want in value.items():
        if not key or len(key) > 128:
            raise ProtocolError(f"'task.labels' has an invalid name {key!r}", task_id)
        if isinstance(want, list) and want and all(isinstance(v, str) for v in want):
            out[key] = list(want)
        elif isinstance(want, str):
            out[key] = want
        else:
            raise ProtocolError(f"'task.labels.{key}' must be a string or a list of strings", task_id)
    return out


def labels_match(selectors: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether an executor's labels satisfy a task's selectors (the same rules as place.lua)."""
    for key, want in selectors.items():
        have = labels.get(key)
        if isinstance(want, list):
            if have not in want:
                return False
        elif want.startswith("!="):
            if have == want[2:]:
                return False
        elif have != want:
            return False
    return True


def peek_id(raw: bytes | str) -> str | None:
    """The id of a message if one can be read, whatever else is wrong with it."""
    try:
        return _read_id(_decode_object(raw, None))
    except ProtocolError:
        return None


def parse_control(raw: bytes | str, max_bytes: int | None = None) -> Control:
    """Parse a control message (`{"id": "101", "type": "kill"}`)."""
    obj = _decode_object(raw, max_bytes)
    task_id = _read_id(obj)
    kind = obj.get("type")
    if kind not in CONTROL_TYPES:
        raise ProtocolError(f"unknown control type {kind!r} ({', '.join(CONTROL_TYPES)})", task_id)
    by = obj.get("by")
    if by is not None and (not isinstance(by, str) or len(by) > 256 or not by.isprintable()):
        raise ProtocolError("by: a printable string of at most 256 characters", task_id)
    return Control(id=task_id, type=kind, by=by)


def build_task(
    task_id: str, cmdline: str, cmd_args: list[str] | tuple[str, ...] = (), *,
    type: str | None = "start", tube: str | None = None, timeout: float | None = None,
    env: dict[str, str] | None = None, cwd: str | None = None, stdin: str | None = None,
    on_lost: str | None = None, labels: dict[str, Any] | None = None, executor: str | None = None,
    enqueue_at: float | None = None, depends_on: Sequence[str] | None = None,
    depends_timeout: float | None = None, group: str | None = None, name: str | None = None,
    label: str | None = None, callback: str | None = None,
) -> bytes:
    """The JSON of a task message, as `task-job submit` pushes it (with `name`, a catalogue
    entry's, and no cmdline)."""
    spec: dict[str, Any] = {"name": name, "cmd_args": list(cmd_args)} if name else \
        {"cmdline": cmdline, "cmd_args": list(cmd_args)}
    for key, value in (("timeout", timeout), ("env", env), ("cwd", cwd), ("stdin", stdin),
                       ("on_lost", on_lost), ("labels", labels), ("executor", executor),
                       ("enqueue_at", enqueue_at),
                       ("depends_on", list(depends_on) if depends_on else None),
                       ("depends_timeout", depends_timeout), ("group", group), ("label", label),
                       ("callback", callback)):
        if value:
            spec[key] = value
    msg: dict[str, Any] = {"id": task_id}
    if type is not None:
        msg["type"] = type
    if tube is not None:
        msg["tube"] = tube
    msg["task"] = spec
    return orjson.dumps(msg)


def build_control(task_id: str, kind: str = "kill", by: str | None = None) -> bytes:
    return orjson.dumps({"id": task_id, "type": kind, **({"by": by} if by else {})})


@dataclass(frozen=True, slots=True)
class RecordHead:
    """What every record of one task repeats: id, labels, executor."""

    id: str
    type: str | None
    tube: str | None
    executor: str
    attempt: int | None = None  # on every record of a task that retries

    @classmethod
    def of(cls, task: Task, executor: str, attempt: int | None = None) -> RecordHead:
        return cls(task.id, task.type, task.tube, executor, attempt if task.retrying else None)


def _head_dict(head: RecordHead) -> dict[str, Any]:
    out: dict[str, Any] = {"id": head.id, "type": head.type}
    if head.tube is not None:
        out["tube"] = head.tube
    out["child_num"] = 0  # the original's records carry it, always 0
    if head.attempt is not None:
        out["attempt"] = head.attempt
    return out


# A head is at most MAX_ID_LENGTH + 2 labels of label_max_bytes + the executor id, so the
# cache holds a bounded number of bytes (256 entries of a few KiB); a task's records hit it.
@functools.lru_cache(maxsize=256)
def _record_ends(head: RecordHead, msg_type: MsgType) -> tuple[bytes, bytes]:
    """The JSON around a record's data, the same for every record of a task and stream."""
    start = orjson.dumps({**_head_dict(head), "msg_type": msg_type.value})[:-1] + b',"data":'
    return start, b',"executor":' + orjson.dumps(head.executor) + b"}"


def build_output_record(
    head: RecordHead, msg_type: MsgType, data: bytes, seq: int, ts: float
) -> bytes:
    """One stdout/stderr record; bytes that are not UTF-8 travel as base64.

    The hot path of a busy task: only the data, seq and ts are encoded per record.
    """
    start, end = _record_ends(head, msg_type)
    try:
        body = orjson.dumps(data.decode("utf-8"))
    except UnicodeDecodeError:
        body = b'"' + base64.b64encode(data) + b'","encoding":"base64"'
    return b"".join((start, body, b',"seq":', str(seq).encode(), b',"ts":',
                     orjson.dumps(ts), end))


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a task ended: what the `done` record reports."""

    status: Status
    summary: str
    exit_code: int | None = None
    signal: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_retry_record(head: RecordHead, outcome: Outcome, seq: int, ts: float, attempt: int,
                       next_at: float) -> bytes:
    """The end of an attempt that will be retried: not a done record (that comes once, after
    the last attempt)."""
    out = _head_dict(head)
    out.update(msg_type=MsgType.RETRY.value, data=outcome.summary, seq=seq, ts=ts,
               executor=head.executor, attempt=attempt, status=outcome.status.value,
               exit_code=outcome.exit_code, signal=outcome.signal, started_at=outcome.started_at,
               next_at=next_at)
    return orjson.dumps(out)


def build_done_record(head: RecordHead, outcome: Outcome, seq: int, ts: float) -> bytes:
    out = _head_dict(head)
    out.update(
        msg_type=MsgType.DONE.value, data=outcome.summary, seq=seq, ts=ts,
        executor=head.executor, status=outcome.status.value, exit_code=outcome.exit_code,
        signal=outcome.signal, started_at=outcome.started_at,
        finished_at=outcome.finished_at if outcome.finished_at is not None else ts,
        duration=outcome.duration,
    )
    out.update(outcome.extra)
    return orjson.dumps(out)


@dataclass(frozen=True, slots=True)
class Record:
    """A record as a consumer reads it back."""

    id: str
    msg_type: str
    data: str
    seq: int
    fields: dict[str, Any]

    @property
    def payload(self) -> bytes:
        """The output bytes, base64 undone."""
        if self.fields.get("encoding") == "base64":
            return base64.b64decode(self.data)
        return self.data.encode("utf-8")

    @property
    def is_done(self) -> bool:
        return self.msg_type == MsgType.DONE


def parse_record(raw: bytes | str) -> Record:
    obj = _decode_object(raw, None)
    try:
        return Record(
            id=str(obj["id"]), msg_type=str(obj["msg_type"]), data=str(obj.get("data", "")),
            seq=int(obj["seq"]), fields=obj,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"not a record: {exc}") from exc


DEAD_RAW_MAX_BYTES = 64 << 10


def build_dead_entry(raw: bytes, reason: str, executor: str, ts: float,
                     keep: int = DEAD_RAW_MAX_BYTES, size: int | None = None) -> bytes:
    """A dead-letter entry: why the message was refused, its size, and the message itself
    (text or base64) up to `keep` bytes (`"truncated": true` when cut), so that an oversize
    message is not stored whole a second time. `size`: the whole message's, when `raw` is
    only its beginning."""
    size = len(raw) if size is None else size
    entry: dict[str, Any] = {"reason": reason, "executor": executor, "ts": ts, "size": size}
    kept = raw[:keep]
    try:
        entry["raw"] = kept.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(kept) < size and exc.start >= len(kept) - 3:  # a character cut in two
            entry["raw"] = kept[:exc.start].decode("utf-8", "replace")
        else:
            entry["raw"] = base64.b64encode(kept).decode("ascii")
            entry["encoding"] = "base64"
    if len(kept) < size:
        entry["truncated"] = True
    return orjson.dumps(entry)
