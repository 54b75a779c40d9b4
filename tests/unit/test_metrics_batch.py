"""Batched per-request histograms (gateway/core/metrics.py) expose what plain observe()
calls would, are written only when flushed, and are flushed by the loop's timer, by an
exposition and at app cleanup. Counters stay immediate."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.core.metrics import FLUSH_SECONDS, Metrics

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("challenge", "token", "document", "access_token", "binding", "rules", "upstream")
# Durations on, between and beyond the bucket bounds (0.0005 ... 30 s, then +Inf).
DURATIONS = [0.0, 0.0005, 0.0007, 0.001, 0.004, 0.05, 0.0999, 1.0, 4.9, 29.0, 31.0, 1e9]


def _exposition_without_created(metrics: Metrics) -> list[str]:
    # ``_created`` samples are creation timestamps: they differ between any two objects.
    return [
        line
        for line in metrics.exposition().decode().splitlines()
        if "_created" not in line and not line.startswith("# ")
    ]


def _feed_batched(metrics: Metrics) -> None:
    for i, seconds in enumerate(DURATIONS):
        steps = {step: DURATIONS[(i + j) % len(DURATIONS)] for j, step in enumerate(STEPS)}
        metrics.join_decided(
            "joined" if i % 3 else "rejected", "" if i % 3 else "x", seconds, steps
        )


def _feed_plain(metrics: Metrics) -> None:
    for i, seconds in enumerate(DURATIONS):
        steps = {step: DURATIONS[(i + j) % len(DURATIONS)] for j, step in enumerate(STEPS)}
        outcome, code = ("joined", "") if i % 3 else ("rejected", "x")
        metrics.joins.labels(outcome=outcome, code=code).inc()
        metrics.join_latency.observe(seconds)
        for step, spent in steps.items():
            metrics.step_latency.labels(step=step).observe(spent)


async def test_batched_histograms_expose_what_plain_observes_would() -> None:
    batched, plain = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    _feed_batched(batched)
    _feed_plain(plain)
    assert _exposition_without_created(batched) == _exposition_without_created(plain)


async def test_observations_are_written_only_when_flushed() -> None:
    metrics = Metrics(CollectorRegistry())
    registry = metrics.registry
    for _ in range(100):
        metrics.join_decided("joined", "", 0.01, {"document": 0.001})
    # The counter is immediate; the histograms wait for the flush.
    assert (
        registry.get_sample_value("join_gateway_joins_total", {"outcome": "joined", "code": ""})
        == 100
    )
    assert registry.get_sample_value("join_gateway_join_duration_seconds_count") == 0
    metrics.flush()
    assert registry.get_sample_value("join_gateway_join_duration_seconds_count") == 100
    assert registry.get_sample_value("join_gateway_join_duration_seconds_sum") == pytest.approx(1.0)
    assert (
        registry.get_sample_value(
            "join_gateway_join_step_duration_seconds_bucket", {"step": "document", "le": "0.001"}
        )
        == 100
    )
    metrics.flush()  # nothing new: nothing written twice
    assert registry.get_sample_value("join_gateway_join_duration_seconds_count") == 100


async def test_the_loop_flushes_within_the_flush_interval() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.join_decided("joined", "", 0.01, {})
    await asyncio.sleep(FLUSH_SECONDS * 2)
    assert metrics.registry.get_sample_value("join_gateway_join_duration_seconds_count") == 1


async def test_app_cleanup_flushes_what_is_left() -> None:
    metrics = Metrics(CollectorRegistry())
    cleanup = metrics.flush_on_cleanup(object())
    await anext(cleanup)
    metrics.join_decided("joined", "", 0.01, {})
    with pytest.raises(StopAsyncIteration):
        await anext(cleanup)
    assert metrics.registry.get_sample_value("join_gateway_join_duration_seconds_count") == 1


def test_without_a_loop_every_observation_is_written_at_once() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.join_decided("joined", "", 0.01, {"document": 0.001})
    assert metrics.registry.get_sample_value("join_gateway_join_duration_seconds_count") == 1


def test_nan_lands_in_no_bucket_as_with_observe() -> None:
    batched, plain = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    batched.join_decided("joined", "", math.nan, {})
    plain.joins.labels(outcome="joined", code="").inc()
    plain.join_latency.observe(math.nan)
    assert _exposition_without_created(batched) == _exposition_without_created(plain)


@pytest.mark.parametrize(
    ("states", "value"),
    [
        pytest.param(["closed"], 0, id="closed"),
        pytest.param(["closed", "open"], 2, id="a change is written"),
        pytest.param(["open", "open", "half_open"], 1, id="repeats change nothing"),
        pytest.param(["open", "closed", "closed"], 0, id="back to closed"),
    ],
)
def test_the_circuit_gauge_follows_the_breaker(states: list[str], value: int) -> None:
    metrics = Metrics(CollectorRegistry())
    for state in states:
        metrics.set_circuit_state(state)
    assert metrics.registry.get_sample_value("join_gateway_upstream_circuit_state") == value


_MULTIPROCESS_SCRIPT = """
import sys
from prometheus_client import CollectorRegistry
from gateway.core.metrics import Metrics
from tests.unit.test_metrics_batch import _exposition_without_created, _feed_batched, _feed_plain

