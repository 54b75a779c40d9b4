"""What a connection gets from our accept loop and handler, now that each step is paid
once: the socket options aiohttp used to set per connection, the header deadline's one
timer, the accept loop's back-off, and the peer remembered per address.

A real aiohttp runner behind ``gateway.http.listener.Listener`` and
``gateway.http.framing``'s handler, plain HTTP on loopback, under both event loops the
gateway runs on (uvloop in production, asyncio's own in most tests).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from aiohttp import web

import gateway.http.listener as listener_mod
from gateway.core.clock import SystemClock
from gateway.core.config import Config
from gateway.http import proxy
from gateway.http.app import make_app
from gateway.http.framing import Connections, handler_factory
from gateway.http.listener import Listener
from gateway.http.middleware import error_middleware
from gateway.http.proxy import Peer, TrustedProxies

Runner = Callable[[Awaitable[Any]], Any]
LOOPS: dict[str, Runner] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


async def _socket_options(request: web.Request) -> web.Response:
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    return web.json_response(
        {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        }
    )


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def _serve(app: web.Application, **factory_kwargs: Any) -> tuple[web.AppRunner, Listener]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    connections = Connections(max_connections=8)
    factory = handler_factory(runner.server, connections=connections, **factory_kwargs)
    listener = Listener(
        _listening(), handler_factory=factory, ssl_context=None, admission=connections
    )
    listener.start()
    return runner, listener


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("loop", list(LOOPS))
def test_accepted_connections_have_keepalive_and_nodelay_without_the_handler_setting_them(
    loop: str,
) -> None:
    """``serve`` turns aiohttp's per-connection ``SO_KEEPALIVE`` off and our handler skips
    its ``TCP_NODELAY``: the listening socket's ``SO_KEEPALIVE`` is inherited, and the
    event loop sets ``TCP_NODELAY`` itself, so every connection still has both."""

    async def main() -> dict[str, int]:
        app = web.Application()
        app.router.add_get("/options", _socket_options)
        runner, listener = await _serve(app, tcp_keepalive=False)
        try:
            status, body = await _get(listener.sockname[1], "/options")
        finally:
            await listener.aclose()
            await runner.cleanup()
        assert status == 200
        return dict(json.loads(body))

    options = LOOPS[loop](main())
    assert options["keepalive"] != 0 and options["nodelay"] != 0


async def _open_and_send(port: int, data: bytes) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection within ``seconds`` (without answering)."""
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def _headers_app_and_listener(header_timeout: float) -> tuple[web.AppRunner, Listener]:
    app = web.Application(middlewares=[error_middleware])

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/ok", ok)
    return await _serve(app, header_timeout=header_timeout, keepalive_timeout=60.0)


async def test_a_later_requests_header_deadline_counts_from_its_first_byte() -> None:
    """One timer serves every request of a connection: when it fires for the first
    request's deadline while a later request's headers are still within theirs, it
    re-arms for that deadline instead of closing early — and closes at it."""
    timeout = 1.0
    runner, listener = await _headers_app_and_listener(timeout)
    try:
        reader, writer = await _open_and_send(
            listener.sockname[1], b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(0.6 * timeout)  # the connection's first timer is armed for 1.0
        second = time.monotonic()
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # headers not finished
        await writer.drain()
        # Past the first request's deadline, within the second's: still open.
        assert not await _closed_within(reader, 0.7 * timeout)
        # The second request's deadline passes: closed, never answered.
        assert await _closed_within(reader, timeout)
        assert time.monotonic() - second >= timeout * 0.95
        writer.close()
    finally:
        await listener.aclose()
        await runner.cleanup()


async def test_a_new_connections_first_request_is_timed_from_the_handover() -> None:
    """Bytes of the first request do not restart its clock: a client dripping its first
    request's headers is closed ``header_timeout`` after the connection was handed over."""
    timeout = 0.8
    runner, listener = await _headers_app_and_listener(timeout)
    try:
        start = time.monotonic()
        reader, writer = await _open_and_send(listener.sockname[1], b"GET /ok HTTP/1.1\r\n")
        closed = False
        while not closed and time.monotonic() - start < 3 * timeout:
            writer.write(b"X-Drip: a\r\n")
            await writer.drain()
            closed = await _closed_within(reader, 0.2)
        assert closed and time.monotonic() - start < 2 * timeout
        writer.close()
    finally:
        await listener.aclose()
        await runner.cleanup()


class _FlakySocket(socket.socket):
    """A listening socket whose next ``accept`` calls fail with ``errno``s given."""

    failures: list[int]

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, "injected")
        return super().accept()


