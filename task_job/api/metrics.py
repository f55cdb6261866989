"""/metrics in Prometheus' text format (prometheus-client): read at scrape time from the
executor's plain counters (task_job.stats), its sinks, and the fleet registry; nothing is
updated through prometheus-client on the task path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from task_job.api.app import Service


async def render(service: Service) -> tuple[bytes, str]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    executors = await service.client.executors()
    routing = await service.client.routing_stats()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(service, executors, routing))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, service: Service, executors: list[dict[str, Any]],
                 routing: dict[str, float]) -> None:
        self.service = service
        self.executors = executors
        self.routing = routing

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            SummaryMetricFamily,
        )

        up = GaugeMetricFamily("task_job_executors", "Registered executors by status",
                               labels=["status"])
        by_status: dict[str, int] = {}
        for row in self.executors:
            key = str(row.get("status") or "up")
            by_status[key] = by_status.get(key, 0) + 1
        for key in ("up", "draining", "dead"):
            up.add_metric([key], by_status.pop(key, 0))
        for key, n in by_status.items():
            up.add_metric([key], n)
        yield up
        r = self.routing
        yield GaugeMetricFamily("task_job_dispatchers", "Live dispatchers", value=r.get("dispatchers", 0))
        for name in ("routed", "rerouted", "unroutable"):
            yield CounterMetricFamily(f"task_job_tasks_{name}", f"Tasks {name} by dispatchers "
                                      "(fleet-wide)", value=r.get(name, 0))
        yield SummaryMetricFamily("task_job_placement_seconds", "From a dispatcher taking a task "
                                  "to its placement", count_value=int(r.get("placed_count", 0)),
                                  sum_value=r.get("place_seconds", 0.0))
        ex = self.service.executor
        if ex is None:
            return
        stats = ex.stats
        yield CounterMetricFamily("task_job_tasks_claimed", "Task messages claimed",
                                  value=stats.claimed)
        finished = CounterMetricFamily("task_job_tasks_finished", "Tasks finished, by status",
                                       labels=["status"])
        for status, n in sorted(stats.finished.items()):
            finished.add_metric([status], n)
        yield finished
        yield GaugeMetricFamily("task_job_tasks_running", "Tasks running", value=len(ex.running))
        yield GaugeMetricFamily("task_job_slots", "max_concurrency", value=ex.config.max_concurrency)
        yield GaugeMetricFamily("task_job_draining", "1 while drained by an operator",
                                value=int(ex.draining))
        for name, doc, hist in (
                ("task_job_claim_to_start_seconds", "From claim to the process started",
                 stats.start_latency),
                ("task_job_task_duration_seconds", "Task durations", stats.duration)):
            yield HistogramMetricFamily(name, doc, buckets=hist.cumulative(), sum_value=hist.total)
        records = CounterMetricFamily("task_job_records_delivered", "Records delivered, by sink",
                                      labels=["sink"])
        records.add_metric(["redis"], ex.sink.delivered_records)
        if ex.http is not None:
            records.add_metric(["http"], ex.http.posted_records)
        yield records
        sent = CounterMetricFamily("task_job_bytes_delivered", "Output bytes delivered, by sink",
                                   labels=["sink"])
        sent.add_metric(["redis"], ex.sink.delivered_bytes)
        if ex.http is not None:
            sent.add_metric(["http"], ex.http.posted_bytes)  # the JSON posted, not output alone
        yield sent
        errors = CounterMetricFamily("task_job_sink_errors", "Deliveries that failed (then "
                                     "retried or spooled), by sink", labels=["sink"])
        errors.add_metric(["redis"], ex.sink.errors)
        if ex.http is not None:
            errors.add_metric(["http"], ex.http.failed_batches)
        yield errors
        spool = getattr(ex.sink, "_spool", None)
        yield GaugeMetricFamily("task_job_spool_bytes", "Bytes waiting in the Redis spool",
                                value=spool.pending if spool is not None else 0)
        yield CounterMetricFamily("task_job_redis_reconnects", "Times Redis came back after "
                                  "being unreachable", value=ex.link.reconnects)
        callbacks = CounterMetricFamily("task_job_callbacks", "Completion callbacks, by outcome "
                                        "(failed: attempts retried; set_aside: refused for good)",
                                        labels=["outcome"])
        for outcome, n in (("sent", ex.callbacks.sent), ("failed", ex.callbacks.failed),
                           ("set_aside", ex.callbacks.dead)):
            callbacks.add_metric([outcome], n)
        yield callbacks
        yield GaugeMetricFamily("task_job_callbacks_pending", "Callbacks not yet taken by their receivers",
                                value=ex.callbacks.pending)
