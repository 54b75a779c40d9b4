"""The connection's side of HTTP: framing errors, header deadlines, the drain.

aiohttp's parser refuses malformed HTTP (an oversized or NUL-bearing header, conflicting
lengths, a request line too long) before any middleware runs, and its
``RequestHandler.handle_error`` answers with ``text/plain`` that echoes part of the
request and logs an ERROR with a traceback. This handler answers with our JSON error
body and stable code instead, logs one INFO line, and closes the connection.

It also keeps each connection's phase — fresh, receiving headers, busy with a request,
idle between requests — which gives every request's headers a deadline (slowloris) and
lets the drain tell connections that must finish (busy) from those that must go (the
rest). :class:`Connections` counts a worker's connections for the cap and runs the drain.

The listeners build it through :func:`handler_factory` with the runner's own ``Server``
as the connection manager, so the runner's graceful shutdown still tracks (and drains)
every connection.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from gateway.core.errors import Code, GatewayError
from gateway.http.middleware import render_error
from gateway.http.proxy import Peer

__all__ = [
    "Connections",
    "JsonErrorRequestHandler",
    "Phase",
    "handler_factory",
]

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    FRESH = "fresh"  # accepted (TLS done), nothing received yet
    HEADERS = "headers"  # a request's first bytes are here, its headers are not complete
    BUSY = "busy"  # a request is being handled (its body read, its answer written)
    IDLE = "idle"  # kept alive after an answer, nothing of the next request yet


class Connections:
    """A worker's open connections: the cap, and the drain.

    Parameters:

    * max_connections — connections open at once, TLS handshakes included; beyond it the
      listeners reset new connections at accept (``limits.max_connections``).
    * on_refused — called once per connection refused for the cap (a metric).

    The drain (:meth:`drain`): new requests are answered ``503 shutting_down`` with
    ``Connection: close``; idle kept-alive connections close at once; connections still
    in their handshake or without a complete request get ``grace`` seconds to send one
    (and get the 503), then they are closed. Busy connections are left to the runner,
    which lets their requests finish within ``shutdown_timeout_seconds``.
    """

    def __init__(
        self, *, max_connections: int, on_refused: Callable[[], None] | None = None
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections!r}")
        self._max = max_connections
        self._on_refused = on_refused
        self._handshaking = 0
        self._handlers: set[JsonErrorRequestHandler] = set()
        self._settled: asyncio.Event | None = None
        self.draining = False
        self.refused = 0

    def __len__(self) -> int:
        return self._handshaking + len(self._handlers)

    # --- the listeners' side (gateway.http.listener.Admission)

    def admit(self) -> bool:
        if len(self) >= self._max:
            self.refused += 1
            if self._on_refused is not None:
                self._on_refused()
            return False
        self._handshaking += 1
        return True

    def handshake_done(self) -> None:
        self._handshaking -= 1
        self._check_settled()

    # --- the handlers' side

    def opened(self, handler: JsonErrorRequestHandler) -> None:
        self._handlers.add(handler)

    def closed(self, handler: JsonErrorRequestHandler) -> None:
        self._handlers.discard(handler)
        self._check_settled()

    def phase_changed(self, handler: JsonErrorRequestHandler) -> None:
        if self.draining and handler.phase is Phase.IDLE:
            handler.close()  # its answer is on the way; the connection ends after it
        self._check_settled()

    # --- the drain

    def unsettled(self) -> int:
        """Connections that may still bring a request: handshaking, fresh, or mid-headers."""
        waiting = sum(1 for h in self._handlers if h.phase in (Phase.FRESH, Phase.HEADERS))
        return self._handshaking + waiting

    def _check_settled(self) -> None:
        if self._settled is not None and self.unsettled() == 0:
            self._settled.set()

    async def drain(self, grace: float) -> None:
        """Refuse new requests, close idle connections now and the undecided ones after
        ``grace`` seconds (sooner when they have all sent a request or gone)."""
        self.draining = True
        self._settled = asyncio.Event()
        for handler in list(self._handlers):
            if handler.phase is Phase.IDLE:
                handler.force_close()
        self._check_settled()
        try:
            async with asyncio.timeout(grace):
                await self._settled.wait()
        except TimeoutError:
            pass
        for handler in list(self._handlers):
            if handler.phase is not Phase.BUSY:
                handler.force_close()

    def __repr__(self) -> str:
        return (
            f"<Connections open={len(self)}/{self._max} handshaking={self._handshaking} "
            f"draining={self.draining} refused={self.refused}>"
        )


class _NoDelayAlreadySet(BaseProtocol):
    """aiohttp's ``BaseProtocol.connection_made`` without its ``TCP_NODELAY`` call.

    Every connection of ours already has ``TCP_NODELAY``: the listener's socket carries
    it and accepted connections inherit it (``gateway.http.listener``), and uvloop sets
    it on every TCP transport besides (libuv's ``uv_tcp_nodelay``). aiohttp's second
    ``setsockopt`` changes nothing — and under uvloop it costs a socket object and two
    ``getsockname`` calls per connection (``get_extra_info("socket")``, then a real
    socket around the descriptor for the ``setsockopt``), ~7 µs per join.
    ``JsonErrorRequestHandler`` lists this class after ``RequestHandler``, so the
    ``super().connection_made()`` in ``RequestHandler.connection_made`` lands here;
    everything else ``RequestHandler`` does on a new connection is unchanged.
    """

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)


class JsonErrorRequestHandler(RequestHandler, _NoDelayAlreadySet):
    """aiohttp's connection handler, with our error bodies and a deadline for every
    request's headers (slowloris): a new connection's first request from the moment it
    is handed over, each later one from its first byte — an idle kept-alive connection is
    governed by ``keepalive_timeout`` instead, so a balancer's idle upstream connections
    are not closed under it. The body has its own deadline (``read_body``).

    The headers' deadline is one timer per connection, not one per request: a request
    whose headers arrive only clears the deadline, and the timer, when it fires, closes
    the connection if a request's headers are then overdue, re-arms itself for a later
    request's deadline, or ends (aiohttp's keep-alive timer works the same way). A join
    is two requests on one connection, and its headers always arrive in time: one timer
    instead of two created and cancelled.
    """

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: float | None = None,
        connections: Connections | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        # When the current request's headers are due (loop time); None: none is waiting.
        self._header_deadline: float | None = None
        self._connections = connections
        self.phase = Phase.FRESH
        # The connection's peer, worked out at its first request (gateway.http.proxy).
        self.client_peer: Peer | None = None

    @property
    def draining(self) -> bool:
        return self._connections is not None and self._connections.draining

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        if self._connections is not None:
            self._connections.phase_changed(self)

    def _start_header_clock(self) -> None:
        """A request's headers are due ``header_timeout`` seconds from now."""
        if not self._header_timeout or self.transport is None:
            return
        deadline = self._loop.time() + self._header_timeout
        self._header_deadline = deadline
        if self._header_timer is None:
            self._header_timer = self._loop.call_at(deadline, self._check_header_deadline)
        # else: the timer armed for an earlier request fires before this deadline, sees
        # it still ahead and re-arms for it.

    def _check_header_deadline(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None:
            return  # every request so far had its headers in time; none is waiting
        if self._loop.time() < deadline:
            self._header_timer = self._loop.call_at(deadline, self._check_header_deadline)
            return
        self._headers_too_slow()

    def _cancel_header_timer(self) -> None:
        self._header_deadline = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._connections is not None:
            self._connections.opened(self)
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        if data and (self.phase is Phase.IDLE or self.phase is Phase.FRESH):
            if self.phase is Phase.IDLE:
                # The next request's first bytes: its headers are on the clock from now.
                # (A fresh connection's first request has been on it since the handover.)
                self._start_header_clock()
            self._set_phase(Phase.HEADERS)
        super().data_received(data)

    def headers_arrived(self) -> None:
        """Called by the first middleware: a request's headers were parsed."""
        self._header_deadline = None  # the timer, if armed, ends when it fires
        self._set_phase(Phase.BUSY)

    def log_access(
        self, request: BaseRequest, response: StreamResponse, time: float | None
    ) -> None:
        """aiohttp calls this once a request's answer is written: the connection is
        idle until the next request's first byte."""
        super().log_access(request, response, time)
        self._set_phase(Phase.IDLE)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        log.info("closing a connection whose request headers took over %ss", self._header_timeout)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if self._connections is not None:
            self._connections.closed(self)
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
    manager: web.Server,
    *,
    header_timeout: float | None = None,
    connections: Connections | None = None,
    **kwargs: Any,
) -> Callable[[], RequestHandler]:
    """A protocol factory for the listeners (``gateway.http.listener``). ``kwargs`` go to
    aiohttp's ``RequestHandler`` (``keepalive_timeout``, ``access_log``,
    ``tcp_keepalive``).

    Call it on the running loop that will serve the connections, as aiohttp's own
    ``Server`` is made: the loop is looked up once here, not once per connection (under
    Python 3.11 each lookup is a ``getpid`` system call)."""
    loop = asyncio.get_running_loop()

    def make() -> RequestHandler:
        return JsonErrorRequestHandler(
            manager,
            loop=loop,
            header_timeout=header_timeout,
            connections=connections,
            **kwargs,
        )

    return make

