"""Prometheus metrics of the endpoint, on a registry of its own (several apps can live in one process).

Requests by route template and status, latency, generated tokens, batch sizes and trajectories withheld by a
redaction pattern (per pattern) are observed as they happen; the shadow log's counters (the sink's `stats()`),
the adapter watcher's counters, the engine queue depth and the active adapter version (a labelled gauge) are
read at scrape time, and so is the champion version serving refuses to load (an ungated champion).

    curl -s 127.0.0.1:8000/metrics | grep shadow_
"""

from __future__ import annotations

import re
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
StatsFn = Callable[[], dict]


def _metric_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


class _ScrapeTimeCollector(Collector):
    def __init__(self, owner: ServingMetrics):
        self.owner = owner

    def collect(self):
        owner = self.owner
        for prefix, stats_fn in owner.stats_sources.items():
            try:
                stats = stats_fn() or {}
            except Exception:  # a broken stats source must not break the scrape
                stats = {}
            for key, value in sorted(stats.items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = _metric_name(f"{prefix}_{key}")
                    yield GaugeMetricFamily(name, f"{prefix} stat {key!r} (read at scrape time)", value=value)
        if owner.adapter_version is not None:
            gauge = GaugeMetricFamily("shadow_serving_active_adapter",
                                      "1 for the adapter version being served ('base': none)", labels=["version"])
            gauge.add_metric([owner.adapter_version() or "base"], 1)
            yield gauge
        if owner.queue_depth is not None:
            yield GaugeMetricFamily("shadow_serving_queue_depth", "requests waiting for the engine",
                                    value=owner.queue_depth())
        if owner.champion_refused is not None:
            gauge = GaugeMetricFamily("shadow_serving_champion_refused", "1 for the registry champion's version "
                                      "serving refuses to load (its gate did not pass); absent when none",
                                      labels=["version"])
            if (version := owner.champion_refused()) is not None:
                gauge.add_metric([version], 1)
            yield gauge


class ServingMetrics:
    """Also the engine's `EngineObserver` (`on_batch`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("shadow_serving_requests", "HTTP requests by route template and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("shadow_serving_request_seconds", "HTTP request latency (to the last byte)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter("shadow_serving_generated_tokens", "tokens sampled by the engine",
                                        registry=self.registry)
        self.batch_rows = Histogram("shadow_serving_batch_rows", "rows (choices) per engine batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("shadow_serving_batch_seconds", "engine time per batch",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.redactions = Counter("shadow_serving_redactions", "trajectories withheld from the log because their "
                                  "text matched this redaction pattern", ["pattern"], registry=self.registry)
        self.withheld = Counter("shadow_serving_withheld_trajectories", "trajectories withheld from the log by the "
                                "redaction hook (each once, whatever patterns it matched)", registry=self.registry)
        self.stats_sources: dict[str, StatsFn] = {}
        self.adapter_version: Callable[[], str | None] | None = None
        self.queue_depth: Callable[[], int] | None = None
        self.champion_refused: Callable[[], str | None] | None = None
        self.registry.register(_ScrapeTimeCollector(self))

    def add_stats(self, prefix: str, stats_fn: StatsFn) -> None:
        self.stats_sources[prefix] = stats_fn

    def on_batch(self, rows: int, generated_tokens: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)
        self.generated_tokens.inc(generated_tokens)

    def declare_patterns(self, names: list[str]) -> None:
        """Export every configured pattern's counter from the start (at 0), not only once it first matches."""
        for name in names:
            self.redactions.labels(name)

    def on_withheld(self, patterns: list[str]) -> None:
        self.withheld.inc()
        for name in patterns:
            self.redactions.labels(name).inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
