"""HTTP framing errors rendered like every other error.

aiohttp's parser refuses malformed HTTP (an oversized or NUL-bearing header, conflicting
lengths, a request line too long) before any middleware runs, and its
``RequestHandler.handle_error`` answers with ``text/plain`` that echoes part of the
request and logs an ERROR with a traceback. This handler answers with our JSON error
body and stable code instead, logs one INFO line, and closes the connection.

The listeners build it through :func:`handler_factory` with the runner's own ``Server``
as the connection manager, so the runner's graceful shutdown still tracks (and drains)
every connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from gateway.core.errors import Code, GatewayError
from gateway.http.middleware import render_error

__all__ = ["JsonErrorRequestHandler", "handler_factory"]

log = logging.getLogger(__name__)


class JsonErrorRequestHandler(RequestHandler):
    """Also a deadline for the first request's headers on a connection (slowloris): a
    client that connects and trickles its headers is cut off after ``header_timeout``.
    Later requests on a kept-alive connection are not timed this way — that would close a
    balancer's idle upstream connections under it — aiohttp's keep-alive timeout governs
    idle connections, and the body has its own read deadline (``read_body``)."""

    def __init__(
        self, manager: web.Server, *, header_timeout: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._header_timeout:
            self._header_timer = asyncio.get_running_loop().call_later(
                self._header_timeout, self._headers_too_slow, transport
            )

    def headers_arrived(self) -> None:
        """Called by the first middleware: a request's headers were parsed."""
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self, transport: asyncio.BaseTransport) -> None:
        self._header_timer = None
        log.info(
            "closing a connection whose first request headers took over %ss", self._header_timeout
        )
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.headers_arrived()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            code = Code.INTERNAL_ERROR
        else:
            log.info(
                "refused malformed HTTP from %s: %s (%s)",
                request.remote,
                status,
                type(exc).__name__ if exc else "-",
            )
            code = Code.BODY_TOO_LARGE if status == 413 else Code.MALFORMED_BODY
        if request.writer.output_size > 0:
            # Part of a response already went out: the connection cannot carry another.
            raise ConnectionError("response already started; closing the connection")
        resp = render_error(GatewayError(code))
        resp.set_status(status)
        resp.force_close()
        return resp


def handler_factory(
    manager: web.Server, *, header_timeout: float | None = None, **kwargs: Any
) -> Callable[[], RequestHandler]:
    """A protocol factory for ``loop.create_server`` (and the PROXY-protocol listener)."""

    def make() -> RequestHandler:
        return JsonErrorRequestHandler(
            manager, loop=asyncio.get_running_loop(), header_timeout=header_timeout, **kwargs
        )

    return make
