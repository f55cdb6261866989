"""Resource limits of a task (hetuflow's `resource_limits` shape, plus processes and open
files): what a task asks for, bounded by the operator's maximum, and how each is enforced
without privileges the executor may lack. Pure, but for the /proc walk that counts processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from task_job.errors import ConfinementError
from task_job.reaper import tree

KEYS = ("max_memory_mb", "max_cpu_percent", "max_execution_time_secs", "max_output_size_bytes",
        "max_processes", "max_open_files")
# Every limit is enforced by the executor here (a limit it could not enforce would be refused,
# never silently ignored: see effective()).
ENFORCED = frozenset(KEYS)
INTEGER = frozenset({"max_output_size_bytes", "max_processes", "max_open_files"})


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits one task runs under; None = no limit."""

    max_memory_mb: float | None = None
    max_cpu_percent: float | None = None
    max_execution_time_secs: float | None = None
    max_output_size_bytes: int | None = None
    max_processes: int | None = None
    max_open_files: int | None = None

    @property
    def any(self) -> bool:
        return any(getattr(self, k) is not None for k in KEYS)

    @property
    def rlimits(self) -> list[str]:
        """prlimit(1) options for the limits the kernel enforces (soft = hard: a task cannot
        raise them). Memory is RLIMIT_DATA, not RLIMIT_AS: it counts what a process allocates
        (heap and private mappings), where RLIMIT_AS counts reserved address space and breaks
        runtimes that reserve large ranges up front (Go, the JVM, sanitizers)."""
        opts = []
        if self.max_memory_mb is not None:
            opts.append(f"--data={int(self.max_memory_mb * 1024 * 1024)}")
        if self.max_open_files is not None:
            opts.append(f"--nofile={self.max_open_files}")
        return opts


def parse_limits(raw: Any, where: str) -> dict[str, float]:
    """A limits object (task.limits, limits_default, limits_max) checked: known keys, positive
    numbers; max_cpu_percent at most 1 is a fraction of one core (hetuflow writes 0.8)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be an object")
    out: dict[str, float] = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise ValueError(f"{where}.{key} is not a limit ({', '.join(KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{where}.{key} must be a positive number")
        if key in INTEGER and value != int(value):
            raise ValueError(f"{where}.{key} must be a whole number")
        if key == "max_cpu_percent" and value <= 1:
            value = value * 100  # a fraction of one core
        out[key] = int(value) if key in INTEGER else float(value)
    return out


def effective(asked: Mapping[str, float], default: Mapping[str, float],
              maximum: Mapping[str, float]) -> Limits:
    """The task's limits: what it asked, else the default; never above the maximum (asking
    more is refused, naming the limit); a limit this executor cannot enforce is refused."""
    values: dict[str, float] = {}
    for key in KEYS:
        value = asked.get(key, default.get(key))
        if value is None:
            value = maximum.get(key)  # the maximum bounds a task that asks for nothing too
        if value is None:
            continue
        if key in maximum and value > maximum[key]:
            raise ConfinementError(f"limit {key} {value:g} is above limits_max ({maximum[key]:g})")
        if key not in ENFORCED:
            raise ConfinementError(f"limit {key} cannot be enforced by this executor")
        values[key] = value
    return Limits(**values)  # type: ignore[arg-type]


def count_processes(root: int) -> int:
    """The processes of a task's tree, its main process included; 0 when the root is gone."""
    return sum(1 for _ in tree(root))


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by a task's tree: each live process's own, plus what the root
    has reaped of its children (/proc/<pid>/stat, clock ticks)."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone since the walk saw it
        total += int(fields[11]) + int(fields[12])
        if pid == root:
            total += int(fields[13]) + int(fields[14])
    return total / _TICK
