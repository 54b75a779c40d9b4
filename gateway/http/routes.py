"""Routes of wire protocol v1 and the operations endpoints (DESIGN §2)."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from gateway.core.errors import BodyTimeout, Code, GatewayError, Overloaded, PayloadTooLarge
from gateway.http.keys import (
    ADMISSION,
    AUDITOR,
    CONFIG,
    DEPS,
    METRICS,
    RATE_LIMITER,
    STATE,
    TRUSTED_PROXIES,
)
from gateway.http.middleware import REQUEST_ID
from gateway.http.proxy import connection_peer
from gateway.http.schema import decode_challenge_request, decode_join_request
from gateway.join.pipeline import JoinTrace, admit_join
from gateway.protocol import CHALLENGE_PATH, JOIN_PATH, ChallengeResponse

__all__ = ["client_address", "read_body", "routes"]

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def client_address(request: web.Request) -> str:
    """The client: PROXY-protocol source or TCP peer, then Forwarded/X-Forwarded-For if
    that peer is a trusted proxy (DESIGN §6). Raises BadRequest(invalid_forwarded_header)."""
    trusted = request.app[TRUSTED_PROXIES]
    return connection_peer(request, trusted).client_address(request.headers, trusted)


def limited(request: web.Request, address: str) -> None:
    """The per-client rate limit (429 + Retry-After); counted as shed when it bites."""
    try:
        request.app[RATE_LIMITER].check(address)
    except Overloaded:
        request.app[METRICS].shed.labels(reason="rate_limit").inc()
        raise


async def read_body(request: web.Request) -> bytes:
    cap = request.app[CONFIG].limits.max_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise PayloadTooLarge(f"Content-Length {request.content_length} > {cap}")
    ctype = request.headers.get("Content-Type", "application/json")
    if request.can_read_body and not ctype.lower().startswith("application/json"):
        raise GatewayError(Code.UNSUPPORTED_MEDIA_TYPE)
    limit = request.app[CONFIG].limits.body_read_timeout_seconds
    try:
        if request.content.is_eof():
            # The whole body came with the headers (a join's few KB usually does):
            # nothing is awaited, so there is no deadline to arm and disarm.
            return await request.read()
        async with asyncio.timeout(limit):
            return await request.read()  # client_max_size caps chunked bodies too
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"body > {cap}") from exc
    except TimeoutError as exc:
        raise BodyTimeout(f"body not received within {limit}s") from exc


@routes.post(CHALLENGE_PATH)
async def challenge(request: web.Request) -> web.Response:
    limited(request, client_address(request))
    decode_challenge_request(await read_body(request))
    issued = request.app[DEPS].challenges.issue()
    request.app[METRICS].challenge_issued()
    return web.json_response(ChallengeResponse(issued.value, issued.expires_at_rfc3339()).to_json())


@routes.post(JOIN_PATH)
async def join(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    start = time.perf_counter()
    trace = JoinTrace()
    # The connection's peer is audited as-is if the forwarding headers are bad.
    address = connection_peer(request, app[TRUSTED_PROXIES]).raw
    outcome, code, detail, host_id = "error", Code.INTERNAL_ERROR.value, None, None
    metrics.join_started()
    try:
        address = client_address(request)
        limited(request, address)
        req = decode_join_request(
            await read_body(request),
            client_address=address,
            max_bytes=app[CONFIG].limits.max_body_bytes,
        )
        trace.facts.update(token_name=req.token_name, node_name=req.host.node_name)
        admission = app[ADMISSION]
        try:
            # Bounded joins in flight and a short queue; beyond them 503 at once, so the
            # joins admitted stay fast instead of all of them timing out (DESIGN §5).
            async with admission.slot():
                metrics.set_queue_depth(admission.queued)
                result = await admit_join(req, app[DEPS], trace)
        except Overloaded as err:
            if err.code is Code.OVERLOADED:
                metrics.shed.labels(reason="admission").inc()
            raise
        finally:
            metrics.set_queue_depth(admission.queued)
        outcome, code, host_id = "joined", "", result.result.host_id
        return web.json_response(result.to_json())
    except GatewayError as err:
        outcome = "rejected" if err.status < 500 else "error"
        code, detail = err.code.value, err.detail
        raise
    finally:
        metrics.join_ended()
        metrics.set_circuit_state(app[DEPS].auth.breaker.state.value)
        elapsed = time.perf_counter() - start
        metrics.join_decided(outcome, code, elapsed, trace.steps)
        app[AUDITOR].record(
            request_id=REQUEST_ID.get(),
            client_address=address,
            outcome=outcome,
            code=code or None,
            detail=detail,
            facts=trace.facts,
            steps=trace.steps,
            duration=elapsed,
            host_id=host_id,
            labels=trace.labels,
        )


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    deps = request.app[DEPS]
    checks = dict(state.checks)
    checks["not_draining"] = not state.draining
    checks["challenge_keys"] = deps.challenges.key_count > 0
    checks["replay_store"] = await deps.replay.ping()
    checks["upstream"] = await deps.auth.ready()
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "unready", "checks": checks},
        status=200 if ready else 503,
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})
