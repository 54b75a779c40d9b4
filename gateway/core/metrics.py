"""Every metric the gateway exports, in one place.

Metrics live on a :class:`Metrics` object built per app with its own registry (no
module-level singletons, so tests and several apps in one process never collide).
With several workers, prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)
makes the same objects write to shared files and ``/metrics`` aggregates them; every
gauge declares how it aggregates across workers.

Outbound calls (Entra ID, AIA, ARM, the auth service) are measured in one place: an
aiohttp ``TraceConfig`` on the clients' sessions (:meth:`Metrics.trace_config`), which
sees every request's target, status and duration without the clients knowing. ARM's
rate-limit headers are parsed by the ARM client alone, which reports them to an injected
observer: :meth:`Metrics.arm_limits` is one.

Per-request histograms are batched. In multiprocess mode every update of a prometheus
value takes a lock, checks the pid (a system call) and writes the mmapped file; a join
observed nine histograms (two updates each): ~60 µs of the gateway's CPU per join. The
observations are added up in plain Python instead (:class:`_BatchedHistogram`) and
written once per ``FLUSH_SECONDS`` — by a timer on the running loop, before every
exposition and at app cleanup — so a histogram lags by at most that. The cache
counters (several lookups per join) are batched the same way (:class:`_BatchedCounter`);
the join and outbound-request counters and the gauges are still written at once: tests
and operators read them right after a join or a call.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import SimpleNamespace
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

from gateway import __version__

__all__ = ["CIRCUIT_STATES", "FLUSH_SECONDS", "Metrics", "TargetMap"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
FLUSH_SECONDS = 0.25  # the most a batched histogram lags behind its observations

# (host-or-URL prefix, target label); first match wins. Built by production_deps.
TargetMap = Sequence[tuple[str, str]]


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
            "Time spent in each verification step (challenge, token, document, access_token, "
            "identity, binding, rules, arm, rules_arm, labels, redeem, upstream).",
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
        self.queue_depth = Gauge(
            "join_gateway_admission_queue_depth",
            "Joins waiting for an admission slot.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.shed = Counter(
            "join_gateway_shed_total",
            "Requests refused with 429/503 before any verification, by reason.",
            ["reason"],
            registry=r,
        )
        self.connections_refused = Counter(
            "join_gateway_connections_refused_total",
            "Connections reset at accept, before any TLS work, by reason (over_cap: "
            "limits.max_connections reached in that worker).",
            ["reason"],
            registry=r,
        )
        self.cache_events = Counter(
            "join_gateway_cache_requests_total",
            "Cache lookups by cache and result (hit, miss, coalesced).",
            ["cache", "result"],
            registry=r,
        )
        self.outbound = Counter(
            "join_gateway_outbound_requests_total",
            "Outbound HTTP requests by target (entra, aia, arm, auth) and status "
            "(HTTP status, or 'error' when no answer came).",
            ["target", "status"],
            registry=r,
        )
        self.outbound_latency = Histogram(
            "join_gateway_outbound_request_duration_seconds",
            "Outbound HTTP request duration by target.",
            ["target"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.arm_remaining = Gauge(
            "join_gateway_arm_ratelimit_remaining",
            "The last x-ms-ratelimit-remaining-* value ARM sent (kind: subscription_reads, "
            "resource).",
            ["kind"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.arm_throttled = Counter(
            "join_gateway_arm_throttled_total", "ARM answers with status 429.", registry=r
        )
        self.circuit_state = Gauge(
            "join_gateway_upstream_circuit_state",
            "The auth-service circuit breaker: 0 closed, 1 half-open, 2 open.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.key_refreshes = Counter(
            "join_gateway_signing_key_refreshes_total",
            "JWKS fetches made because a token named a key we did not have (key rotations seen).",
            registry=r,
        )
        self.build_info = Gauge(
            "join_gateway_build_info",
            "Build information (always 1).",
            ["version"],
            multiprocess_mode="max",
            registry=r,
        )
        self.build_info.labels(version=__version__).set(1)
        self._join_children: dict[tuple[str, str], Counter] = {}
        self._join_latency = _BatchedHistogram(self.join_latency)
        self._step_children: dict[str, _BatchedHistogram] = {}
        self._outbound_children: dict[tuple[str, str], Counter] = {}
        self._counters: list[_BatchedCounter] = []
        self._outbound_latency: dict[str, _BatchedHistogram] = {}
        self._circuit_state: float | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._challenges = self._batched_counter(self.challenges)
        # The two gauges a join moves (four writes per join), kept in plain Python and
        # written at the flush when they changed: /metrics flushes first, so a scrape
        # always sees this worker's current values.
        self._in_flight = 0
        self._queued = 0
        self._gauges_written = (0, 0)

    # --- hot path: label children bound once, not looked up per join ----------------------

    def join_decided(
        self, outcome: str, code: str, seconds: float, steps: dict[str, float]
    ) -> None:
        key = (outcome, code)
        child = self._join_children.get(key)
        if child is None:
            child = self._join_children[key] = self.joins.labels(outcome=outcome, code=code)
        child.inc()
        self._join_latency.observe(seconds)
        children = self._step_children
        for step, spent in steps.items():
            hist = children.get(step)
            if hist is None:
                hist = children[step] = _BatchedHistogram(self.step_latency.labels(step=step))
            hist.observe(spent)
        if self._flush_timer is None:
            self._flush_soon()

    def join_started(self) -> None:
        self._in_flight += 1
        self._flush_soon()

    def join_ended(self) -> None:
        self._in_flight -= 1
        self._flush_soon()

    def set_queue_depth(self, queued: int) -> None:
        self._queued = queued

    def challenge_issued(self) -> None:
        self._challenges.count += 1
        self._flush_soon()

    def flush(self) -> None:
        """Write the batched histogram observations into the prometheus values."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        gauges = (self._in_flight, self._queued)
        if gauges != self._gauges_written:
            self.in_flight.set(gauges[0])
            self.queue_depth.set(gauges[1])
            self._gauges_written = gauges
        self._join_latency.flush()
        for batch in (*self._step_children.values(), *self._outbound_latency.values()):
            batch.flush()
        for counter in self._counters:
            counter.flush()

    def _batched_counter(self, child: Counter) -> _BatchedCounter:
        counter = _BatchedCounter(child)
        self._counters.append(counter)
        return counter

    async def flush_on_cleanup(self, app: object) -> AsyncIterator[None]:
        """For the app's ``cleanup_ctx``: what is still batched at shutdown gets written."""
        yield
        self.flush()

    def _flush_soon(self) -> None:
        if self._flush_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): nothing would flush later
            self.flush()
            return
        self._flush_timer = loop.call_later(FLUSH_SECONDS, self.flush)

    # --- hooks handed to the clients -------------------------------------------------------

    def cache_observer(self, name: str) -> Callable[[str], None]:
        # Several lookups per join: counted in plain Python, written with the histograms.
        counters = {
            result: self._batched_counter(self.cache_events.labels(cache=name, result=result))
            for result in ("hit", "miss", "coalesced")
        }

        def observe(result: str) -> None:
            counters[result].count += 1
            self._flush_soon()

        return observe

    def trace_config(self, targets: TargetMap) -> aiohttp.TraceConfig:
        """Count and time every request of a session, labelled by target."""

        def target_of(url: str) -> str:
            for prefix, label in targets:
                if url.startswith(prefix):
                    return label
            return urlsplit(url).hostname or "other"

        async def on_start(
            session: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            params: aiohttp.TraceRequestStartParams,
        ) -> None:
            ctx.started = time.perf_counter()
            ctx.target = target_of(str(params.url))

        async def on_end(
            session: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            params: aiohttp.TraceRequestEndParams,
        ) -> None:
            status = params.response.status
            self._outbound_done(ctx.target, str(status), time.perf_counter() - ctx.started)

        async def on_error(
            session: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            params: aiohttp.TraceRequestExceptionParams,
        ) -> None:
            self._outbound_done(ctx.target, "error", time.perf_counter() - ctx.started)

        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(on_start)
        trace.on_request_end.append(on_end)
        trace.on_request_exception.append(on_error)
        return trace

    def arm_limits(
        self,
        *,
        status: int,
        remaining_reads: int | None,
        remaining_resource: Mapping[str, int],
        retry_after: float | None,
    ) -> None:
        """The ARM client's observer (``gateway.azure.arm.ArmLimitsObserver``): it parses
        the rate-limit headers, we only export them."""
        if status == 429:
            self.arm_throttled.inc()
        if remaining_reads is not None:
            self.arm_remaining.labels(kind="subscription_reads").set(remaining_reads)
        if remaining_resource:
            self.arm_remaining.labels(kind="resource").set(min(remaining_resource.values()))

    def _outbound_done(self, target: str, status: str, seconds: float) -> None:
        key = (target, status)
        counter = self._outbound_children.get(key)
        if counter is None:
            counter = self._outbound_children[key] = self.outbound.labels(
                target=target, status=status
            )
        counter.inc()  # immediate, as the join counter: read right after a call
        hist = self._outbound_latency.get(target)
        if hist is None:
            hist = self._outbound_latency[target] = _BatchedHistogram(
                self.outbound_latency.labels(target=target)
            )
        hist.observe(seconds)
        self._flush_soon()

    def set_circuit_state(self, state: str) -> None:
        # Called after every join; the breaker rarely changes: write only the changes
        # (the gauge's file already holds the last value written).
        value = CIRCUIT_STATES.get(state, 0)
        if value != self._circuit_state:
            self._circuit_state = value
            self.circuit_state.set(value)

    def exposition(self) -> bytes:
        self.flush()  # this worker's batched observations; the others lag FLUSH_SECONDS at most
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


