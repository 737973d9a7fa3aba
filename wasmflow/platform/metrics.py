"""Prometheus metrics of one wasmflow process, in a registry of its own.

A registry per `Metrics` (not prometheus_client's global one) so that tests and several apps in one
process do not share or collide on counters. Queue depth is read from the database at scrape time: with
several workers on PostgreSQL the queue is shared, and only the database knows its size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics handler)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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

        self.cancellations = Counter(
            "wasmflow_cancellations", "Runs cancelled, by flow and how (stopped: it ended `cancelled` on its worker, "
            "a running guest stopped or a claimed run not started; superseded: by a newer run of its concurrency key under cancel-running or "
            "replace-queued; skipped: a new run refused under skip-new; debounced: merged into a newer event)",
            ["flow", "how"], registry=self.registry)
        self.denied = Counter(
            "wasmflow_runs_denied", "Runs recorded `denied` without running, by flow and reason (rate, budget)",
            ["flow", "reason"], registry=self.registry)
        self.concurrency_waiting = Gauge(
            "wasmflow_concurrency_waiting", "Runs queued behind their concurrency key's limit, by flow",
            ["flow"], registry=self.registry)

    def watch_models(self, stats: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        """Export the local models' serving figures, read at scrape time from `stats` (the WASI-NN
        registry's `stats()`): batch size, tokens/s, queue wait, prefix-cache hits and saved tokens."""
        self.registry.register(_ModelCollector(stats))

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


# model stats key (under "batching") -> (metric name, help, kind)
_MODEL_FIGURES = (
    ("sequences_busy", "wasmflow_llm_sequences_busy", "Generations in the model's shared batch now", "gauge"),
    ("waiting", "wasmflow_llm_waiting", "Requests queued for a sequence of the model's batch", "gauge"),
    ("batch_size_last", "wasmflow_llm_batch_size", "Sequences sampled in the latest batch step", "gauge"),
    ("batch_size_mean", "wasmflow_llm_batch_size_mean", "Sequences per batch step, on average", "gauge"),
    ("tokens_per_second", "wasmflow_llm_tokens_per_second", "Tokens generated per second of decoding", "gauge"),
    ("tokens_generated", "wasmflow_llm_tokens_generated", "Tokens generated by the batch scheduler", "counter"),
    ("queue_wait_seconds_total", "wasmflow_llm_queue_wait_seconds", "Time requests waited for a sequence", "counter"),
    ("cache_hits", "wasmflow_llm_prefix_cache_hits", "Requests that started from a cached prompt prefix", "counter"),
    ("cache_saved_tokens", "wasmflow_llm_prefix_cache_saved_tokens", "Prompt tokens not evaluated thanks to the prefix cache", "counter"),
)


class _ModelCollector:
    """Per-model serving figures of the WASI-NN registry, one label per model."""

    def __init__(self, stats: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self.stats = stats

    def describe(self) -> list[Any]:
        return []  # collected only at scrape time: the models are not known when the registry is made

    def collect(self) -> Iterator[Any]:
        try:
            models = self.stats()
        except Exception:  # a model being unloaded: skip this scrape's figures rather than fail /metrics
            return
        for key, name, doc, kind in _MODEL_FIGURES:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=["model"])
            for model, figures in models.items():
                batching = figures.get("batching") or {}
                if key in batching:
                    family.add_metric([model], float(batching[key]))
            yield family
