"""A TCP proxy on loopback that can hold every byte for a while: an upstream made slow
without changing it (TLS passes through untouched)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class SlowProxy:
    port: int
    delay: float = 0.0
    connections: int = 0
    held: int = 0  # chunks being held right now
    # When set, each chunk is passed on in pieces of this many bytes, a moment apart: an
    # answer that reaches the client in several reads (as over a real network).
    trickle: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: SlowProxy
) -> None:
    try:
        while data := await reader.read(65536):
            if proxy.delay:
                proxy.held += 1
                try:
                    await asyncio.sleep(proxy.delay)
                finally:
                    proxy.held -= 1
            if proxy.trickle:
                for at in range(0, len(data), proxy.trickle):
                    writer.write(data[at : at + proxy.trickle])
                    await writer.drain()
                    await asyncio.sleep(0.01)
                continue
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def wait_delivered(proxy: SlowProxy, within: float = 10.0) -> None:
    """Until every held chunk has been passed on (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while proxy.held and loop.time() < deadline:  # noqa: ASYNC110 - a counter, bounded
        await asyncio.sleep(0.05)
    assert proxy.held == 0, "the proxy still holds data"


@asynccontextmanager
async def slow_proxy(target_host: str, target_port: int) -> AsyncIterator[SlowProxy]:
    proxy = SlowProxy(port=0)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        proxy.connections += 1
        try:
            ur, uw = await asyncio.open_connection(target_host, target_port)
        except OSError:
            cw.close()
            return
        for t in (
            asyncio.create_task(_pipe(cr, uw, proxy)),
            asyncio.create_task(_pipe(ur, cw, proxy)),
        ):
            proxy._tasks.add(t)
            t.add_done_callback(proxy._tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for t in list(proxy._tasks):
            t.cancel()
