"""A real aiohttp app behind the PROXY-protocol listener, with real TLS on loopback.

The client is a plain asyncio stream: it sends the PROXY header in clear, upgrades the
same connection to TLS (``StreamWriter.start_tls``) and speaks HTTP/1.1. Every case runs
on the default event loop and on uvloop, since production may use either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from gateway.core.errors import BadRequest
from gateway.core.tlsutil import (
    client_ssl_context,
    generate_ca,
    issue_cert,
    server_ssl_context,
    write_pem_files,
)
from gateway.http.framing import JsonErrorRequestHandler, handler_factory
from gateway.http.proxy import TrustedProxies, client_address_for, connection_peer
from gateway.http.proxyproto import (
    V2_SIGNATURE,
    ProxyProtocolListener,
    proxied_peer,
    serve_proxy_protocol,
)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
LOOPS: list[LoopFactory] = [asyncio.new_event_loop, uvloop.new_event_loop]
LOOP_IDS = ["on the default event loop", "on uvloop"]
TRUST_LOCALHOST = TrustedProxies(["127.0.0.1/32"])


@dataclass(frozen=True)
class Pki:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d: Path = tmp_path_factory.mktemp("pki")
    ca = generate_ca("proxy test CA", days=2)
    leaf = issue_cert(ca, common_name="gateway", ip_addresses=["127.0.0.1"], days=1)
    cert, key = write_pem_files(leaf, d, "server")
    ca_cert, _ = write_pem_files(ca, d, "ca")
    return Pki(server=server_ssl_context(cert, key), client=client_ssl_context(ca_file=ca_cert))


def run(factory: LoopFactory, coro: Awaitable[None]) -> None:
    async def main() -> None:
        await coro

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def v1(src: str) -> bytes:
    return f"PROXY TCP4 {src} 127.0.0.1 4711 443\r\n".encode()


def v2_tcp6(src: str) -> bytes:
    body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, "::1")
    body += struct.pack("!HH", 4711, 443) + b"\x04\x00\x02ok"  # a NOOP TLV, skipped
    return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(body)) + body


V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


async def _whoami(request: web.Request) -> web.Response:
    transport = request.transport
    assert transport is not None
    return web.json_response(
        {
            "proxied": proxied_peer(transport),
            "peer": transport.get_extra_info("peername")[0],
            "client": client_address_for(request, TRUST_LOCALHOST),
        }
    )


async def _whoami_kept(request: web.Request) -> web.Response:
    """The client address, and which parsed peer object the connection kept."""
    assert isinstance(request.protocol, JsonErrorRequestHandler)
    return web.json_response(
        {
            "client": client_address_for(request, TRUST_LOCALHOST),
            "peer_object": id(connection_peer(request, TRUST_LOCALHOST)),
            "kept": request.protocol.client_peer is not None,
        }
    )


class Gateway:
    """An AppRunner (no sites) whose only listener is ours."""

    def __init__(self, pki: Pki, header_timeout: float, *, ours: bool = False) -> None:
        self._pki = pki
        self._timeout = header_timeout
        self._ours = ours  # the gateway's connection handler (framing), not aiohttp's
        self.runner: web.AppRunner | None = None
        self.listener: ProxyProtocolListener | None = None
        self.port = 0

    async def __aenter__(self) -> Gateway:
        app = web.Application()
        app.router.add_get("/whoami", _whoami)
        app.router.add_get("/whoami-kept", _whoami_kept)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        assert self.runner.server is not None
        self.listener = await serve_proxy_protocol(
            sock,
            handler_factory=(
                handler_factory(self.runner.server) if self._ours else self.runner.server
            ),
            ssl_context=self._pki.server,
            trusted=TRUST_LOCALHOST,
            header_timeout=self._timeout,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.listener is not None:
            await self.listener.aclose()
        if self.runner is not None:
            await self.runner.cleanup()

    async def connect(
        self, local: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(local, 0))

    async def whoami(self, header: bytes, extra_headers: str = "") -> dict[str, Any]:
        reader, writer = await self.connect()
        try:
            writer.write(header)
            await writer.drain()
            await writer.start_tls(self._pki.client, server_hostname="127.0.0.1")
            writer.write(
                b"GET /whoami HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
                + extra_headers.encode()
                + b"\r\n"
            )
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        result: dict[str, Any] = json.loads(body)
        return result

    async def whoami_coalesced(self, header: bytes) -> dict[str, Any]:
        """Header and ClientHello in one write, so they reach the server in one segment:
        the listener must stop exactly at the header's end."""
        reader, writer = await self.connect()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self._pki.client.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")

        async def pump() -> None:
            if pending := outgoing.read():
                writer.write(pending)
                await writer.drain()

        async def feed() -> None:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()

        try:
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            writer.write(header + outgoing.read())
            await writer.drain()
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await pump()
                    await feed()
            tls.write(b"GET /whoami HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
            await pump()
            raw = b""
            while True:
                try:
                    chunk = tls.read(65536)
                except ssl.SSLWantReadError:
                    await pump()
                    await feed()
                    continue
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                raw += chunk
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        result: dict[str, Any] = json.loads(body)
        return result


CASES: list[tuple[str, bytes, str, dict[str, Any]]] = [
    (
        "a v1 header names the client",
        v1("198.51.100.7"),
        "",
        {"proxied": "198.51.100.7", "peer": "127.0.0.1", "client": "198.51.100.7"},
    ),
    (
        "a v2 TCP6 header with a TLV names the client",
        v2_tcp6("2001:db8::7"),
        "",
        {"proxied": "2001:db8::7", "peer": "127.0.0.1", "client": "2001:db8::7"},
    ),
    (
        "a v2 LOCAL header leaves the real peer as the client",
        V2_LOCAL,
        "",
        {"proxied": None, "peer": "127.0.0.1", "client": "127.0.0.1"},
    ),
    (
        "X-Forwarded-For from an untrusted proxied source is ignored",
        v1("198.51.100.7"),
        "X-Forwarded-For: 6.6.6.6\r\n",
        {"proxied": "198.51.100.7", "peer": "127.0.0.1", "client": "198.51.100.7"},
    ),
    (
        "X-Forwarded-For from a trusted proxied source is honoured",
        v1("127.0.0.1"),
        "X-Forwarded-For: 203.0.113.5\r\n",
        {"proxied": "127.0.0.1", "peer": "127.0.0.1", "client": "203.0.113.5"},
    ),
]


@pytest.mark.parametrize("factory", LOOPS, ids=LOOP_IDS)
@pytest.mark.parametrize(
    ("header", "extra", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_proxied_address_reaches_the_handler(
    pki: Pki, factory: LoopFactory, header: bytes, extra: str, expected: dict[str, Any]
) -> None:
    async def go() -> None:
        async with Gateway(pki, header_timeout=5) as gw:
            assert await gw.whoami(header, extra) == expected
            # A second connection gets its own address, not the first one's.
            again = await gw.whoami(v1("192.0.2.44"))
            assert again["proxied"] == "192.0.2.44"
            assert gw.listener is not None and gw.listener.accepted == 2

    run(factory, go())


async def _kept_alive_requests(
    gw: Gateway, pki: Pki, header: bytes, forwarded_for: list[str]
) -> list[dict[str, Any]]:
    """One connection, one request per ``forwarded_for`` value, kept alive between them."""
    reader, writer = await gw.connect()
    out: list[dict[str, Any]] = []
    try:
        writer.write(header)
        await writer.drain()
        await writer.start_tls(pki.client, server_hostname="127.0.0.1")
        for value in forwarded_for:
            writer.write(
                f"GET /whoami-kept HTTP/1.1\r\nHost: gateway\r\n"
                f"X-Forwarded-For: {value}\r\n\r\n".encode()
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            out.append(json.loads(await reader.readexactly(length)))
    finally:
        writer.close()
    return out


@pytest.mark.parametrize("factory", LOOPS, ids=LOOP_IDS)
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("127.0.0.1", ["198.51.100.1", "198.51.100.2", "198.51.100.1"]),
        ("203.0.113.9", ["203.0.113.9"] * 3),
    ],
    ids=[
        "a trusted proxy's header is read again on every request of a kept-alive connection",
        "an untrusted source stays the client on every request, whatever its header says",
    ],
)
def test_the_peer_is_worked_out_once_per_connection(
    pki: Pki, factory: LoopFactory, source: str, expected: list[str]
) -> None:
    async def go() -> None:
        async with Gateway(pki, header_timeout=5, ours=True) as gw:
            answers = await _kept_alive_requests(
                gw, pki, v1(source), ["198.51.100.1", "198.51.100.2", "198.51.100.1"]
            )
            assert [a["client"] for a in answers] == expected
            assert all(a["kept"] for a in answers)
            # The same parsed peer served every request of the connection...
            assert len({a["peer_object"] for a in answers}) == 1
            # ...and a new connection works its own out.
            (other,) = await _kept_alive_requests(gw, pki, v1("192.0.2.44"), ["198.51.100.3"])
            assert other["client"] == "192.0.2.44"
            assert gw.listener is not None and gw.listener.accepted == 2

    run(factory, go())


@pytest.mark.parametrize("factory", LOOPS, ids=LOOP_IDS)
@pytest.mark.parametrize(
    ("header", "expected"),
    [(v1("198.51.100.7"), "198.51.100.7"), (v2_tcp6("2001:db8::7"), "2001:db8::7")],
    ids=[
        "a v1 header sent with the ClientHello in one segment leaves the TLS bytes",
        "a v2 header sent with the ClientHello in one segment leaves the TLS bytes",
    ],
)
def test_header_and_client_hello_together(
    pki: Pki, factory: LoopFactory, header: bytes, expected: str
) -> None:
    async def go() -> None:
        async with Gateway(pki, header_timeout=5) as gw:
            assert (await gw.whoami_coalesced(header))["proxied"] == expected

    run(factory, go())


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing; a reset (it closed with our bytes unread)
    counts as closing without a byte."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except ConnectionResetError:
        return b""


REFUSED: list[tuple[str, str, bytes, float]] = [
    ("a connection without a header is closed at once", "127.0.0.1", b"\x16\x03\x01\x00", 0),
    ("an HTTP request without a header is closed at once", "127.0.0.1", b"GET / HTTP/1.1\r\n", 0),
    ("a malformed v1 header is closed at once", "127.0.0.1", b"PROXY TCP4 x y 1 2\r\n", 0),
    ("a peer outside the trusted CIDRs is closed at once", "127.0.0.2", v1("198.51.100.7"), 0),
    (
        "a valid header followed by clear-text HTTP fails the TLS handshake and is closed",
        "127.0.0.1",
        v1("198.51.100.7") + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        0,
    ),
    ("a header that never completes is closed after the timeout", "127.0.0.1", b"PROXY TCP", 0.3),
]


@pytest.mark.parametrize("factory", LOOPS, ids=LOOP_IDS)
@pytest.mark.parametrize(
    ("local", "data", "min_wait"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused_connections_are_closed(
    pki: Pki, factory: LoopFactory, local: str, data: bytes, min_wait: float
) -> None:
    async def go() -> None:
        # A 0.3 s header timeout: "at once" cases must close well before it.
        async with Gateway(pki, header_timeout=0.3) as gw:
            loop = asyncio.get_running_loop()
            reader, writer = await gw.connect(local)
            start = loop.time()
            writer.write(data)
            got = await _closed_within(reader, 3)
            elapsed = loop.time() - start
            writer.close()
            assert got == b""  # closed without a byte: no TLS, no HTTP
            if min_wait:
                assert elapsed >= min_wait * 0.9
            else:
                assert elapsed < 0.25
            assert gw.listener is not None
            assert gw.listener.refused == 1 and gw.listener.accepted == 0

    run(factory, go())


def test_aclose_stops_accepting(pki: Pki) -> None:
    async def go() -> None:
        async with Gateway(pki, header_timeout=5) as gw:
            assert gw.listener is not None
            reader, writer = await gw.connect()
            writer.write(b"PROXY TCP4 ")  # stuck in the header phase
            await writer.drain()
            await asyncio.sleep(0.05)
            await gw.listener.aclose()
            assert await _closed_within(reader, 3) == b""
            writer.close()
            with pytest.raises(OSError):
                await gw.connect()

    run(asyncio.new_event_loop, go())


DIRECT: list[tuple[str, list[str], dict[str, str], str]] = [
    (
        "a direct peer inside the trusted CIDRs may name the client",
        ["127.0.0.1/32"],
        {"X-Forwarded-For": "203.0.113.5, 127.0.0.1"},
        "203.0.113.5",
    ),
    (
        "a direct peer outside the trusted CIDRs cannot name the client",
        ["10.0.0.0/8"],
        {"X-Forwarded-For": "203.0.113.5", "Forwarded": "for=203.0.113.6"},
        "127.0.0.1",
    ),
    (
        "a trusted direct peer's malformed header is invalid_forwarded_header",
        ["127.0.0.1/32"],
        {"X-Forwarded-For": "not-an-address"},
        "invalid_forwarded_header",
    ),
]


@pytest.mark.parametrize(
    ("cidrs", "headers", "expected"), [c[1:] for c in DIRECT], ids=[c[0] for c in DIRECT]
)
async def test_client_address_for_a_direct_connection(
    cidrs: list[str], headers: dict[str, str], expected: str
) -> None:
    """Without a PROXY listener the TCP peer is the starting point."""
    trusted = TrustedProxies(cidrs)

    async def handler(request: web.Request) -> web.Response:
        try:
            return web.Response(text=client_address_for(request, trusted))
        except BadRequest as err:
            return web.Response(text=err.code.value, status=err.status)

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/", headers=headers) as resp,
        ):
            assert await resp.text() == expected
    finally:
        await runner.cleanup()
