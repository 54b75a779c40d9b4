"""The gateway client: error bodies → JoinError with the right code and retry verdict."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web

from gateway.agent.backoff import Backoff, parse_retry_after
from gateway.agent.client import GatewayClient, HostParams, build_join_body
from gateway.agent.errors import JoinError
from gateway.core.clock import FixedClock
from tests.unit.test_agent_fakes import serve

NOW = datetime(2026, 11, 24, 9, 0, 0, tzinfo=UTC)


def _app(status: int, body: str, headers: dict[str, str], content_type: str) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, headers=headers, content_type=content_type)

    app = web.Application()
    app.router.add_post("/v1/join/azure", handler)
    app.router.add_post("/v1/join/azure/challenge", handler)
    return app


def err(code: str) -> str:
    return json.dumps({"error": {"code": code, "message": "m"}})


@pytest.mark.parametrize(
    ("status", "body", "headers", "code", "retryable", "retry_after"),
    [
        (503, err("overloaded"), {"Retry-After": "7"}, "overloaded", True, 7.0),
        (429, err("rate_limited"), {"Retry-After": "2"}, "rate_limited", True, 2.0),
        (502, err("upstream_failed"), {}, "upstream_failed", True, None),
        (504, "<html>gateway timeout</html>", {}, "http_504", True, None),
        (403, err("challenge_reused"), {}, "challenge_reused", True, None),
        (403, err("challenge_expired"), {}, "challenge_expired", True, None),
        (403, err("attested_expired"), {}, "attested_expired", True, None),
        (403, err("access_token_expired"), {}, "access_token_expired", True, None),
        (403, err("access_token_key_unknown"), {}, "access_token_key_unknown", True, None),
        (403, err("not_allowed"), {}, "not_allowed", False, None),
        (403, err("nonce_mismatch"), {}, "nonce_mismatch", False, None),
        (404, err("unknown_token"), {}, "unknown_token", False, None),
        (400, err("invalid_request"), {}, "invalid_request", False, None),
        (500, err("internal_error"), {}, "internal_error", True, None),
        (500, err("no_such_code"), {}, "no_such_code", False, None),
        (500, "<html>oops</html>", {}, "http_500", False, None),
        (
            503,
            err("overloaded"),
            {"Retry-After": "Tue, 24 Nov 2026 09:00:30 GMT"},
            "overloaded",
            True,
            30.0,
        ),
        (200, "not json", {}, "bad_response", False, None),
        (200, '{"challenge": "has spaces in it"}', {}, "bad_response", False, None),
    ],
    ids=[
        "503 overloaded is retryable and carries Retry-After",
        "429 rate_limited is retryable",
        "502 upstream_failed is retryable",
        "a proxy's HTML 504 becomes http_504 and is retryable",
        "a reused challenge needs a fresh attempt",
        "an expired challenge needs a fresh attempt",
        "an expired document needs a fresh attempt",
        "an expired token needs a fresh attempt",
        "a token key the gateway has not seen yet needs a fresh attempt",
        "403 not_allowed is final",
        "403 nonce_mismatch is final",
        "404 unknown_token is final",
        "400 invalid_request is final",
        "500 internal_error is retried, as the gateway's codes table says",
        "an unknown code on a 500 is final",
        "a bare 500 without an error body is final",
        "Retry-After as an HTTP-date is converted with the injected clock",
        "a 200 that is not JSON is a bad response",
        "a challenge outside the base64url alphabet is a bad response",
    ],
)
async def test_challenge_errors_map_to_join_error(
    status: int,
    body: str,
    headers: dict[str, str],
    code: str,
    retryable: bool,
    retry_after: float | None,
) -> None:
    ctype = "application/json" if body.startswith("{") else "text/html"
    async with serve(_app(status, body, headers, ctype)) as url, aiohttp.ClientSession() as s:
        gw = GatewayClient(s, base_url=url, clock=FixedClock(NOW))
        with pytest.raises(JoinError) as e:
            await gw.challenge()
    assert (e.value.status, e.value.code) == (status, code)
    assert e.value.retryable is retryable
    assert e.value.retry_after == retry_after


async def test_a_refused_connection_is_retryable() -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(JoinError) as e:
            await GatewayClient(s, base_url="http://127.0.0.1:1").challenge()
    assert (e.value.status, e.value.code, e.value.retryable) == (0, "connection_failed", True)


async def test_a_silent_gateway_times_out_retryably() -> None:
    import asyncio

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/join/azure/challenge", slow)
    async with serve(app) as url, aiohttp.ClientSession() as s:
        with pytest.raises(JoinError) as e:
            await GatewayClient(s, base_url=url, timeout=0.2).challenge()
    assert (e.value.code, e.value.retryable) == ("timeout", True)


def test_the_join_body_is_the_design_shape() -> None:
    host = HostParams(
        "web-1",
        "Node",
        "ssh-ed25519 AAAA",
        "-----BEGIN PUBLIC KEY-----",
        ("10.1.2.3",),
        ("web-1.internal",),
    )
    body = build_join_body(
        token_name="azure-token",
        challenge="c",
        access_token="t",
        attested_data={"encoding": "pkcs7", "signature": "s"},
        host=host,
        intermediates=("AAA=",),
    )
    assert body == {
        "token_name": "azure-token",
        "challenge": "c",
        "attested_data": {"encoding": "pkcs7", "signature": "s"},
        "intermediates": ["AAA="],
        "access_token": "t",
        "host": {
            "node_name": "web-1",
            "role": "Node",
            "public_ssh_key": "ssh-ed25519 AAAA",
            "public_tls_key": "-----BEGIN PUBLIC KEY-----",
            "additional_principals": ["10.1.2.3"],
            "dns_names": ["web-1.internal"],
        },
    }
    without = build_join_body(
        token_name="t", challenge="c", access_token="t", attested_data={}, host=host
    )
    assert "intermediates" not in without


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5", 5.0),
        ("0", 0.0),
        ("-1", None),
        ("soon", None),
        (None, None),
        ("nan", None),
        ("99999999", 3600.0),
        ("Tue, 24 Nov 2026 08:59:00 GMT", 0.0),
    ],
    ids=[
        "delta seconds",
        "zero",
        "a negative value is ignored",
        "garbage is ignored",
        "absent",
        "NaN is ignored",
        "an absurd value is capped at an hour",
        "a date in the past means now",
    ],
)
def test_retry_after_parsing(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize(
    ("attempt", "retry_after", "low", "high"),
    [(1, None, 0.0, 0.5), (3, None, 0.0, 2.0), (20, None, 0.0, 30.0), (1, 7.0, 7.0, 7.0)],
    ids=[
        "the first delay is under the base",
        "the ceiling doubles per attempt",
        "the ceiling is capped",
        "Retry-After is a floor",
    ],
)
def test_backoff_is_full_jitter_under_an_exponential_ceiling(
    attempt: int, retry_after: float | None, low: float, high: float
) -> None:
    b = Backoff(base=0.5, cap=30.0, rng=random.Random(7))
    delays = [b.delay(attempt, retry_after=retry_after) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    if retry_after is None:
        assert max(delays) - min(delays) > (high - low) / 2, "jitter must spread the delays"
