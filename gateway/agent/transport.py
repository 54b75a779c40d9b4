"""The agent's HTTP plumbing: TLS context, client session, capped body reads.

One session serves IMDS, AIA fetches and the gateway. ``local_addr`` binds every outgoing
connection to one source IP, which is how the tests and the demo make many emulated VMs on
one host look like distinct machines to the gateway.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from gateway.agent.errors import AgentCode, JoinError, NodeConfigError
from gateway.core import httputil

__all__ = ["make_session", "make_ssl_context", "read_capped"]


def make_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifying client context, TLS 1.2+; ``ca_file`` is trusted on top of the system store."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise NodeConfigError(f"cannot load CA file: {exc}", source=str(ca_file)) from exc
    return ctx


def make_session(
    *, ssl_context: ssl.SSLContext, local_addr: str | None = None, limit: int = 10
) -> aiohttp.ClientSession:
    """A session whose connections verify TLS with ``ssl_context`` and bind to ``local_addr``."""
    connector = aiohttp.TCPConnector(
        ssl=ssl_context,
        limit=limit,
        local_addr=(local_addr, 0) if local_addr else None,
    )
    # trust_env stays off: IMDS must never be reached through an HTTP proxy.
    return aiohttp.ClientSession(connector=connector, trust_env=False)


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body, or :class:`JoinError` ``bad_response`` if it exceeds ``limit`` bytes."""
    try:
        return await httputil.read_capped(resp, limit)
    except httputil.ResponseTooLarge as exc:
        raise JoinError(resp.status, AgentCode.BAD_RESPONSE, str(exc), transient=False) from exc
