"""Prometheus metrics of the API process: request counts and latencies, and queue depths computed at
scrape time (so they are right whichever process did the work).

Each API app has its own registry (not the process-global one), so several apps in one process (tests,
``conveyor up``) never collide. Labels are bounded: routes are path templates
(``/api/v1/tasks/{task_id}``; never the raw path, and ``unmatched`` for any path no route serves),
methods are the standard ones (others count as ``OTHER``), queue names are those that exist, states
are the fixed set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueSnapshot(Protocol):
    """What the queue-depth gauges read (``conveyor.db.queue_store.QueueStats`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def counts(self) -> dict[str, int]: ...

    @property
    def oldest_waiting_age_s(self) -> float | None: ...

    @property
    def paused(self) -> bool: ...

    @property
    def workers(self) -> int: ...


class _QueueCollector(Collector):
    """Yields the gauges of the snapshot handed to :meth:`ApiMetrics.render` just before collection."""

    def __init__(self) -> None:
        self.snapshot: Sequence[QueueSnapshot] = ()

    def collect(self) -> Iterable[Metric]:
        return self._families(self.snapshot)

    def describe(self) -> Iterable[Metric]:
        return self._families(())

    @staticmethod
    def _families(snapshot: Sequence[QueueSnapshot]) -> Iterator[Metric]:
        depth = GaugeMetricFamily("conveyor_queue_tasks", "Tasks in each queue by state.", labels=["queue", "state"])
        oldest = GaugeMetricFamily(
            "conveyor_queue_oldest_waiting_seconds",
            "How long the longest-waiting due task of each queue has waited.",
            labels=["queue"],
        )
        paused = GaugeMetricFamily("conveyor_queue_paused", "1 if the queue is paused.", labels=["queue"])
        workers = GaugeMetricFamily("conveyor_queue_workers", "Live workers consuming the queue.", labels=["queue"])
        for queue in snapshot:
            for state, count in sorted(queue.counts.items()):
                depth.add_metric([queue.name, state], count)
            oldest.add_metric([queue.name], queue.oldest_waiting_age_s or 0.0)
            paused.add_metric([queue.name], 1.0 if queue.paused else 0.0)
            workers.add_metric([queue.name], queue.workers)
        yield from (depth, oldest, paused, workers)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "conveyor_api_requests",
            "HTTP requests answered, by method, route (its path template) and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "conveyor_api_request_duration_seconds",
            "Seconds to answer an HTTP request, by method and route (its path template).",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._queues = _QueueCollector()
        self.registry.register(self._queues)

    def observe(self, method: str, route: str, status: int, duration_s: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(duration_s)

    def render(self, queues: Sequence[QueueSnapshot]) -> bytes:
        """The text exposition, with queue gauges from ``queues``."""
        # No await between setting the snapshot and collecting it: on one event loop nothing else can
        # run in between, so concurrent scrapes cannot mix their snapshots.
        self._queues.snapshot = queues
        try:
            return generate_latest(self.registry)
        finally:
            self._queues.snapshot = ()
