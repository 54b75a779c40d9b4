"""Our own accept loop: a per-worker connection cap before any TLS work, and a drain that
stops the kernel accepting.

``loop.create_server`` starts a TLS handshake for every connection it accepts, so a cap
enforced after it would already have paid for the handshake. :class:`Listener` accepts
itself, asks its :class:`Admission` (``gateway.http.framing.Connections``) whether there is
room, closes an over-cap connection at once with a reset (no handshake, no TIME_WAIT on
our side), and hands the others to aiohttp's server with ``loop.connect_accepted_socket``.
The PROXY-protocol listener (``gateway.http.proxyproto``) is this loop plus a header read
before the handover.

Accepting is a reader callback on the listening socket, registered once, that accepts
up to :data:`_ACCEPT_BATCH` connections per readiness event — what asyncio's own server
does. (``await loop.sock_accept()`` per connection costs uvloop a poll handle made and
closed each time: an ``ioctl`` and two ``epoll_ctl`` calls, a future and a task wake-up.)
The listening socket carries ``SO_KEEPALIVE`` and ``TCP_NODELAY``, which Linux copies to
every connection it accepts: aiohttp's handler need not set them per connection
(``tcp_keepalive=False``, and ``framing``'s handler skips the other), which under uvloop
builds a socket object around the descriptor for each ``setsockopt``.

Stopping: :meth:`Listener.stop_accepting` cancels the loop and closes this process's
descriptor. The descriptor is shared — the supervisor binds once and forks, so the parent
and every worker hold it — and a ``close()`` in one process leaves the socket listening
for the others: the kernel would keep completing handshakes into a backlog nobody
accepts. ``shutdown(SHUT_RD)`` acts on the socket itself, in every process: it stops
listening and resets whatever waits in the backlog, so new connections are refused at
once and a balancer fails over. Only the socket's owner does that (``owns_socket``: a
single process that bound it; with workers the supervisor does it for all of them), so a
worker stopping alone never takes the listener from the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Final, Protocol

__all__ = ["Admission", "Listener", "Refused", "refuse_connection", "stop_listening"]

log = logging.getLogger(__name__)

_ACCEPT_RETRY_DELAY: Final = 1.0
# Accepted per readiness event before yielding to the loop, as asyncio's own accept does.
_ACCEPT_BATCH: Final = 64
_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


class Admission(Protocol):
    """Who may be accepted: the worker's connection count (``framing.Connections``)."""

    def admit(self) -> bool:
        """Room for one more connection? ``True`` counts it as handshaking."""
        ...

    def handshake_done(self) -> None:
        """The connection was handed over (now counted by its handler) or dropped."""
        ...


class Refused(Exception):
    """Raised by :meth:`Listener._before_handover`: drop this connection (already logged)."""


