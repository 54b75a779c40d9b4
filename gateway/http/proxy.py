"""Who is the client? Trusted proxies and the forwarding headers (DESIGN §6).

The client address feeds rate limits, audit records and the registration sent upstream,
so it must not be something a client can choose. Only a peer inside the configured
trusted CIDRs may speak for the client, and only through the one header the operator
named (``proxy.client_address_header``: ``X-Forwarded-For``, the default, or RFC 7239
``Forwarded``); from anyone else no header is read. A PROXY-protocol listener
(``gateway.http.proxyproto``) supplies the peer for connections that came through a TCP
load balancer, and the header is applied on top of that.

Rules, decided once here so every caller agrees:

* One header, never both: the other one is ignored even from a trusted peer. A balancer
  sets (or appends to) the header it speaks and passes the other through untouched, so
  reading both — or preferring one when present — would let a client choose its address
  by sending the header the balancer does not touch. Several lines of the header are one
  list, in order.
* The list is walked from the right (nearest hop first). Hops that are trusted proxies
  are skipped; the first untrusted hop is the client. If every hop is trusted, the
  left-most one is the client.
* A hop that does not identify itself (``unknown``, an obfuscated ``_name``, or a
  ``Forwarded`` element without ``for=``) stops the walk: nothing to its left can be
  believed, and the last address we could verify — the trusted proxy that reported the
  unknown hop — is used. Returning that proxy errs towards rate-limiting the proxy
  rather than trusting a spoofable value.
* Values are ``IPv4``, ``IPv4:port``, ``[IPv6]``, ``[IPv6]:port`` or bare ``IPv6``;
  IPv4-mapped IPv6 addresses are treated (and returned) as IPv4. Anything else from a
  trusted peer — garbage, more than :data:`MAX_HOPS` hops, more than
  :data:`MAX_HEADER_CHARS` characters — is ``BadRequest(invalid_forwarded_header)``:
  a trusted proxy sending nonsense is a misconfiguration worth surfacing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Literal

from aiohttp import web

from gateway.core.errors import BadRequest, Code
from gateway.http.proxyproto import proxied_peer

__all__ = [
    "CLIENT_ADDRESS_HEADERS",
    "MAX_HEADER_CHARS",
    "MAX_HOPS",
    "PEER_CACHE_SIZE",
    "Headers",
    "Peer",
    "TrustedProxies",
    "client_address_for",
    "connection_peer",
    "effective_client_address",
    "parse_ip",
    "transport_peer",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# aiohttp's CIMultiDictProxy is a Mapping whose items() yields every line; a plain list
# of (name, value) pairs keeps repeated headers too.
Headers = Mapping[str, str] | Iterable[tuple[str, str]]

MAX_HOPS: Final = 32
MAX_HEADER_CHARS: Final = 8192
# Peers remembered per TrustedProxies (:meth:`TrustedProxies.peer`); the oldest goes first.
PEER_CACHE_SIZE: Final = 4096

ClientAddressHeader = Literal["x-forwarded-for", "forwarded"]
CLIENT_ADDRESS_HEADERS: Final[tuple[ClientAddressHeader, ...]] = ("x-forwarded-for", "forwarded")

_UNKNOWN: Final = None  # a hop that does not say who it is
_PORT = r"[0-9]{1,5}"
_OBF = r"_[A-Za-z0-9._-]+"
_V4_PORT = re.compile(rf"^(?P<host>[0-9.]+)(?::(?P<port>{_PORT}|{_OBF}))?$")
_V6_BRACKET = re.compile(rf"^\[(?P<host>[0-9A-Fa-f:.]+)\](?::(?P<port>{_PORT}|{_OBF}))?$")
_OBF_NODE = re.compile(rf"^(?:unknown|{_OBF})(?::(?:{_PORT}|{_OBF}))?$", re.IGNORECASE)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_ip(value: str) -> IPAddress | None:
    """``value`` as an address (IPv4-mapped IPv6 unwrapped to IPv4), or ``None``."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    return _unmapped(addr)


