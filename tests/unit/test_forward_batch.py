"""AuthClient's coalescing: registrations that arrive together share one batch request.

The upstream is a scripted aiohttp server behind real mTLS on 127.0.0.1 that counts the
requests on each path and the registrations it answers, so "one request" and "retried" are
observed on the server side. Registrations started together in one ``gather`` reach the
client in order: the first ``PIPELINE_DEPTH`` leave at once, alone; the rest queue and
leave together when a request slot frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from gateway.core.clock import FixedClock
from gateway.core.errors import (
    BadRequest,
    Code,
    GatewayError,
    JoinRejected,
    Overloaded,
    UpstreamFailed,
)
from gateway.core.httputil import MAX_RETRY_AFTER
from gateway.core.tlsutil import client_ssl_context
from gateway.join.forward import PIPELINE_DEPTH, AuthClient, BreakerState, CircuitBreaker
from gateway.protocol import REGISTER_BATCH_PATH, REGISTER_PATH, RegisterResult, Registration
from tests.support.mtls_site import serve_mtls
from tests.unit.test_forward import OK_BODY, REG, T0, Pki, pki

__all__ = ["pki"]  # the fixture, imported for pytest

BATCH = REGISTER_BATCH_PATH
SINGLE = REGISTER_PATH


def reg(key: str) -> Registration:
    return dataclasses.replace(REG, idempotency_key=key)


def fillers(n: int = PIPELINE_DEPTH) -> list[Registration]:
    """Registrations that take the request slots, so that the next ones queue."""
    return [reg(f"filler-{i}") for i in range(n)]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Item = dict[str, Any]  # a batch item answer: {"status": 200} or {"status", "code", ...}


def _error_item(status: int, code: str, retry_after: int | None = None) -> Item:
    return {"status": status, "code": code, "message": "m", "retry_after": retry_after}


@dataclass
class Upstream:
    """Answers each registration with its key's scripted item (default: 200), alone or
    in a batch; ``batch_script`` answers whole batch requests first."""

    with_batch: bool = True
    items: dict[str, list[Item]] = field(default_factory=dict)
    batch_script: list[tuple[Any, ...]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    requests: Counter[str] = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)  # every registration answered
    batch_sizes: list[int] = field(default_factory=list)
    held: int = 0
    url: str = ""

    def _answer(self, key: str) -> Item:
        self.keys.append(key)
        script = self.items.get(key)
        return script.pop(0) if script else {"status": 200}

    @web.middleware
    async def count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Every request, also those no route answers (404).
        self.requests[request.path] += 1
        return await handler(request)

    async def hold(self) -> None:
        if self.gate is not None:
            self.held += 1
            await self.gate.wait()

    async def single(self, request: web.Request) -> web.StreamResponse:
        await self.hold()
        item = self._answer((await request.json())["idempotency_key"])
        if item["status"] == 200:
            return web.json_response(OK_BODY)
        headers = {} if item["retry_after"] is None else {"Retry-After": str(item["retry_after"])}
        body = {"error": {"code": item["code"], "message": item["message"]}}
        return web.json_response(body, status=item["status"], headers=headers)

    async def batch(self, request: web.Request) -> web.StreamResponse:
        regs = (await request.json())["registrations"]
        self.batch_sizes.append(len(regs))
        if self.batch_script:
            action = self.batch_script.pop(0)
            if action[0] == "reset":
                assert request.transport is not None
                request.transport.abort()
                await asyncio.sleep(0.2)
                return web.Response(status=500)
            _, status, body, headers = action
            return web.Response(status=status, body=body, headers=headers)
        results = []
        for r in regs:
            item = self._answer(r["idempotency_key"])
            results.append({**OK_BODY, "replay": False, **item} if item["status"] == 200 else item)
        return web.json_response({"results": results})


@contextlib.asynccontextmanager
async def run_upstream(pki: Pki, up: Upstream) -> AsyncIterator[Upstream]:
    app = web.Application(middlewares=[up.count])
    app.router.add_post(SINGLE, up.single)
    if up.with_batch:
        app.router.add_post(BATCH, up.batch)
    async with serve_mtls(
        app, cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca_file
    ) as up.url:
        yield up


def client(
    pki: Pki, up: Upstream, *, breaker: CircuitBreaker | None = None, batch: bool = True
) -> AuthClient:
    ctx = client_ssl_context(pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
    return AuthClient(
        url=up.url,
        ssl_context=ctx,
        clock=FixedClock(T0),
        retries=2,
        breaker=breaker,
        backoff=0.001,
        rng=random.Random(7),
        batch=batch,
    )


async def register_all(c: AuthClient, regs: list[Registration]) -> list[Any]:
    return await asyncio.gather(*(c.register(r) for r in regs), return_exceptions=True)


OK = RegisterResult.from_json(OK_BODY)


# --- coalescing --------------------------------------------------------------------------


async def test_a_lone_registration_leaves_at_once_on_the_plain_endpoint(pki: Pki) -> None:
    async with run_upstream(pki, Upstream()) as up, client(pki, up) as c:
        for i in range(3):
            assert await c.register(reg(f"lone-{i}")) == OK
    assert up.requests == Counter({SINGLE: 3})


async def test_registrations_that_arrive_together_share_batch_requests(pki: Pki) -> None:
    regs = fillers() + [reg(f"queued-{i}") for i in range(100)]
    async with run_upstream(pki, Upstream()) as up, client(pki, up) as c:
        results = await register_all(c, regs)
    assert results == [OK] * len(regs)
    assert sorted(up.keys) == sorted(r.idempotency_key for r in regs)
    assert up.requests[SINGLE] == PIPELINE_DEPTH
    # 100 queued registrations in at most 64 per request: two batch requests.
    assert up.requests[BATCH] == 2
    assert sorted(up.batch_sizes) == [36, 64]


async def test_batching_off_sends_one_request_per_registration(pki: Pki) -> None:
    regs = fillers() + [reg(f"queued-{i}") for i in range(20)]
    async with run_upstream(pki, Upstream()) as up, client(pki, up, batch=False) as c:
        assert await register_all(c, regs) == [OK] * len(regs)
    assert up.requests == Counter({SINGLE: len(regs)})


async def test_one_key_twice_never_shares_a_batch(pki: Pki) -> None:
    regs = [*fillers(), reg("twice"), reg("other"), reg("twice")]
    async with run_upstream(pki, Upstream()) as up, client(pki, up) as c:
        assert await register_all(c, regs) == [OK] * len(regs)
    assert up.keys.count("twice") == 2
    assert up.requests[BATCH] + up.requests[SINGLE] == PIPELINE_DEPTH + 2


# --- the same verdicts as alone, per member ---------------------------------------------


@dataclass(frozen=True)
class ItemCase:
    item: Item
    error: type[GatewayError]
    code: Code
    answered: int  # times the member's registration reached the upstream
    retry_after: float | None = None


ITEM_CASES = [
    (
        "a locked host is rejected host_locked",
        ItemCase(_error_item(403, "host_locked"), JoinRejected, Code.HOST_LOCKED, 1),
    ),
    (
        "csr_required is the node's bad request",
        ItemCase(_error_item(400, "csr_required"), BadRequest, Code.CSR_REQUIRED, 1),
    ),
    (
        "a 409 conflict is not retried",
        ItemCase(_error_item(409, "idempotency_conflict"), UpstreamFailed, Code.UPSTREAM_FAILED, 1),
    ),
    (
        "a 503 with retry_after is passed on, not retried",
        ItemCase(
            _error_item(503, "signing_unavailable", 7), Overloaded, Code.UPSTREAM_UNAVAILABLE, 1, 7
        ),
    ),
    (
        "an item's retry_after is capped as a Retry-After header is",
        ItemCase(
            _error_item(503, "signing_unavailable", 10**9),
            Overloaded,
            Code.UPSTREAM_UNAVAILABLE,
            1,
            MAX_RETRY_AFTER,
        ),
    ),
    (
        "a signing refusal is not retried",
        ItemCase(_error_item(502, "signing_refused"), UpstreamFailed, Code.UPSTREAM_FAILED, 1),
    ),
    (
        "a 503 without retry_after is retried until the retries are spent",
        ItemCase(
            _error_item(503, "registry_unavailable"), Overloaded, Code.UPSTREAM_UNAVAILABLE, 3, 1
        ),
    ),
    (
        "a malformed item fails its member",
        ItemCase({"status": "200"}, UpstreamFailed, Code.UPSTREAM_FAILED, 1),
    ),
]


@pytest.mark.parametrize("case", [c for _, c in ITEM_CASES], ids=[i for i, _ in ITEM_CASES])
async def test_a_refused_member_gets_its_error_and_its_batch_mates_succeed(
    pki: Pki, case: ItemCase
) -> None:
    mates = [reg("mate-1"), reg("mate-2")]
    subject = reg("subject")
    up = Upstream(items={"subject": [case.item] * 3})
    async with run_upstream(pki, up), client(pki, up) as c:
        results = await register_all(c, [*fillers(), mates[0], subject, mates[1]])
    assert up.requests[BATCH] >= 1
    assert up.batch_sizes[0] == 3
    *ok, failed, last = results
    assert [*ok, last] == [OK] * (PIPELINE_DEPTH + 2)
    assert isinstance(failed, case.error)
    assert failed.code == case.code
    if case.retry_after is not None:
        assert failed.retry_after == case.retry_after
    assert up.keys.count("subject") == case.answered
    assert up.keys.count("mate-1") == up.keys.count("mate-2") == 1


BATCH_FAILURES = [
    ("a reset batch request", ("reset",)),
    ("a 502 answer to the batch", ("status", 502, b"", {})),
    ("a 503 answer to the batch", ("status", 503, b"", {})),
    ("a 504 answer to the batch", ("status", 504, b"", {})),
]


@pytest.mark.parametrize(
    "action", [a for _, a in BATCH_FAILURES], ids=[i for i, _ in BATCH_FAILURES]
)
async def test_a_failed_batch_request_is_retried_per_member(
    pki: Pki, action: tuple[Any, ...]
) -> None:
    queued = [reg(f"queued-{i}") for i in range(10)]
    up = Upstream(batch_script=[action])
    async with run_upstream(pki, up), client(pki, up) as c:
        results = await register_all(c, fillers() + queued)
        assert c.breaker.consecutive_failures == 0
    assert results == [OK] * (PIPELINE_DEPTH + 10)
    # The failed request answered nobody; each member was answered once afterwards.
    assert Counter(up.keys) == Counter(r.idempotency_key for r in fillers() + queued)
    assert up.requests[BATCH] >= 2


async def test_a_batch_answered_400_fails_its_members_without_retry(pki: Pki) -> None:
    body = json.dumps({"error": {"code": "invalid_request", "message": "m"}}).encode()
    up = Upstream(batch_script=[("status", 400, body, {})])
    async with run_upstream(pki, up), client(pki, up) as c:
        results = await register_all(c, [*fillers(), reg("a"), reg("b")])
    assert results[:PIPELINE_DEPTH] == [OK] * PIPELINE_DEPTH
    assert all(isinstance(r, UpstreamFailed) for r in results[PIPELINE_DEPTH:])
    assert "invalid_request" in (results[-1].detail or "")
    assert up.requests[BATCH] == 1


# --- an auth service without the batch endpoint ------------------------------------------


async def test_without_the_batch_endpoint_the_client_falls_back_for_good(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    up = Upstream(with_batch=False)
    async with run_upstream(pki, up), client(pki, up) as c:
        first = fillers() + [reg(f"first-{i}") for i in range(30)]
        assert await register_all(c, first) == [OK] * len(first)
        assert c.batching is False
        second = fillers() + [reg(f"second-{i}") for i in range(30)]
        assert await register_all(c, second) == [OK] * len(second)
    # The batch path was tried once, not once per join or per storm.
    assert up.requests[BATCH] == 1
    assert up.requests[SINGLE] == len(first) + len(second)
    assert Counter(up.keys) == Counter(r.idempotency_key for r in first + second)
    assert sum("one per request" in r.getMessage() for r in caplog.records) == 1


# --- cancellation ------------------------------------------------------------------------


async def _until(predicate: Any) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


async def test_a_cancelled_waiting_join_leaves_its_batch_mates_alone(pki: Pki) -> None:
    up = Upstream(gate=asyncio.Event())
    async with run_upstream(pki, up), client(pki, up) as c:
        held = [asyncio.create_task(c.register(r)) for r in fillers()]
        await _until(lambda: up.held == PIPELINE_DEPTH)
        waiting = [asyncio.create_task(c.register(reg(k))) for k in ("w-1", "gone", "w-2")]
        await asyncio.sleep(0)
        waiting[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting[1]
        up.gate.set()
        results = await asyncio.gather(*held, waiting[0], waiting[2])
        assert c.breaker.consecutive_failures == 0
    assert results == [OK] * (PIPELINE_DEPTH + 2)
    assert "gone" not in up.keys
    assert up.batch_sizes == [2]


async def test_a_cancelled_waiting_probe_releases_the_half_open_circuit(pki: Pki) -> None:
    clock = FixedClock(T0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=10.0, clock=clock)
    up = Upstream(gate=asyncio.Event())
    async with run_upstream(pki, up), client(pki, up, breaker=breaker) as c:
        held = [asyncio.create_task(c.register(r)) for r in fillers()]
        await _until(lambda: up.held == PIPELINE_DEPTH)
        breaker.record_failure()  # opened meanwhile (another client's failure, say)
        clock.advance(10)
        assert breaker.state is BreakerState.HALF_OPEN
        probe = asyncio.create_task(c.register(reg("probe")))
        await asyncio.sleep(0)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        # The probe's place is free again: the next join is let through, not refused.
        second = asyncio.create_task(c.register(reg("second-probe")))
        await asyncio.sleep(0)
        up.gate.set()
        assert await second == OK
        assert await asyncio.gather(*held) == [OK] * PIPELINE_DEPTH
    assert "probe" not in up.keys
    assert breaker.state is BreakerState.CLOSED