metrics = Metrics(CollectorRegistry())
(_feed_batched if sys.argv[1] == "batched" else _feed_plain)(metrics)
print("\\n".join(_exposition_without_created(metrics)))
"""


def test_batched_equals_plain_in_multiprocess_mode(tmp_path: Path) -> None:
    """The production path: mmapped values, aggregated by MultiProcessCollector."""
    out: dict[str, str] = {}
    for mode in ("batched", "plain"):
        prom = tmp_path / mode
        prom.mkdir()
        run = subprocess.run(
            [sys.executable, "-c", _MULTIPROCESS_SCRIPT, mode],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        out[mode] = run.stdout
        assert list(prom.glob("histogram_*.db")), "not in multiprocess mode"
    assert "join_gateway_join_step_duration_seconds_bucket" in out["batched"]
    # MultiProcessCollector's order follows its files' dicts: compare the samples as sets.
    assert sorted(out["batched"].splitlines()) == sorted(out["plain"].splitlines())


async def test_cache_lookups_are_counted_in_batches() -> None:
    metrics = Metrics(CollectorRegistry())
    observe = metrics.cache_observer("chains")
    for result in ("hit", "hit", "miss", "coalesced", "hit"):
        observe(result)
    labels = {"cache": "chains", "result": "hit"}
    assert metrics.registry.get_sample_value("join_gateway_cache_requests_total", labels) == 0
    metrics.exposition()  # a scrape of this worker writes what it holds first
    assert metrics.registry.get_sample_value("join_gateway_cache_requests_total", labels) == 3
    assert (
        metrics.registry.get_sample_value(
            "join_gateway_cache_requests_total", {"cache": "chains", "result": "miss"}
        )
        == 1
    )


async def test_the_join_gauges_and_challenges_are_written_at_the_flush() -> None:
    metrics = Metrics(CollectorRegistry())
    registry = metrics.registry
    for _ in range(5):
        metrics.join_started()
        metrics.challenge_issued()
    metrics.set_queue_depth(3)
    metrics.join_ended()
    # Nothing written yet: four gauge writes and a counter write per join were the cost.
    assert registry.get_sample_value("join_gateway_joins_in_flight") == 0
    assert registry.get_sample_value("join_gateway_admission_queue_depth") == 0
    assert registry.get_sample_value("join_gateway_challenges_issued_total") == 0
    metrics.exposition()  # a scrape of this worker sees its current values
    assert registry.get_sample_value("join_gateway_joins_in_flight") == 4
    assert registry.get_sample_value("join_gateway_admission_queue_depth") == 3
    assert registry.get_sample_value("join_gateway_challenges_issued_total") == 5
    for _ in range(4):
        metrics.join_ended()
    metrics.set_queue_depth(0)
    await asyncio.sleep(FLUSH_SECONDS * 2)  # the loop's flush, as after the last join
    assert registry.get_sample_value("join_gateway_joins_in_flight") == 0
    assert registry.get_sample_value("join_gateway_admission_queue_depth") == 0
