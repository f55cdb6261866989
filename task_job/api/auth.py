"""Tokens and scopes: who may read, submit, kill, administer; `allow` globs narrow what a
token may submit. Tokens are kept only as SHA-256 digests, compared in constant time."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from task_job.config import SCOPES, ApiToken

log = logging.getLogger(__name__)

TOKEN_FILE = "api-token"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: the token's name, its scopes, its allow globs."""

    name: str
    scopes: frozenset[str]
    allow: tuple[str, ...] = ()

    def may(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def admits(self, target: str) -> bool:
        """Whether `allow` admits a command (its path relative to cmd_dir, resolved by
        confinement) or a catalogue name; no globs: everything."""
        if not self.allow:
            return True
        return any(fnmatch.fnmatchcase(target, glob) for glob in self.allow)


class Tokens:
    def __init__(self, tokens: tuple[ApiToken, ...]) -> None:
        self._entries = [(bytes.fromhex(t.sha256), Principal(t.name, frozenset(t.scopes), t.allow))
                         for t in tokens]

    def named(self, name: str) -> Principal | None:
        """The token called `name` (facade_token: what a request without a header acts as)."""
        return next((p for _, p in self._entries if p.name == name), None)

    def check(self, presented: str) -> Principal | None:
        """The principal of a presented token, or None. Every entry is compared, each in
        constant time, so the time taken says nothing about which one (nearly) matched."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for expected, principal in self._entries:
            if hmac.compare_digest(digest, expected):
                found = principal
        return found


def local_token(state_dir: str) -> tuple[ApiToken, Path]:
    """A fresh random admin token written to <state_dir>/api-token (mode 0600), for an
    executor with no api_tokens configured; returns it (hashed) and the file's path."""
    token = secrets.token_urlsafe(32)
    path = Path(state_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return ApiToken("local", hashlib.sha256(token.encode()).hexdigest(), SCOPES[-1:]), path


def read_local_token(state_dir: str) -> str | None:
    """The generated token, for the CLI, when this user may read it."""
    try:
        return (Path(state_dir) / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None
