"""The app factory: ``make_app(config, deps)``; there is no module-level app."""

from __future__ import annotations

from aiohttp import web

from gateway.core.audit import Auditor
from gateway.core.config import Config
from gateway.core.metrics import Metrics
from gateway.http.admission import AdmissionController
from gateway.http.keys import (
    ADMISSION,
    AUDITOR,
    CONFIG,
    DEPS,
    METRICS,
    RATE_LIMITER,
    STATE,
    TRUSTED_PROXIES,
    RuntimeState,
)
from gateway.http.middleware import error_middleware
from gateway.http.proxy import TrustedProxies
from gateway.http.ratelimit import ClientRateLimiter
from gateway.http.routes import routes
from gateway.join.pipeline import JoinDeps

__all__ = ["make_app"]


def make_app(
    config: Config,
    deps: JoinDeps,
    *,
    metrics: Metrics | None = None,
    state: RuntimeState | None = None,
    auditor: Auditor | None = None,
) -> web.Application:
    app = web.Application(
        # One layer: errors are rendered for everything below, including aiohttp's own
        # 404/405/413, and a request arriving during the drain is refused before any
        # work (``error_middleware`` does both).
        middlewares=[error_middleware],
        # The body cap applies to chunked bodies as well as to Content-Length.
        client_max_size=config.limits.max_body_bytes,
    )
    app[CONFIG] = config
    app[DEPS] = deps
    app[METRICS] = metrics or Metrics()
    app.cleanup_ctx.append(app[METRICS].flush_on_cleanup)  # batched histograms, at shutdown
    app[STATE] = state or RuntimeState()
    app[AUDITOR] = auditor or Auditor(clock=deps.clock)
    app[TRUSTED_PROXIES] = TrustedProxies(
        config.proxy.trusted_cidrs, header=config.proxy.client_address_header
    )
    limits = config.limits
    app[RATE_LIMITER] = ClientRateLimiter(
        rate=limits.per_client_rate, burst=limits.per_client_burst, clock=deps.clock
    )
    app[ADMISSION] = AdmissionController(
        max_in_flight=limits.max_in_flight,
        max_queue=limits.max_queue,
        queue_timeout=limits.queue_timeout_seconds,
        retry_after=limits.retry_after_seconds,
    )
    app.add_routes(routes)
    return app
