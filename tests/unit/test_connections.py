"""The connection layer on its own: the per-worker cap and the drain, by connection phase.

A real aiohttp runner behind our accept loop (``gateway.http.listener.Listener``) and our
handler (``gateway.http.framing``), plain HTTP on loopback: each case puts one connection
in one phase, starts the drain, and checks what that connection sees.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp import web

from gateway.http.framing import Connections, Phase, handler_factory
from gateway.http.listener import Listener
from gateway.http.middleware import error_middleware

pytestmark = pytest.mark.asyncio

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Server:
    port: int
    connections: Connections
    listener: Listener
    release: asyncio.Event  # lets /slow answer
    entered: asyncio.Event  # /slow was reached

    async def connect(self) -> Stream:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    release, entered = asyncio.Event(), asyncio.Event()

    async def fast(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[error_middleware])  # it refuses during the drain
    app.router.add_get("/fast", fast)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    assert runner.server is not None
    connections = Connections(max_connections=3)
    factory = handler_factory(
        runner.server, header_timeout=30.0, keepalive_timeout=30.0, connections=connections
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    listener = Listener(
        sock, handler_factory=factory, ssl_context=None, admission=connections, owns_socket=True
    )
    listener.start()
    try:
        yield Server(sock.getsockname()[1], connections, listener, release, entered)
    finally:
        release.set()
        await listener.aclose()
        await runner.cleanup()


async def request(stream: Stream, path: str) -> tuple[int, bytes, bytes]:
    reader, writer = stream
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return int(head.split()[1]), head, await reader.readexactly(length)


async def closed(stream: Stream) -> bool:
    try:
        return await asyncio.wait_for(stream[0].read(), 5) == b""
    except ConnectionError:
        return True


async def phase_reached(server: Server, phase: Phase) -> None:
    for _ in range(200):
        handlers = server.connections._handlers
        if handlers and all(h.phase is phase for h in handlers):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no connection reached {phase}")


async def test_the_cap_refuses_before_the_handler_and_counts() -> None:
    refusals: list[int] = []
    conns = Connections(max_connections=2, on_refused=lambda: refusals.append(1))
    assert [conns.admit(), conns.admit(), conns.admit()] == [True, True, False]
    assert (conns.refused, len(refusals), len(conns)) == (1, 1, 2)
    conns.handshake_done()
    assert conns.admit() is True


async def test_over_the_cap_a_connection_is_reset_and_the_others_are_served(
    server: Server,
) -> None:
    held = [await server.connect() for _ in range(3)]
    for stream in held:
        assert (await request(stream, "/fast"))[0] == 200
    extra = await server.connect()
    assert await closed(extra)
    assert server.connections.refused == 1 and server.listener.refused == 1
    assert (await request(held[0], "/fast"))[0] == 200
    for _, writer in (*held, extra):
        writer.close()


Setup = Callable[[Server, Stream], Awaitable[None]]


async def _idle(server: Server, stream: Stream) -> None:
    assert (await request(stream, "/fast"))[0] == 200
    await phase_reached(server, Phase.IDLE)


async def _fresh(server: Server, stream: Stream) -> None:
    await phase_reached(server, Phase.FRESH)


async def _partial(server: Server, stream: Stream) -> None:
    stream[1].write(b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Half: ")
    await stream[1].drain()
    await phase_reached(server, Phase.HEADERS)


@pytest.mark.parametrize(
    ("setup", "grace", "then_send", "expect"),
    [
        (_idle, 30.0, False, "closed"),
        (_fresh, 2.0, True, "503"),
        (_fresh, 0.2, False, "closed"),
        (_partial, 0.2, False, "closed"),
    ],
    ids=[
        "an idle kept-alive connection is closed at once, the grace is not waited for",
        "a fresh connection that sends its request within the grace gets 503 shutting_down",
        "a fresh connection that sends nothing is closed when the grace ends",
        "a connection stuck mid-headers is closed when the grace ends",
    ],
)
async def test_the_drain_by_phase(
    server: Server, setup: Setup, grace: float, then_send: bool, expect: str
) -> None:
    stream = await server.connect()
    await setup(server, stream)
    server.listener.stop_accepting()
    drain = asyncio.ensure_future(server.connections.drain(grace))
    if then_send:
        status, head, body = await request(stream, "/fast")
        assert (status, json.loads(body)["error"]["code"]) == (503, "shutting_down")
        assert b"connection: close" in head.lower()
    assert await closed(stream)
    # Nothing unsettled is left: the drain ends (well before 30 s for the idle case).
    await asyncio.wait_for(drain, 5)
    stream[1].close()


async def test_a_busy_request_is_left_to_finish(server: Server) -> None:
    stream = await server.connect()
    pending = asyncio.ensure_future(request(stream, "/slow"))
    await asyncio.wait_for(server.entered.wait(), 5)
    server.listener.stop_accepting()
    await asyncio.wait_for(server.connections.drain(0.1), 5)
    assert not pending.done()
    server.release.set()
    assert (await pending)[0] == 200
    stream[1].close()


async def test_after_stop_accepting_the_kernel_refuses(server: Server) -> None:
    server.listener.stop_accepting()
    with pytest.raises(ConnectionRefusedError):
        await server.connect()
