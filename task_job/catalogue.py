"""The catalogue: operator-defined tasks a message names instead of a command line
(`{"task": {"name": "demo1", "cmd_args": [...]}}`), in celery-service's external-task format.

An entry is the operator's: its executable may be shell text (`language: sh`), may live on
PATH (`collected: false`, logged at load) or inside cmd_dir (`collected: true`); a request
only picks an entry and appends arguments, which stay data — for shell entries they are
positional parameters (`sh -c '<executable> "$@"' <name> <args…>`), never spliced into the
text. Loaded and checked at start, reloaded on SIGHUP and when the file changes; a bad entry
is left out with one clear line, and a file that cannot be read at all keeps the last good
catalogue.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from typing import Any

import orjson

from task_job.confine import inspect
from task_job.errors import ConfigError, ConfinementError, ProtocolError
from task_job.files import NAMESPACE_RULE, is_namespace
from task_job.limits import parse_limits
from task_job.protocol import parse_selectors

log = logging.getLogger(__name__)

LANGUAGES = ("python", "python2", "python3", "perl", "sh", "bash", "binary")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def kebab(cluster_type: str) -> str:
    """celery-service's route segment: TendbCluster -> tendb-cluster, TendbHA -> tendb-ha."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", cluster_type).lower()


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    cluster_type: str
    language: str
    executable: str
    args: tuple[str, ...] = ()
    collected: bool = True
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    program: str = ""  # for collected: false, the command found on PATH at load
    interpreter: str = ""  # for languages but binary, the interpreter found on PATH at load
    labels: dict[str, Any] = field(default_factory=dict)  # placement selectors for its tasks
    limits: dict[str, float] = field(default_factory=dict)  # its tasks' limits (a task's own win)
    namespace: str = ""  # folder of its labelled tasks' log files ("" = config log_namespace)
    callback_url: str = ""  # its tasks are called back here (besides config callback_url)
    callback_channel: str = ""  # ... and/or published on this Redis channel

    @property
    def route(self) -> str:
        return f"{kebab(self.cluster_type)}/{self.name}"

    def argv(self, request_args: tuple[str, ...], cmd_dir: str) -> list[str]:
        """The command to run: the executable's words, then `args`, then the request's
        (celery-service's order); request arguments are never shell text."""
        words = shlex.split(self.executable)
        if self.collected:
            root = os.path.realpath(cmd_dir)
            try:
                path = inspect(words[0], root, root, "command").path
            except ConfinementError as exc:
                raise ConfinementError(f"catalogue entry {self.name!r}: {exc}") from None
        else:
            path = self.program
        if self.language in ("sh", "bash"):
            rest = re.sub(r"^\s*\S+", "", self.executable, count=1)  # the operator's shell text
            text = f'{shlex.quote(path)}{rest} "$@"'
            return [self.interpreter, "-c", text, self.name, *self.args, *request_args]
        if self.language == "binary":
            return [path, *words[1:], *self.args, *request_args]
        return [self.interpreter, path, *words[1:], *self.args, *request_args]


@dataclass
class Catalogue:
    entries: dict[str, Entry] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    mtime: float = 0.0

    def get(self, name: str) -> Entry | None:
        return self.entries.get(name)


class CatalogueFile:
    """The catalogue at `path` as one process holds it (the executor, the API alone, the gRPC
    server): `load` at start (an unreadable file raises), `reload` on SIGHUP, `current` reads
    it again when its mtime changes. A file that cannot be read keeps the last good catalogue,
    and one version of a broken file is read (and reported) once."""

    def __init__(self, path: str, path_env: str | None = None) -> None:
        self.path = path
        self.path_env = path_env
        self.catalogue = Catalogue()
        self._tried = 0.0  # mtime of the version last read, good or not

    def load(self) -> Catalogue:
        """Read it now; raises ConfigError when it cannot be read at all."""
        if self.path:
            try:
                self._tried = os.stat(self.path).st_mtime
            except OSError:
                pass  # load() says why
            self.catalogue = load(self.path, self.path_env)
            for line in self.catalogue.errors:
                log.error("catalogue entry left out", extra={"reason": line})
            log.info("catalogue loaded", extra={"path": self.path, "entries": sorted(self.catalogue.entries)})
        return self.catalogue

    def reload(self) -> Catalogue:
        """Read it again; on a file that cannot be read, keep the last good one (and say so)."""
        try:
            return self.load()
        except ConfigError as exc:
            log.error("catalogue not reloaded; the last good one stays", extra={"reason": str(exc)})
            return self.catalogue

    def current(self) -> Catalogue:
        """The catalogue, read again first if the file changed since it was last read."""
        if self.path:
            try:
                mtime = os.stat(self.path).st_mtime
            except OSError:
                return self.catalogue  # gone for now: the last good one (SIGHUP reports why)
            if mtime != self._tried:
                self.reload()
        return self.catalogue


