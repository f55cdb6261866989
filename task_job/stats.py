"""Counters the executor keeps for /metrics: plain integers and bucket lists, updated on the
task path for well under a microsecond each, read (and exported) only when scraped."""

from __future__ import annotations

import bisect
from collections import Counter

# Seconds: claim to start is about a millisecond here; durations span tasks of any length.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


class Histogram:
    """Cumulative at export, as Prometheus wants; one increment per observation here."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Stats:
    """What one executor has done since it started."""

    __slots__ = ("claimed", "finished", "start_latency", "duration", "redis_reconnects")

    def __init__(self) -> None:
        self.claimed = 0
        self.finished: Counter[str] = Counter()
        self.start_latency = Histogram(LATENCY_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.redis_reconnects = 0
