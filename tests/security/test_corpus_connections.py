"""Hostile connections: a slowloris on a kept-alive connection, more connections than a
worker takes, idle connections held open, a forged client address — each bounded or
ignored, and the gateway keeps serving.

This module's gateway takes at most ``CAP`` connections, times headers at 2 s (the
harness's short deadline) and keeps idle connections ``KEEPALIVE`` s: far longer than
the drip below, so only the per-request header deadline can end it. It trusts loopback
as a proxy speaking ``X-Forwarded-For`` (the default ``proxy.client_address_header``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway.core.config import Config, ProxyConfig
from gateway.http.framing import JsonErrorRequestHandler, Phase
from tests.security.harness import Harness, client_ssl, open_harness

pytestmark = pytest.mark.asyncio(loop_scope="module")

CAP = 8
KEEPALIVE = 30.0
SLOW_DRIP_SECONDS = 6.0  # three header deadlines; far below KEEPALIVE

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _limits(config: Config) -> Config:
    return dataclasses.replace(
        config,
        limits=dataclasses.replace(
            config.limits, max_connections=CAP, keepalive_timeout_seconds=KEEPALIVE
        ),
        proxy=ProxyConfig(trusted_cidrs=("127.0.0.1/32",)),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def harness(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path_factory.mktemp("connections"), adjust=_limits) as h:
        yield h


async def _connect(h: Harness) -> Stream:
    port = h.stack.gateway.listeners[0].port
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ssl(h.stack.gateway_ca_file), server_hostname="127.0.0.1"
    )


async def _get_healthz(stream: Stream) -> int:
    """One keep-alive GET /healthz on ``stream``; returns the status, leaves it open."""
    reader, writer = stream
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (ln.partition(":") for ln in lines) if k.lower() == "content-length"
    )
    await asyncio.wait_for(reader.readexactly(length), 10)
    return int(lines[0].split()[1])


def _close(stream: Stream) -> None:
    stream[1].close()


def _handlers(h: Harness) -> list[JsonErrorRequestHandler]:
    runner_server = h.stack.gateway._runner.server  # type: ignore[union-attr]
    assert runner_server is not None
    return [c for c in runner_server.connections if isinstance(c, JsonErrorRequestHandler)]


async def test_a_kept_alive_connections_second_request_headers_have_a_deadline(
    harness: Harness,
) -> None:
    """Keep-alive slowloris: one normal request, then the next request's headers dripped
    one byte every 0.25 s. Its headers are on the clock from their first byte, so the
    connection is closed at the deadline and the request is never answered 200 — the idle
    keep-alive time (30 s here) would have let it run on."""
    stream = await _connect(harness)
    reader, writer = stream
    try:
        assert await _get_healthz(stream) == 200
        writer.write(b"POST /v1/join/azure/challenge HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        start = time.monotonic()
        received = b""
        closed = False
        while not closed and time.monotonic() - start < SLOW_DRIP_SECONDS:
            try:
                writer.write(b"a")
                await writer.drain()
                chunk = await asyncio.wait_for(reader.read(4096), 0.25)
                received += chunk
                closed = chunk == b""
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                closed = True
    finally:
        _close(stream)
    assert closed, f"a second request's headers dripped over {SLOW_DRIP_SECONDS} s were waited for"
    assert b" 200 " not in received
    await harness.assert_alive()


async def test_idle_kept_alive_connections_use_the_configured_keepalive(
    harness: Harness,
) -> None:
    """The bound on idle time is ours (``limits.keepalive_timeout_seconds``), not
    aiohttp's near-hour default."""
    stream = await _connect(harness)
    try:
        assert await _get_healthz(stream) == 200
        handlers = _handlers(harness)
        assert handlers and {h.keepalive_timeout for h in handlers} == {KEEPALIVE}
        assert any(h.phase is Phase.IDLE for h in handlers)
    finally:
        _close(stream)


async def test_connections_over_the_cap_are_refused_before_tls_and_counted(
    harness: Harness,
) -> None:
    gateway = harness.stack.gateway
    connections = gateway.connections
    assert connections is not None
    refused_before = connections.refused
    held: list[Stream] = []
    try:
        # Fill the worker up to its cap with kept-alive connections (each served once).
        while len(connections) < CAP:
            stream = await _connect(harness)
            held.append(stream)
            assert await _get_healthz(stream) == 200
        assert len(connections) == CAP
        # One more: reset at accept, before any TLS byte is answered.
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            extra = await _connect(harness)
            try:
                await _get_healthz(extra)
            finally:
                _close(extra)
        assert connections.refused == refused_before + 1
        metrics = gateway._metrics.exposition().decode()
        assert 'join_gateway_connections_refused_total{reason="over_cap"} ' in metrics
        # The connections already open are still served.
        assert await _get_healthz(held[0]) == 200
    finally:
        for stream in held:
            _close(stream)
    # Once they are gone, new connections are served again.
    for _ in range(100):
        if len(connections) < CAP:
            break
        await asyncio.sleep(0.05)
    await harness.assert_alive()


@pytest.mark.parametrize(
    ("headers", "recorded"),
    [
        ({"Forwarded": "for=203.0.113.66"}, "127.0.0.1"),
        ({"Forwarded": "for=203.0.113.66", "X-Forwarded-For": "198.51.100.7"}, "198.51.100.7"),
    ],
    ids=[
        "a trusted peer's Forwarded is ignored when X-Forwarded-For is the configured header",
        "only the configured X-Forwarded-For names the client, never Forwarded beside it",
    ],
)
async def test_only_the_configured_client_address_header_is_believed(
    harness: Harness, headers: dict[str, str], recorded: str
) -> None:
    before = len(await harness.stack.auth.records())
    body = json.dumps(harness.body(await harness.challenge())).encode()
    assert await harness.post("/v1/join/azure", body, headers=headers) == (200, None)
    new = (await harness.stack.auth.records())[before:]
    assert [r.registration.client_address for r in new] == [recorded]
    await harness.assert_alive()
