"""The PROXY protocol (v1 text, v2 binary) in front of TLS (DESIGN §6).

A TCP load balancer that does not terminate TLS can still tell us who the client is by
sending a PROXY header before the first TLS byte
(https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt). Two layers:

* :func:`parse_proxy_header` — pure: bytes in, ``(ProxyInfo, consumed)`` out, or
  ``(None, 0)`` while the header is incomplete; malformed input raises
  :class:`ProxyProtocolError` as early as the bytes allow (a TLS ClientHello fails on its
  first byte instead of waiting for the timeout).
* :func:`serve_proxy_protocol` — the listener (``gateway.http.listener``'s accept loop).
  It closes connections from untrusted peers (only a trusted proxy may speak for the
  client), reads the header without consuming a single TLS byte, and then hands the
  socket to aiohttp's low-level server with ``loop.connect_accepted_socket``. The
  proxied source is kept per transport and read back with :func:`proxied_peer`.

Why peek: the header's end is only known from its content (v1 ends at CRLF), so the
listener peeks with ``MSG_PEEK``; while the header is incomplete every peeked byte is a
header byte and is consumed, so readiness never spins; once it is complete exactly the
header's length is received and the TLS bytes stay in the kernel for the TLS transport.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from gateway.http.listener import Admission, Listener, Refused

__all__ = [
    "MAX_V2_LENGTH",
    "V1_MAX",
    "V2_SIGNATURE",
    "PeerPolicy",
    "ProxyInfo",
    "ProxyProtocolError",
    "ProxyProtocolListener",
    "parse_proxy_header",
    "proxied_peer",
    "read_proxy_header",
    "serve_proxy_protocol",
]

log = logging.getLogger(__name__)

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the spec's worst case, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16
# The spec allows 65535 bytes of addresses + TLVs; real balancers send a few hundred.
# A cap keeps a trusted-but-broken peer from making us buffer 64 KiB per connection.
MAX_V2_LENGTH: Final = 4096
_PEEK: Final = V2_FIXED + MAX_V2_LENGTH


class ProxyProtocolError(Exception):
    """The bytes are not a valid PROXY header; the connection is closed."""


@dataclass(frozen=True)
class ProxyInfo:
    """What the header said. ``source``/``destination`` are ``None`` for a LOCAL (v2) or
    UNKNOWN (v1, or an unspecified/UNIX v2 family) header: use the real peer then."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    source: str | None = None
    source_port: int | None = None
    destination: str | None = None
    destination_port: int | None = None


def parse_proxy_header(
    data: bytes, *, max_v2_length: int = MAX_V2_LENGTH
) -> tuple[ProxyInfo | None, int]:
    """Parse a PROXY header at the start of ``data``.

    Returns ``(info, consumed)`` once the header is complete (bytes after it are left
    alone), ``(None, 0)`` when more bytes are needed. Raises :class:`ProxyProtocolError`
    as soon as ``data`` cannot start a valid header.
    """
    if not data:
        return None, 0
    if data[0] == V2_SIGNATURE[0]:  # b"\r": only v2 starts with it
        return _parse_v2(data, max_v2_length)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyProtocolError(f"no PROXY header: first byte is {data[:1]!r}")