class _BatchedCounter:
    """One counter child's increments, counted in plain Python until :meth:`flush`."""

    __slots__ = ("_child", "count")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.count = 0

    def flush(self) -> None:
        if self.count:
            self._child.inc(self.count)
            self.count = 0


class _BatchedHistogram:
    """One histogram child's observations, added up in plain Python until :meth:`flush`
    writes them: the sum once, and each bucket hit once with its count.

    Writes the values prometheus_client's own ``Histogram.observe`` updates
    (``_upper_bounds``, ``_buckets``, ``_sum``); tests/unit/test_metrics_batch.py holds
    the exposition equal to plain ``observe`` calls, so a client version that changes
    them fails there (and here, at construction), not silently in production.
    """

    __slots__ = ("_bounds", "_buckets", "_counts", "_observed", "_sum", "_total")

    def __init__(self, child: Histogram) -> None:
        try:
            self._bounds: list[float] = list(child._upper_bounds)
            self._buckets = child._buckets
            self._sum = child._sum
        except AttributeError as exc:  # pragma: no cover - guarded by the test above
            raise RuntimeError(f"prometheus_client's Histogram changed: {exc}") from exc
        self._counts = [0] * len(self._bounds)
        self._total = 0.0
        self._observed = 0

    def observe(self, amount: float) -> None:
        # prometheus_client: the first bucket whose upper bound is >= amount (le); NaN
        # is <= no bound, +Inf included, and lands in no bucket, as there.
        index = bisect_left(self._bounds, amount)
        if index < len(self._counts) and amount <= self._bounds[index]:
            self._counts[index] += 1
        self._total += amount
        self._observed += 1

    def flush(self) -> None:
        if not self._observed:
            return
        self._sum.inc(self._total)
        for index, count in enumerate(self._counts):
            if count:
                self._buckets[index].inc(count)
                self._counts[index] = 0
        self._total = 0.0
        self._observed = 0