def refuse_connection(conn: socket.socket) -> None:
    """Close an accepted socket with a reset: the client learns at once, and no TIME_WAIT
    state is left on our side however many are refused."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    conn.close()


def stop_listening(sock: socket.socket) -> None:
    """Make the kernel stop accepting on ``sock`` in every process that holds it."""
    with contextlib.suppress(OSError):  # already shut down (another owner), or closed
        sock.shutdown(socket.SHUT_RD)


class Listener:
    """One listening socket and its accept loop.

    Parameters:

    * sock — bound and listening (``bind_socket``, or the supervisor's).
    * handler_factory — the protocol factory (``framing.handler_factory``).
    * ssl_context — the TLS server context, or ``None`` for plain HTTP.
    * admission — the connection cap; ``None``: no cap.
    * ssl_handshake_timeout — seconds for the TLS handshake.
    * owns_socket — this process bound ``sock`` alone: stopping also stops the kernel
      accepting on it (see the module docstring).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        handler_factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext | None,
        admission: Admission | None = None,
        ssl_handshake_timeout: float = 60.0,
        owns_socket: bool = False,
    ) -> None:
        self._sock = sock
        self._factory = handler_factory
        self._ssl = ssl_context
        self._admission = admission
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._owns_socket = owns_socket
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # the accept callback is registered
        self._retry: asyncio.TimerHandle | None = None  # accepting again after EMFILE & co
        self._pending: set[asyncio.Task[bool]] = set()
        self._closed = False
        self.accepted = 0
        self.refused = 0

    @property
    def sockname(self) -> tuple[str, int]:
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    @property
    def pending(self) -> int:
        """Connections accepted and not yet handed over (header read, TLS handshake)."""
        return len(self._pending)

    def start(self) -> None:
        self._sock.setblocking(False)
        # Inherited by every accepted connection (Linux), on either event loop: TCP
        # keep-alive probes find peers that vanished without a FIN, and no Nagle delay.
        # aiohttp's handler set both per connection; ours leaves them to this.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop = asyncio.get_running_loop()
        self._resume()

    def _resume(self) -> None:
        self._retry = None
        if self._closed or self._loop is None:
            return
        self._loop.add_reader(self._sock.fileno(), self._accept_ready)
        self._reading = True

    def _pause(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = False

    def _accept_ready(self) -> None:
        """The listening socket is readable: accept what waits, up to a batch."""
        loop = self._loop
        assert loop is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the backlog is empty: wait for readiness again
            except OSError as exc:
                self._accept_failed(loop, exc)
                return
            self._dispatch(loop, conn, addr)

    def _accept_failed(self, loop: asyncio.AbstractEventLoop, exc: OSError) -> None:
        self._pause()
        if self._closed:
            return
        if exc.errno == errno.EINVAL:
            # The socket's owner (the supervisor) stopped it listening: the drain.
            log.info("listener %s stopped by its owner", self.sockname)
            return
        # EMFILE and friends: back off as asyncio's own accept loop does.
        log.error("accept failed: %s", exc)
        self._retry = loop.call_later(_ACCEPT_RETRY_DELAY, self._resume)

    def _dispatch(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, addr: object) -> None:
        if self._admission is not None and not self._admission.admit():
            self.refused += 1
            loop.call_soon(refuse_connection, conn)
            return
        task = loop.create_task(self._handle(conn, addr))
        self._pending.add(task)
        # Not a ``finally`` in _handle: a task cancelled before its first step never
        # enters its body, and the count and the socket must be released all the same.
        task.add_done_callback(functools.partial(self._finished, conn))

    def _finished(self, conn: socket.socket, task: asyncio.Task[bool]) -> None:
        self._pending.discard(task)
        if self._admission is not None:
            self._admission.handshake_done()
        if task.cancelled():
            conn.close()
            return
        exc = task.exception()
        if exc is not None:
            log.error("handing a connection over failed", exc_info=exc)
        if exc is not None or not task.result():
            conn.close()  # after a handover the transport owns it: never closed here

    async def _before_handover(
        self, conn: socket.socket, peer: str
    ) -> Callable[[asyncio.Protocol], asyncio.Protocol] | None:
        """Work between accept and TLS: ``None``, or a wrapper for the handler protocol.
        Raise :class:`Refused` to drop the connection."""
        return None

    async def _handle(self, conn: socket.socket, addr: object) -> bool:
        """Work before the handover, then the TLS handshake; whether it was handed over."""
        peer = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
        # Left blocking here: the event loop makes it non-blocking as it opens the
        # transport, and a ``_before_handover`` that reads makes it so itself.
        try:
            wrap = await self._before_handover(conn, peer)
        except Refused:
            self.refused += 1
            return False
        factory = self._factory if wrap is None else (lambda: wrap(self._factory()))
        loop = self._loop
        assert loop is not None, "start() first"
        try:
            await loop.connect_accepted_socket(
                factory,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=self._ssl_handshake_timeout if self._ssl else None,
            )
        except OSError as exc:  # includes ssl.SSLError, resets and handshake timeouts
            self.refused += 1
            log.info("handshake with %s failed: %s", peer, exc)
            return False
        except asyncio.CancelledError:
            raise
        except Exception:
            # A background task's error would otherwise vanish; the connection is
            # dropped, the listener keeps serving, the traceback is logged.
            self.refused += 1
            log.exception("handing %s to the server failed", peer)
            return False
        self.accepted += 1
        return True

    def stop_accepting(self) -> None:
        """Stop accepting now; connections in their handshake carry on (see :meth:`aclose`)."""
        if self._closed:
            return
        self._closed = True
        if self._owns_socket:
            stop_listening(self._sock)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        # The reader goes first; only then may the descriptor be closed (and its number
        # reused).
        self._pause()
        self._sock.close()

    def close(self) -> None:
        """Stop accepting and drop connections not yet handed over."""
        self.stop_accepting()
        for task in self._pending:
            task.cancel()

    async def aclose(self) -> None:
        self.close()
        for task in list(self._pending):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<{type(self).__name__} {state} pending={len(self._pending)} "
            f"accepted={self.accepted} refused={self.refused}>"
        )
