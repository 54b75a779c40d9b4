"""Typed keys for everything the app shares (aiohttp ``AppKey``; string keys are banned)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.core.audit import Auditor
from gateway.core.config import Config
from gateway.core.metrics import Metrics
from gateway.http.admission import AdmissionController
from gateway.http.proxy import TrustedProxies
from gateway.http.ratelimit import ClientRateLimiter
from gateway.join.pipeline import JoinDeps

__all__ = [
    "ADMISSION",
    "AUDITOR",
    "CONFIG",
    "DEPS",
    "METRICS",
    "RATE_LIMITER",
    "STATE",
    "TRUSTED_PROXIES",
    "RuntimeState",
]


@dataclass
class RuntimeState:
    """Process state the lifecycle flips: readiness and draining (not per-request data)."""

    draining: bool = False
    checks: dict[str, bool] = field(default_factory=dict)


CONFIG = web.AppKey("config", Config)
DEPS = web.AppKey("deps", JoinDeps)
METRICS = web.AppKey("metrics", Metrics)
AUDITOR = web.AppKey("auditor", Auditor)
STATE = web.AppKey("state", RuntimeState)
TRUSTED_PROXIES = web.AppKey("trusted_proxies", TrustedProxies)
ADMISSION = web.AppKey("admission", AdmissionController)
RATE_LIMITER = web.AppKey("rate_limiter", ClientRateLimiter)
