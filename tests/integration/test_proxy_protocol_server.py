"""GatewayServer with a PROXY-protocol listener: the proxied client reaches the audit log
and the forwarding headers are judged against the proxied source (DESIGN §6)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.core.config import ListenerConfig, ProxyConfig
from gateway.core.tlsutil import client_ssl_context
from gateway.dev.devstack import DevStack, dev_stack
from tests.support.tokens import azure_token_yaml

TOKENS = azure_token_yaml()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[DevStack]:
    async with dev_stack(
        tmp_path,
        tokens_yaml=TOKENS,
        config_overrides={
            "listeners": (ListenerConfig(address="127.0.0.1:0", proxy_protocol=True),),
            "proxy": ProxyConfig(trusted_cidrs=("127.0.0.1/32",)),
        },
    ) as st:
        yield st


async def post_join(st: DevStack, header: bytes, extra: str = "") -> tuple[int, str]:
    port = st.gateway.listeners[0].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(header)
        await writer.drain()
        ctx: ssl.SSLContext = client_ssl_context(ca_file=st.gateway_ca_file)
        await writer.start_tls(ctx, server_hostname="127.0.0.1")
        body = b"{}"
        writer.write(
            b"POST /v1/join/azure HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            + extra.encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    code: str = json.loads(payload)["error"]["code"]
    return status, code


CASES: list[tuple[str, bytes, str, str, str]] = [
    (
        "the PROXY source is the audited client",
        b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 443\r\n",
        "",
        "invalid_request",
        "198.51.100.7",
    ),
    (
        "X-Forwarded-For from an untrusted PROXY source is ignored",
        b"PROXY TCP4 198.51.100.7 127.0.0.1 4711 443\r\n",
        "X-Forwarded-For: 6.6.6.6\r\n",
        "invalid_request",
        "198.51.100.7",
    ),
    (
        "X-Forwarded-For from a trusted PROXY source names the client",
        b"PROXY TCP4 127.0.0.1 127.0.0.1 4711 443\r\n",
        "X-Forwarded-For: 203.0.113.5\r\n",
        "invalid_request",
        "203.0.113.5",
    ),
    (
        "a trusted source's malformed X-Forwarded-For is rejected and audited with the peer",
        b"PROXY TCP4 127.0.0.1 127.0.0.1 4711 443\r\n",
        "X-Forwarded-For: nonsense\r\n",
        "invalid_forwarded_header",
        "127.0.0.1",
    ),
]


@pytest.mark.parametrize(
    ("header", "extra", "code", "audited"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_proxied_client_is_audited(
    stack: DevStack,
    caplog: pytest.LogCaptureFixture,
    header: bytes,
    extra: str,
    code: str,
    audited: str,
) -> None:
    caplog.set_level("INFO", logger="gateway.audit")
    assert await post_join(stack, header, extra) == (400, code)
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert [r["client_address"] for r in records] == [audited]


async def test_connection_without_header_is_closed(stack: DevStack) -> None:
    port = stack.gateway.listeners[0].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x16\x03\x01\x00\x05hello")
    try:
        got = await asyncio.wait_for(reader.read(), 3)
    except ConnectionResetError:
        got = b""
    writer.close()
    assert got == b""


async def test_per_client_rate_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    import dataclasses as _dc

    import aiohttp as _aiohttp

    def limit(config):  # type: ignore[no-untyped-def]
        return _dc.replace(
            config, limits=_dc.replace(config.limits, per_client_rate=1.0, per_client_burst=2.0)
        )

    async with dev_stack(tmp_path / "stack", tokens_yaml=TOKENS, adjust=limit) as st:
        ctx = ssl.create_default_context(cafile=str(st.gateway_ca_file))

        async def challenge(source: str) -> tuple[int, dict[str, object], str | None]:
            conn = _aiohttp.TCPConnector(local_addr=(source, 0))
            async with (
                _aiohttp.ClientSession(connector=conn) as s,
                s.post(st.gateway_url + "/v1/join/azure/challenge", json={}, ssl=ctx) as r,
            ):
                return r.status, await r.json(), r.headers.get("Retry-After")

        assert [(await challenge("127.0.0.7"))[0] for _ in range(2)] == [200, 200]
        status, body, retry_after = await challenge("127.0.0.7")
        assert (status, body["error"]["code"]) == (429, "rate_limited")  # type: ignore[index]
        assert retry_after is not None and int(retry_after) >= 1
        assert (await challenge("127.0.0.8"))[0] == 200  # the limit is per client
