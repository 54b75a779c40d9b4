"""The shared HTTP client helpers: capped reads over real sockets, Retry-After, failure kinds,
and ARM's rate-limit headers reaching metrics through the client's observer."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey

from gateway.azure.arm import ArmClient
from gateway.azure.resource_id import parse_resource_id
from gateway.core.clock import FixedClock
from gateway.core.errors import Overloaded
from gateway.core.httputil import (
    Failure,
    ResponseTooLarge,
    classify,
    describe,
    parse_retry_after,
    read_capped,
)
from gateway.core.metrics import Metrics
from tests.unit.arm_fake import NOW, SUB, FakeArm, start_fake_arm, vm_model

LIMIT = 1000


class Server:
    """Loopback server answering ``/fixed/<n>`` (Content-Length) and ``/chunked/<n>``."""

    def __init__(self) -> None:
        self.base = ""

    async def fixed(self, request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.match_info["n"]))

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        left = int(request.match_info["n"])
        while left:
            part = min(left, 300)
            await resp.write(b"y" * part)
            left -= part
        await resp.write_eof()
        return resp


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_get("/fixed/{n}", srv.fixed)
    app.router.add_get("/chunked/{n}", srv.chunked)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    srv.base = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("path", "size", "announced"),
    [
        ("/fixed/1000", 1000, None),
        ("/chunked/1000", 1000, None),
        ("/fixed/1001", None, 1001),
        ("/chunked/1001", None, None),
        ("/fixed/0", 0, None),
    ],
    ids=[
        "a body of exactly the cap is read",
        "a chunked body of exactly the cap is read",
        "a Content-Length over the cap is refused before reading",
        "a chunked body over the cap is cut off",
        "an empty body is read",
    ],
)
async def test_read_capped(
    server: Server, path: str, size: int | None, announced: int | None
) -> None:
    async with aiohttp.ClientSession() as session, session.get(server.base + path) as resp:
        if size is not None:
            assert len(await read_capped(resp, LIMIT)) == size
            return
        with pytest.raises(ResponseTooLarge) as err:
            await read_capped(resp, LIMIT)
    assert (err.value.limit, err.value.size) == (LIMIT, announced)
    assert classify(err.value) is Failure.TOO_LARGE
    # A client that treats every transport failure alike needs no extra clause for it.
    assert isinstance(err.value, aiohttp.ClientError)


NOW_DT = datetime(2026, 11, 24, 9, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "cap", "seconds"),
    [
        ("5", 3600.0, 5.0),
        (" 7 ", 3600.0, 7.0),
        ("1.5", 3600.0, 1.5),
        ("0", 3600.0, 0.0),
        ("-1", 3600.0, None),
        ("nan", 3600.0, None),
        ("soon", 3600.0, None),
        ("", 3600.0, None),
        (None, 3600.0, None),
        ("99999999", 3600.0, 3600.0),
        ("600", 300.0, 300.0),
        ("Tue, 24 Nov 2026 09:00:30 GMT", 3600.0, 30.0),
        ("Tue, 24 Nov 2026 08:59:00 GMT", 3600.0, 0.0),
        ("Tue, 24 Nov 2026 09:00:30 -0000", 3600.0, None),
    ],
    ids=[
        "delta seconds",
        "surrounding spaces are ignored",
        "a decimal is accepted",
        "zero means now",
        "a negative value is ignored",
        "NaN is ignored",
        "garbage is ignored",
        "an empty value is ignored",
        "absent",
        "an absurd value is capped at an hour",
        "the caller's cap applies",
        "an HTTP-date is converted with the injected clock",
        "a date in the past means now",
        "a date without a known zone is ignored",
    ],
)
def test_parse_retry_after(value: str | None, cap: float, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW_DT, cap=cap) == seconds


def test_an_http_date_needs_a_clock() -> None:
    assert parse_retry_after("Tue, 24 Nov 2026 09:00:30 GMT") is None


_KEY = ConnectionKey("gw.example", 443, True, True, None, None, None, "gw.example")


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (
            aiohttp.ClientConnectorCertificateError(_KEY, ssl.SSLCertVerificationError("bad")),
            Failure.TLS,
        ),
        (aiohttp.ClientConnectorSSLError(_KEY, ssl.SSLError("handshake")), Failure.TLS),
        (
            aiohttp.ClientConnectorError(_KEY, ConnectionRefusedError(111, "refused")),
            Failure.CONNECT,
        ),
        (aiohttp.ServerDisconnectedError(), Failure.DISCONNECTED),
        (aiohttp.ClientOSError(104, "reset"), Failure.DISCONNECTED),
        (aiohttp.ServerTimeoutError("read"), Failure.TIMEOUT),
        (TimeoutError(), Failure.TIMEOUT),
        (ResponseTooLarge(10), Failure.TOO_LARGE),
        (aiohttp.ClientPayloadError("truncated"), Failure.OTHER),
        (aiohttp.InvalidURL("x"), Failure.OTHER),
    ],
    ids=[
        "an untrusted certificate is a TLS failure",
        "a failed handshake is a TLS failure",
        "a refused connection is a connect failure",
        "a server that hung up disconnected",
        "a reset connection disconnected",
        "a read timeout is a timeout",
        "the total deadline is a timeout",
        "an oversized answer is too large",
        "a truncated payload is some other failure",
        "a bad URL is some other failure",
    ],
)
def test_classify(exc: BaseException, failure: Failure) -> None:
    assert classify(exc) is failure
    assert describe(exc).startswith(type(exc).__name__)


async def test_classify_real_failures() -> None:
    async with aiohttp.ClientSession() as session:
        # Nothing listens on a port once its server is closed: bind and release one.
        sock_server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = sock_server.sockets[0].getsockname()[1]
        sock_server.close()
        await sock_server.wait_closed()
        with pytest.raises(aiohttp.ClientError) as err:
            await session.get(f"http://127.0.0.1:{port}/")
        assert classify(err.value) is Failure.CONNECT


# --- ARM reports its rate-limit headers to an injected observer (metrics is one) ---------------


@pytest.fixture
async def arm() -> AsyncIterator[FakeArm]:
    async for fake in start_fake_arm():
        yield fake


VM1 = parse_resource_id(
    f"/subscriptions/{SUB}/resourcegroups/group1/providers/Microsoft.Compute/virtualMachines/web-1"
)


async def test_arm_rate_limits_reach_metrics_through_the_observer(arm: FakeArm) -> None:
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    arm.vms["group1"] = [vm_model("group1", "web-1", 1)]
    async with aiohttp.ClientSession() as session:
        client = ArmClient(
            session, endpoint=arm.base, clock=FixedClock(NOW), timeout=0.5, observer=metrics
        )
        await client.get_vm(VM1, bearer="b")
        assert sample("join_gateway_arm_ratelimit_remaining", {"kind": "subscription_reads"}) == 249
        # The smallest count of x-ms-ratelimit-remaining-resource's policies.
        assert sample("join_gateway_arm_ratelimit_remaining", {"kind": "resource"}) == 239
        assert sample("join_gateway_arm_throttled_total") == 0

        arm.status, arm.status_headers = 429, {"Retry-After": "7"}
        with pytest.raises(Overloaded):
            await client.get_vm(VM1, bearer="b")
        assert sample("join_gateway_arm_throttled_total") == 1
        assert sample("join_gateway_arm_ratelimit_remaining", {"kind": "subscription_reads"}) == 248
