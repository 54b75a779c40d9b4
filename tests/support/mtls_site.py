"""An aiohttp app served over mutual TLS on a free loopback port, for tests that stand in
for (or wrap) the auth service: the gateway's client must present its certificate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from gateway.core.tlsutil import server_ssl_context


@asynccontextmanager
async def serve_mtls(
    app: web.Application, *, cert: Path, key: Path, client_ca: Path
) -> AsyncIterator[str]:
    """Serve ``app``; yields its base URL (``https://127.0.0.1:PORT``)."""
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    ctx = server_ssl_context(cert, key, client_ca_file=client_ca, require_client_cert=True)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
