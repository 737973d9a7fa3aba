"""Prometheus metrics of one wasmflow process, in a registry of its own.

A registry per `Metrics` (not prometheus_client's global one) so that tests and several apps in one
process do not share or collide on counters. Queue depth is read from the database at scrape time: with
several workers on PostgreSQL the queue is shared, and only the database knows its size.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics handler)

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_received = Counter(
            "wasmflow_events_received", "Events received, by source and outcome "
            "(accepted, duplicate, ignored, bad_signature, malformed, too_large, error)",
            ["source", "outcome"], registry=self.registry)
        self.runs = Counter(
            "wasmflow_runs", "Finished run attempts by flow and status", ["flow", "status"],
            registry=self.registry)
        self.run_duration = Histogram(
            "wasmflow_run_duration_seconds", "Time a run attempt took (instantiate + run)", ["flow"],
            buckets=DURATION_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge(
            "wasmflow_queue_depth", "Runs in the store by queue state (queued, running, dead)", ["state"],
            registry=self.registry)
        self.lease_expiries = Counter(
            "wasmflow_lease_expiries", "Runs taken back from a worker whose lease expired",
            registry=self.registry)
        self.retries = Counter(
            "wasmflow_retries", "Run attempts scheduled again after a retryable failure", ["flow"],
            registry=self.registry)
        self.schedule_ticks = Counter(
            "wasmflow_schedule_ticks", "Schedule ticks by flow and outcome (enqueued, skipped, missed; "
            "failed: a pass that could not handle the trigger)",
            ["flow", "outcome"], registry=self.registry)
        self.in_flight = Gauge(
            "wasmflow_runs_in_flight", "Runs executing in this process", registry=self.registry)
        self.guest_output_truncated = Counter(
            "wasmflow_guest_output_truncated", "Run attempts whose guest output was cut or refused at a cap of "
            "`limits:`, by flow and kind (logs, output, response_headers, response_body, stdout, stderr)",
            ["flow", "kind"], registry=self.registry)

    def output_truncated(self, flow: str, truncated: Mapping[str, int]) -> None:
        """Count one run attempt per kind of output it had cut (RunResult.truncated)."""
        for kind in truncated:
            self.guest_output_truncated.labels(flow=flow, kind=kind).inc()

    def render(self, depth: Optional[Callable[[], dict[str, int]]] = None) -> bytes:
        """The text exposition; `depth` reads the queue depth from the store first."""
        if depth is not None:
            for state, count in depth().items():
                self.queue_depth.labels(state=state).set(count)
        return generate_latest(self.registry)