def _parse_v1(data: bytes) -> tuple[ProxyInfo | None, int]:
    head = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyProtocolError("v1 header does not start with 'PROXY '")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        bad = data.find(b"\n", 0, V1_MAX)
        if bad >= 0 or (b"\r" in data[: V1_MAX - 1] and not data.endswith(b"\r")):
            raise ProxyProtocolError("v1 header line does not end with CRLF")
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX} bytes")
        return None, 0
    line = data[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProxyProtocolError("v1 header is not ASCII") from exc
    parts = text.split(" ")
    if len(parts) < 2:
        raise ProxyProtocolError("v1 header has no protocol")
    proto = parts[1]
    if proto == "UNKNOWN":  # the spec: ignore anything after UNKNOWN
        return ProxyInfo(version=1, command="PROXY"), end + 2
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 protocol {proto[:16]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 6:
        raise ProxyProtocolError(f"v1 {proto} header needs 6 fields, has {len(parts)}")
    _, _, src, dst, sport, dport = parts
    kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = (
        ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    )
    try:
        src_addr, dst_addr = kind(src), kind(dst)
    except ValueError as exc:
        raise ProxyProtocolError(f"v1 {proto} address does not parse") from exc
    return (
        ProxyInfo(
            version=1,
            command="PROXY",
            source=str(src_addr),
            source_port=_v1_port(sport),
            destination=str(dst_addr),
            destination_port=_v1_port(dport),
        ),
        end + 2,
    )


def _v1_port(value: str) -> int:
    # Decimal 0..65535; a leading zero is not allowed except for "0" itself.
    if not value.isdigit() or not value.isascii() or len(value) > 5:
        raise ProxyProtocolError(f"v1 port {value[:8]!r} is not a number")
    if len(value) > 1 and value[0] == "0":
        raise ProxyProtocolError(f"v1 port {value!r} has a leading zero")
    port = int(value)
    if port > 65535:
        raise ProxyProtocolError(f"v1 port {port} out of range")
    return port


def _parse_v2(data: bytes, max_length: int) -> tuple[ProxyInfo | None, int]:
    head = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(head):
        raise ProxyProtocolError("v2 signature does not match")
    if len(data) < V2_FIXED:
        return None, 0
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 version nibble is {ver_cmd >> 4}, not 2")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise ProxyProtocolError(f"v2 command {cmd} is neither LOCAL nor PROXY")
    if length > max_length:
        raise ProxyProtocolError(f"v2 header announces {length} bytes, more than {max_length}")
    total = V2_FIXED + length
    if len(data) < total:
        return None, 0
    body = data[V2_FIXED:total]
    if cmd == 0:  # LOCAL: the balancer's own health check; addresses are ignored
        return ProxyInfo(version=2, command="LOCAL"), total
    family, transport = fam >> 4, fam & 0x0F
    if family == 0x0 or family == 0x3:  # AF_UNSPEC, AF_UNIX: nothing usable
        return ProxyInfo(version=2, command="PROXY"), total
    if family not in (0x1, 0x2):
        raise ProxyProtocolError(f"v2 address family {family} is not defined")
    if transport != 0x1:
        raise ProxyProtocolError(f"v2 transport {transport} is not STREAM")
    size = 4 if family == 0x1 else 16
    need = 2 * size + 4
    if length < need:
        raise ProxyProtocolError(f"v2 {length}-byte body is too short for its family")
    # TLVs after the addresses are skipped: we use none of them.
    src_raw, dst_raw = body[:size], body[size : 2 * size]
    sport, dport = struct.unpack("!HH", body[2 * size : need])
    addr: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = (
        ipaddress.IPv4Address if family == 0x1 else ipaddress.IPv6Address
    )
    return (
        ProxyInfo(
            version=2,
            command="PROXY",
            source=str(addr(src_raw)),
            source_port=sport,
            destination=str(addr(dst_raw)),
            destination_port=dport,
        ),
        total,
    )


class PeerPolicy(Protocol):
    """Who may send a PROXY header (``gateway.http.proxy.TrustedProxies``)."""

    def is_trusted(self, ip: str) -> bool: ...


def proxied_peer(transport: asyncio.BaseTransport) -> str | None:
    """The client address a PROXY header named for this connection, if any.

    The header's content lives on the protocol wrapper the listener installed, which
    ``transport.get_protocol()`` returns (for TLS, the TLS app transport returns the app
    protocol): nothing global to register or clean up, and it is there before aiohttp
    handles the first request.
    """
    protocol = transport.get_protocol()
    if isinstance(protocol, _Tracked):
        return protocol.info.source
    return None


class _Tracked(asyncio.Protocol):
    """aiohttp's handler, plus what the PROXY header said: every call is forwarded
    unchanged (the handler sees the real transport), and :func:`proxied_peer` finds
    ``info`` through ``transport.get_protocol()``."""

    __slots__ = ("_inner", "info")

    def __init__(self, inner: asyncio.Protocol, info: ProxyInfo) -> None:
        self._inner = inner
        self.info = info

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def read_proxy_header(sock: socket.socket) -> ProxyInfo:
    """Read one PROXY header from a non-blocking ``sock``, leaving later bytes unread.

    Raises :class:`ProxyProtocolError` on a malformed header or EOF before its end.
    """
    loop = asyncio.get_running_loop()
    buf = b""
    while True:
        await _wait_readable(loop, sock)
        try:
            peeked = sock.recv(_PEEK - len(buf), socket.MSG_PEEK)
            if not peeked:
                raise ProxyProtocolError("connection closed before the header ended")
            info, consumed = parse_proxy_header(buf + peeked)
            if info is not None:
                need = consumed - len(buf)
                got = sock.recv(need)  # peeked already, so all `need` bytes are there
                if len(got) != need:
                    raise ProxyProtocolError("the kernel returned fewer bytes than it peeked")
                return info
            # Incomplete: everything peeked is header, so consume it (no busy readiness).
            buf += sock.recv(len(peeked))
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            raise ProxyProtocolError(f"reading the header failed: {exc}") from exc


class ProxyProtocolListener(Listener):
    """A listening socket whose connections start with a PROXY header.

    The accept loop, connection cap and TLS handover are :class:`Listener`'s; before the
    handover this closes connections from untrusted peers (only a trusted proxy may speak
    for the client) and reads the header within ``header_timeout``. ``close()`` stops
    accepting and drops connections still sending their header; connections handed to
    aiohttp belong to its server (``runner.cleanup()`` drains them).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        handler_factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext | None,
        trusted: PeerPolicy,
        header_timeout: float,
        ssl_handshake_timeout: float = 60.0,
        admission: Admission | None = None,
        owns_socket: bool = False,
    ) -> None:
        if header_timeout <= 0:
            raise ValueError(f"header_timeout must be > 0, not {header_timeout!r}")
        super().__init__(
            sock,
            handler_factory=handler_factory,
            ssl_context=ssl_context,
            admission=admission,
            ssl_handshake_timeout=ssl_handshake_timeout,
            owns_socket=owns_socket,
        )
        self._trusted = trusted
        self._timeout = header_timeout

    async def _before_handover(
        self, conn: socket.socket, peer: str
    ) -> Callable[[asyncio.Protocol], asyncio.Protocol]:
        if not self._trusted.is_trusted(peer):
            log.warning("PROXY listener: refused %s, not a trusted proxy", peer)
            raise Refused(peer)
        conn.setblocking(False)  # the listener hands it over as accepted (blocking)
        try:
            async with asyncio.timeout(self._timeout):
                info = await read_proxy_header(conn)
        except (ProxyProtocolError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            log.warning("PROXY listener: dropped %s: %s", peer, reason)
            raise Refused(peer) from exc
        return lambda inner: _Tracked(inner, info)


async def serve_proxy_protocol(
    sock: socket.socket,
    *,
    handler_factory: Callable[[], asyncio.Protocol],
    ssl_context: ssl.SSLContext | None,
    trusted: PeerPolicy,
    header_timeout: float = 5.0,
    ssl_handshake_timeout: float = 60.0,
    admission: Admission | None = None,
    owns_socket: bool = False,
) -> ProxyProtocolListener:
    """Start accepting on the bound, listening ``sock``.

    Parameters:

    * handler_factory — aiohttp's low-level server, ``runner.server`` after
      ``await runner.setup()``.
    * ssl_context — the TLS server context, or ``None`` for plain HTTP.
    * trusted — only peers it trusts may connect; others are closed at once.
    * header_timeout — seconds a trusted peer has to send the whole header.
    * ssl_handshake_timeout — seconds for the TLS handshake after the header (asyncio's
      default).
    * admission, owns_socket — the connection cap and socket ownership (:class:`Listener`).
    """
    listener = ProxyProtocolListener(
        sock,
        handler_factory=handler_factory,
        ssl_context=ssl_context,
        trusted=trusted,
        header_timeout=header_timeout,
        ssl_handshake_timeout=ssl_handshake_timeout,
        admission=admission,
        owns_socket=owns_socket,
    )
    listener.start()
    return listener