def _unmapped(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The CIDRs whose peers may name the client, and the one header they name it in.

    Parameters:

    * cidrs — networks such as ``10.0.0.0/8`` or ``fd00::/8``; host bits are allowed
      (``10.1.2.3/8`` means ``10.0.0.0/8``). A bad entry raises ``ValueError`` naming it.
    * header — ``"x-forwarded-for"`` (default) or ``"forwarded"``: the only header read.
    """

    def __init__(
        self, cidrs: Sequence[str], *, header: ClientAddressHeader = "x-forwarded-for"
    ) -> None:
        if isinstance(cidrs, str):
            raise TypeError("cidrs must be a sequence of strings, not one string")
        if header not in CLIENT_ADDRESS_HEADERS:
            raise ValueError(
                f"client address header {header!r} is not one of {CLIENT_ADDRESS_HEADERS}"
            )
        self.header: ClientAddressHeader = header
        nets: list[IPNetwork] = []
        for cidr in cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"trusted proxy {cidr!r} is not a CIDR") from exc
        self._v4 = tuple(n for n in nets if isinstance(n, ipaddress.IPv4Network))
        self._v6 = tuple(n for n in nets if isinstance(n, ipaddress.IPv6Network))
        self._peers: dict[str, Peer] = {}

    def peer(self, raw: str) -> Peer:
        """``Peer.of(raw, self)``, remembered for the next connection from ``raw``.

        Parsing an address and checking it against the networks is ~4 µs, paid once per
        connection; a balancer, or a host that connects again, brings the same few
        addresses each time. Keyed by the exact string the transport gave; a Peer
        depends on nothing else (this object's networks and header never change), and
        it is immutable. At most :data:`PEER_CACHE_SIZE` entries, the oldest dropped
        first, so a flood of distinct addresses costs a bounded amount of memory.
        """
        peer = self._peers.get(raw)
        if peer is None:
            peer = Peer.of(raw, self)
            if len(self._peers) >= PEER_CACHE_SIZE:
                del self._peers[next(iter(self._peers))]
            self._peers[raw] = peer
        return peer

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def is_trusted(self, ip: str | IPAddress) -> bool:
        """Whether ``ip`` is inside a trusted network; a non-address is never trusted."""
        addr = parse_ip(ip) if isinstance(ip, str) else _unmapped(ip)
        if addr is None:
            return False
        if isinstance(addr, ipaddress.IPv4Address):
            return any(addr in net for net in self._v4)
        return any(addr in net for net in self._v6)

    def __repr__(self) -> str:
        nets = [str(n) for n in (*self._v4, *self._v6)]
        return f"TrustedProxies({nets!r}, header={self.header!r})"


def _bad(detail: str) -> BadRequest:
    return BadRequest(Code.INVALID_FORWARDED_HEADER, detail=detail)


def _header_lines(headers: Headers, name: str) -> list[str]:
    """Every line of header ``name`` (case-insensitive), in order."""
    pairs: Iterable[tuple[str, str]] = headers.items() if isinstance(headers, Mapping) else headers
    lname = name.lower()
    return [value for key, value in pairs if key.lower() == lname]


def _joined(lines: list[str], name: str) -> str:
    value = ", ".join(lines)
    if len(value) > MAX_HEADER_CHARS:
        raise _bad(f"{name} is {len(value)} characters, more than {MAX_HEADER_CHARS}")
    return value


def _parse_node(raw: str, header: str) -> IPAddress | None:
    """One hop: an address, ``None`` for an unknown/obfuscated hop; garbage raises."""
    value = raw.strip()
    if _OBF_NODE.match(value):
        return _UNKNOWN
    host: str | None = None
    port: str | None = None
    if m := _V6_BRACKET.match(value):
        host, port = m["host"], m["port"]
        addr = parse_ip(host)
        if addr is None or (isinstance(addr, ipaddress.IPv4Address) and ":" not in host):
            raise _bad(f"{header}: {value[:64]!r} is not a bracketed IPv6 address")
    elif m := _V4_PORT.match(value):
        host, port = m["host"], m["port"]
        addr = parse_ip(host)
        if not isinstance(addr, ipaddress.IPv4Address):
            raise _bad(f"{header}: {value[:64]!r} is not an IPv4 address")
    elif ":" in value and (addr := parse_ip(value)) is not None and "%" not in value:
        return addr  # bare IPv6, no port possible
    else:
        raise _bad(f"{header}: {value[:64]!r} is not an address")
    if port is not None and not port.startswith("_") and int(port) > 65535:
        raise _bad(f"{header}: port {port} out of range")
    return addr


def _forwarded_for_values(value: str) -> list[str | None]:
    """The ``for=`` of each RFC 7239 element, ``None`` for an element without one.

    forwarded = 1#forwarded-element; element = [pair] *( ";" [pair] );
    pair = token "=" ( token / quoted-string ). Commas and semicolons inside a quoted
    string do not split, which is why this is a scanner and not ``str.split``.
    """
    out: list[str | None] = []
    i, n = 0, len(value)
    current: str | None = None
    seen_pair = False
    seen_for = False

    def skip_ws(j: int) -> int:
        while j < n and value[j] in " \t":
            j += 1
        return j

    while True:
        i = skip_ws(i)
        if i >= n or value[i] == ",":
            if seen_pair:
                out.append(current)
            current, seen_pair, seen_for = None, False, False
            if i >= n:
                break
            i += 1
            continue
        if value[i] == ";":
            i += 1
            continue
        m = _TOKEN.match(value, i)
        if m is None:
            raise _bad(f"Forwarded: unexpected {value[i]!r} at {i}")
        key = m.group().lower()
        i = skip_ws(m.end())
        if i >= n or value[i] != "=":
            raise _bad(f"Forwarded: parameter {key!r} has no value")
        i = skip_ws(i + 1)
        if i < n and value[i] == '"':
            chars: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise _bad("Forwarded: unterminated quoted string")
                c = value[i]
                if c == "\\":
                    if i + 1 >= n:
                        raise _bad("Forwarded: dangling escape")
                    chars.append(value[i + 1])
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                chars.append(c)
                i += 1
            param = "".join(chars)
        else:
            m = _TOKEN.match(value, i)
            if m is None:
                raise _bad(f"Forwarded: parameter {key!r} has an empty or invalid value")
            param = m.group()
            i = m.end()
        i = skip_ws(i)
        if i < n and value[i] not in ",;":
            raise _bad(f"Forwarded: unexpected {value[i]!r} at {i}")
        seen_pair = True
        if key == "for":
            if seen_for:
                raise _bad("Forwarded: an element has two for= parameters")
            seen_for = True
            current = param
    return out


def _hops(headers: Headers, header: ClientAddressHeader) -> list[IPAddress | None] | None:
    """The hops ``header`` claims, left (farthest) to right; ``None`` if it is absent."""
    if header == "forwarded":
        forwarded = _header_lines(headers, "Forwarded")
        if not forwarded:
            return None
        fors = _forwarded_for_values(_joined(forwarded, "Forwarded"))
        if len(fors) > MAX_HOPS:
            raise _bad(f"Forwarded has {len(fors)} elements, more than {MAX_HOPS}")
        if not fors:
            raise _bad("Forwarded has no elements")
        return [_UNKNOWN if v is None else _parse_node(v, "Forwarded") for v in fors]
    xff = _header_lines(headers, "X-Forwarded-For")
    if not xff:
        return None
    # RFC 9110 §5.6.1: recipients ignore empty list elements.
    items = [p for p in _joined(xff, "X-Forwarded-For").split(",") if p.strip()]
    if len(items) > MAX_HOPS:
        raise _bad(f"X-Forwarded-For has {len(items)} hops, more than {MAX_HOPS}")
    if not items:
        raise _bad("X-Forwarded-For has no addresses")
    return [_parse_node(p, "X-Forwarded-For") for p in items]


def effective_client_address(peer_ip: str, headers: Headers, trusted: TrustedProxies) -> str:
    """The client's address: ``peer_ip`` unless a trusted peer says otherwise.

    ``headers`` keeps repeated lines (aiohttp's ``request.headers`` or a list of pairs).
    The result is a normalised address string (IPv4-mapped IPv6 as IPv4); a peer that is
    not an address at all (a UNIX socket) is returned unchanged and trusted for nothing.
    Raises ``BadRequest(invalid_forwarded_header)`` only for a trusted peer's headers.
    """
    return Peer.of(peer_ip, trusted).client_address(headers, trusted)


class Peer:
    """A connection's peer, decided once per connection (:func:`connection_peer`).

    * raw — the PROXY-protocol source or the TCP peer, as the transport gave it;
    * address — the same, normalised (IPv4-mapped IPv6 as IPv4; ``raw`` if it is not an
      address at all, as for a UNIX socket);
    * trusted — whether it is a trusted proxy, whose forwarding header is then read on
      every request (the header, unlike the peer, changes from request to request).
    """

    __slots__ = ("_ip", "address", "raw", "trusted")

    def __init__(self, raw: str, ip: IPAddress | None, trusted: bool) -> None:
        self.raw = raw
        self._ip = ip
        self.address = str(ip) if ip is not None else raw
        self.trusted = trusted

    @classmethod
    def of(cls, raw: str, trusted: TrustedProxies) -> Peer:
        ip = parse_ip(raw)
        return cls(raw, ip, ip is not None and trusted.is_trusted(ip))

    def client_address(self, headers: Headers, trusted: TrustedProxies) -> str:
        """The client's address for one request with these headers."""
        if not self.trusted or self._ip is None:
            return self.address
        hops = _hops(headers, trusted.header)
        if hops is None:
            return self.address
        last_known: IPAddress = self._ip
        for hop in reversed(hops):
            if hop is _UNKNOWN:
                return str(last_known)
            if not trusted.is_trusted(hop):
                return str(hop)
            last_known = hop
        return str(last_known)  # every hop trusted: the left-most one

    def __repr__(self) -> str:
        return f"Peer({self.raw!r}, trusted={self.trusted})"


def transport_peer(request: web.Request) -> str:
    """The connection's peer before any header is believed: the PROXY-protocol source
    when the listener got one, else the TCP peer (what to log when the headers are bad).
    """
    transport = request.transport
    if transport is not None:
        proxied = proxied_peer(transport)
        if proxied is not None:
            return proxied
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
    return request.remote or "unknown"


def connection_peer(request: web.Request, trusted: TrustedProxies) -> Peer:
    """The peer of ``request``'s connection, parsed and checked against ``trusted`` at
    its first request and kept on the connection's handler for the next ones.

    Safe to keep: a connection's PROXY-protocol source and TCP peer never change while it
    is open, and ``trusted`` is the app's, fixed at start. A handler that cannot keep it
    (aiohttp's own, in tests) gets it worked out afresh each time.
    """
    protocol = request.protocol
    peer = getattr(protocol, "client_peer", None)
    if isinstance(peer, Peer):
        return peer
    peer = trusted.peer(transport_peer(request))
    if hasattr(protocol, "client_peer"):
        protocol.client_peer = peer
    return peer


def client_address_for(request: web.Request, trusted: TrustedProxies) -> str:
    """The client address of ``request``: PROXY-protocol source, else the TCP peer, then
    the forwarding headers if that peer is trusted."""
    return connection_peer(request, trusted).client_address(request.headers, trusted)