def _read(path: str) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".json"):
        return orjson.loads(data)
    try:
        import yaml
    except ImportError:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ConfigError(f"catalogue {path}: YAML needs PyYAML (pip install 'task-job[catalogue]'), "
                              "or write it as JSON") from None
    return yaml.safe_load(data)


def load(path: str, path_env: str | None = None) -> Catalogue:
    """The catalogue at `path`: the good entries, and one line per bad one. Raises ConfigError
    when the file cannot be read or is not a list."""
    try:
        mtime = os.stat(path).st_mtime
        items = _read(path)
    except ConfigError:
        raise
    except Exception as exc:  # unreadable, or not YAML/JSON: the caller keeps what it had
        raise ConfigError(f"catalogue {path}: {exc}") from None
    if not isinstance(items, list):
        raise ConfigError(f"catalogue {path}: expected a list of entries (celery-service's format)")
    catalogue = Catalogue(mtime=mtime)
    for i, item in enumerate(items):
        try:
            entry = _entry(item, path_env)
        except ValueError as exc:
            name = item.get("name") if isinstance(item, dict) else None
            catalogue.errors.append(f"catalogue entry {i}{f' ({name!r})' if name else ''}: {exc}")
            continue
        if entry.name in catalogue.entries:
            catalogue.errors.append(f"catalogue entry {i} ({entry.name!r}): the name is used twice")
            continue
        catalogue.entries[entry.name] = entry
    return catalogue


def _entry(item: Any, path_env: str | None) -> Entry:
    if not isinstance(item, dict):
        raise ValueError("expected a mapping")
    known = {"name", "cluster_type", "language", "executable", "args", "collected", "timeout", "env", "user",
             "labels", "limits", "namespace", "callback_url", "callback_channel"}
    unknown = sorted(set(item) - known)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    for key in ("name", "cluster_type", "language", "executable"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise ValueError(f"{key}: required, a string")
    name = item["name"]
    if not NAME.fullmatch(name):
        raise ValueError("name: 1-100 letters, digits, '_', '.', '-'")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", item["cluster_type"]):
        raise ValueError("cluster_type: letters, digits, '_', '-'")
    language = item["language"]
    if language not in LANGUAGES:
        raise ValueError(f"language: one of {', '.join(LANGUAGES)} (got {language!r})")
    if not isinstance(item.get("collected"), bool):
        raise ValueError("collected: required, true or false")
    args = item.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
        raise ValueError("args: a list of strings")
    try:
        words = shlex.split(item["executable"])
    except ValueError as exc:
        raise ValueError(f"executable: {exc}") from None
    program = ""
    if item["collected"]:
        if os.path.isabs(words[0]):
            raise ValueError("executable: a path inside cmd_dir when collected is true, not an absolute one")
    else:
        program = shutil.which(words[0], path=path_env) or ""
        if not program:
            raise ValueError(f"executable: {words[0]!r} is not found on PATH (collected: false)")
        log.warning("catalogue entry runs a command found on PATH, outside cmd_dir",
                    extra={"entry": name, "program": program})
    interpreter = ""
    if language != "binary":
        interpreter = shutil.which(language, path=path_env) or ""
        if not interpreter:
            raise ValueError(f"language: {language!r} is not found on PATH")
    timeout = item.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError("timeout: seconds, more than 0")
    env = item.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("env: a mapping of strings")
    user = item.get("user")
    if user is not None and not isinstance(user, str):
        raise ValueError("user: a user name")
    try:
        labels = parse_selectors(item.get("labels"), name)
    except ProtocolError as exc:
        raise ValueError(exc.reason.replace("'task.labels", "'labels")) from None
    limits = parse_limits(item["limits"], "limits") if item.get("limits") is not None else {}
    namespace = item.get("namespace") or ""
    if namespace and (not isinstance(namespace, str) or not is_namespace(namespace)):
        raise ValueError(f"namespace: {NAMESPACE_RULE}")
    callback_url = item.get("callback_url") or ""
    if callback_url and (not isinstance(callback_url, str)
                         or not callback_url.startswith(("http://", "https://"))):
        raise ValueError("callback_url: an http:// or https:// URL")
    channel = item.get("callback_channel") or ""
    if channel and (not isinstance(channel, str) or not channel.isprintable()):
        raise ValueError("callback_channel: a printable channel name")
    return Entry(name=name, cluster_type=item["cluster_type"], language=language,
                 executable=item["executable"], args=tuple(str(a) for a in args),
                 collected=item["collected"], timeout=float(timeout) if timeout else None, env=env,
                 user=user, program=program, interpreter=interpreter, labels=labels, limits=limits,
                 namespace=namespace, callback_url=callback_url, callback_channel=channel)
