"""systemd's notify protocol (Type=notify): READY=1, STATUS=, WATCHDOG=1, STOPPING=1 as
datagrams to $NOTIFY_SOCKET. A few lines instead of a dependency; nothing when unset."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str, watchdog_usec: int = 0) -> None:
        # "@name" is an abstract socket: its name starts with a NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog = watchdog_usec / 1e6  # seconds; 0: no watchdog asked for
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._failed = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> Notifier | None:
        """From NOTIFY_SOCKET (and WATCHDOG_USEC/WATCHDOG_PID), which are then removed from
        the environment: tasks must not speak for the executor."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        usec, pid = env.pop("WATCHDOG_USEC", ""), env.pop("WATCHDOG_PID", "")
        if not address:
            return None
        watchdog = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0
        return cls(address, watchdog)

    def send(self, *lines: str) -> None:
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
            self._failed = False
        except OSError as exc:
            if not self._failed:  # once per failure spell
                log.warning("systemd notify failed", extra={"error": repr(exc)})
            self._failed = True

    def close(self) -> None:
        self._sock.close()
