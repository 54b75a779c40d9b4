"""Every metric the gateway exports, in one place.

Metrics live on a :class:`Metrics` object built per app with its own registry (no
module-level singletons, so tests and several apps in one process never collide).
With several workers, prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)
makes the same objects write to shared files and ``/metrics`` aggregates them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from gateway import __version__

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.joins = Counter(
            "join_gateway_joins_total",
            "Join decisions by outcome (joined, rejected, error) and error code.",
            ["outcome", "code"],
            registry=r,
        )
        self.join_latency = Histogram(
            "join_gateway_join_duration_seconds",
            "Time from receiving a join request to answering it.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.step_latency = Histogram(
            "join_gateway_join_step_duration_seconds",
            "Time spent in each verification step.",
            ["step"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.challenges = Counter(
            "join_gateway_challenges_issued_total", "Challenges issued.", registry=r
        )
        self.in_flight = Gauge(
            "join_gateway_joins_in_flight",
            "Joins being verified now.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.build = Info("join_gateway_build", "Build information.", registry=r)
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # Info is not supported in multiprocess mode.
            self.build.info({"version": __version__})

    def exposition(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