@asynccontextmanager
async def _flaky_listener(failures: list[int]) -> AsyncIterator[tuple[_FlakySocket, Listener]]:
    """A started listener on a :class:`_FlakySocket` whose first accepts fail so, in front
    of an app answering ``GET /options``."""
    app = web.Application()
    app.router.add_get("/options", _socket_options)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    sock = _FlakySocket()
    sock.failures = failures
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    listener = Listener(sock, handler_factory=handler_factory(runner.server), ssl_context=None)
    listener.start()
    try:
        yield sock, listener
    finally:
        await listener.aclose()
        await runner.cleanup()


async def test_an_accept_failure_backs_off_then_accepting_resumes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener_mod, "_ACCEPT_RETRY_DELAY", 0.05)
    async with _flaky_listener([errno.EMFILE]) as (sock, listener):
        status, _ = await _get(listener.sockname[1], "/options")
        assert status == 200 and sock.failures == [] and listener.accepted == 1


async def test_einval_from_accept_ends_accepting_for_good() -> None:
    """The supervisor stopped the shared socket listening (the drain): no retry timer,
    no reader left behind."""
    async with _flaky_listener([errno.EINVAL]) as (sock, listener):
        client = socket.create_connection(listener.sockname)
        for _ in range(100):
            if not sock.failures:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert sock.failures == [] and listener.accepted == 0 and listener.pending == 0
        assert not listener._reading and listener._retry is None
        client.close()


async def test_make_app_refuses_requests_during_the_drain_with_one_middleware() -> None:
    """``error_middleware`` alone refuses a request once the drain began: 503
    ``shutting_down``, ``Connection: close`` and the request's id."""

    class _Deps:  # nothing below the middleware is reached
        clock = SystemClock()

    app = make_app(Config(), _Deps())  # type: ignore[arg-type]
    assert list(app.middlewares) == [error_middleware]
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    connections = Connections(max_connections=8)
    listener = Listener(
        _listening(),
        handler_factory=handler_factory(runner.server, connections=connections),
        ssl_context=None,
        admission=connections,
    )
    listener.start()
    connections.draining = True
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.sockname[1])
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: drain-1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await listener.aclose()
        await runner.cleanup()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0].startswith("http/1.1 503")
    assert "connection: close" in lines and "x-request-id: drain-1" in lines
    assert json.loads(body)["error"]["code"] == "shutting_down"


@pytest.mark.parametrize(
    "raw", ["10.1.2.3", "11.0.0.1", "::ffff:10.9.9.9", "fd00::1", "/run/gw.sock", ""]
)
def test_a_remembered_peer_is_the_peer_worked_out_afresh(raw: str) -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "fd00::/8"])
    fresh = Peer.of(raw, trusted)
    first, again = trusted.peer(raw), trusted.peer(raw)
    assert again is first
    assert (first.raw, first.address, first.trusted) == (fresh.raw, fresh.address, fresh.trusted)


def test_remembered_peers_are_per_trust_set_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "PEER_CACHE_SIZE", 3)
    trusting, not_trusting = TrustedProxies(["10.0.0.0/8"]), TrustedProxies([])
    assert trusting.peer("10.0.0.1").trusted and not not_trusting.peer("10.0.0.1").trusted
    kept = [trusting.peer(f"10.0.0.{i}") for i in range(1, 6)]
    assert len(trusting._peers) == 3
    assert list(trusting._peers) == ["10.0.0.3", "10.0.0.4", "10.0.0.5"]  # oldest went first
    assert trusting.peer("10.0.0.5") is kept[-1]
    assert trusting.peer("10.0.0.1") is not kept[0]  # dropped, worked out again
