"""Who the client is: trusted proxies, Forwarded and X-Forwarded-For (DESIGN §6)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.errors import BadRequest, Code
from gateway.http.proxy import MAX_HOPS, TrustedProxies, effective_client_address

LB = "10.0.0.5"  # a load balancer inside the trusted range
TRUSTED = TrustedProxies(["10.0.0.0/8", "fd00::/8", "192.168.1.1/32"])
TRUSTED_FORWARDED = TrustedProxies(["10.0.0.0/8", "fd00::/8", "192.168.1.1/32"], header="forwarded")

Pairs = list[tuple[str, str]]


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("192.168.1.1", True),
        ("192.168.1.2", False),
        ("fd00::1", True),
        ("fe80::1", False),
        ("::ffff:10.9.9.9", True),
        ("::ffff:11.9.9.9", False),
        ("not-an-ip", False),
        ("", False),
    ],
    ids=[
        "an IPv4 address inside a trusted /8 is trusted",
        "an IPv4 address outside every range is not trusted",
        "a /32 trusts exactly its address",
        "a /32 does not trust its neighbour",
        "an IPv6 address inside a trusted /8 is trusted",
        "an IPv6 address outside every range is not trusted",
        "an IPv4-mapped IPv6 address is matched against the IPv4 ranges",
        "an IPv4-mapped IPv6 address outside the IPv4 ranges is not trusted",
        "a string that is not an address is never trusted",
        "an empty string is never trusted",
    ],
)
def test_is_trusted(ip: str, expected: bool) -> None:
    assert TRUSTED.is_trusted(ip) is expected


def test_no_cidrs_trusts_nobody() -> None:
    nobody = TrustedProxies([])
    assert not nobody
    assert not nobody.is_trusted("127.0.0.1")
    assert effective_client_address("127.0.0.1", [("X-Forwarded-For", "1.2.3.4")], nobody) == (
        "127.0.0.1"
    )


@pytest.mark.parametrize(
    "cidrs",
    [["10.0.0.0/33"], ["nonsense"], ["10.0.0.0/8", "fd00::/129"]],
    ids=[
        "a prefix too long for IPv4 is refused",
        "a word is refused",
        "one bad entry among good ones is refused",
    ],
)
def test_bad_cidr_is_refused(cidrs: list[str]) -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        TrustedProxies(cidrs)


RESOLVE_CASES: list[tuple[str, str, Pairs, str]] = [
    (
        "an untrusted peer's forged X-Forwarded-For is ignored",
        "203.0.113.9",
        [("X-Forwarded-For", "1.2.3.4")],
        "203.0.113.9",
    ),
    (
        "an untrusted peer's forged Forwarded is ignored",
        "203.0.113.9",
        [("Forwarded", "for=1.2.3.4")],
        "203.0.113.9",
    ),
    (
        "an untrusted peer's garbage headers are ignored, not rejected",
        "203.0.113.9",
        [("X-Forwarded-For", "<script>"), ("Forwarded", "for=;;==")],
        "203.0.113.9",
    ),
    ("a trusted peer without headers is the client", LB, [], LB),
    (
        "a trusted peer's single X-Forwarded-For hop is the client",
        LB,
        [("X-Forwarded-For", "198.51.100.7")],
        "198.51.100.7",
    ),
    (
        "the right-most untrusted hop is the client, not the forged left-most one",
        LB,
        [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.0.0.9")],
        "198.51.100.7",
    ),
    (
        "trusted hops on the right are skipped",
        LB,
        [("X-Forwarded-For", "198.51.100.7, 10.0.0.8, 10.0.0.9")],
        "198.51.100.7",
    ),
    (
        "if every hop is trusted the left-most one is the client",
        LB,
        [("X-Forwarded-For", "10.0.0.1, 10.0.0.2")],
        "10.0.0.1",
    ),
    (
        "several X-Forwarded-For lines are one list in order",
        LB,
        [("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-For", "10.0.0.3")],
        "198.51.100.7",
    ),
    (
        "the header name is case-insensitive",
        LB,
        [("x-forwarded-for", "198.51.100.7")],
        "198.51.100.7",
    ),
    (
        "an IPv4 hop with a port loses the port",
        LB,
        [("X-Forwarded-For", "198.51.100.7:4711")],
        "198.51.100.7",
    ),
    (
        "a bracketed IPv6 hop with a port is accepted",
        LB,
        [("X-Forwarded-For", "[2001:db8::1]:4711")],
        "2001:db8::1",
    ),
    (
        "a bracketed IPv6 hop without a port is accepted",
        LB,
        [("X-Forwarded-For", "[2001:db8::1]")],
        "2001:db8::1",
    ),
    (
        "a bare IPv6 hop is accepted and normalised",
        LB,
        [("X-Forwarded-For", "2001:DB8:0::1")],
        "2001:db8::1",
    ),
    (
        "an IPv4-mapped IPv6 hop is returned as IPv4",
        LB,
        [("X-Forwarded-For", "::ffff:198.51.100.7")],
        "198.51.100.7",
    ),
    (
        "a trusted IPv4-mapped IPv6 peer is trusted and unwrapped",
        "::ffff:10.0.0.5",
        [("X-Forwarded-For", "198.51.100.7")],
        "198.51.100.7",
    ),
    (
        "an untrusted IPv4-mapped peer is returned as IPv4",
        "::ffff:203.0.113.9",
        [],
        "203.0.113.9",
    ),
    (
        "empty X-Forwarded-For list elements are ignored",
        LB,
        [("X-Forwarded-For", " , 198.51.100.7 ,,")],
        "198.51.100.7",
    ),
    (
        "an unknown X-Forwarded-For hop yields the peer",
        LB,
        [("X-Forwarded-For", "6.6.6.6, unknown")],
        LB,
    ),
    (
        "exactly the maximum number of hops is accepted",
        LB,
        [("X-Forwarded-For", ", ".join(["10.0.0.1"] * MAX_HOPS))],
        "10.0.0.1",
    ),
    (
        "Forwarded is ignored when X-Forwarded-For is the configured header",
        LB,
        [("X-Forwarded-For", "198.51.100.7"), ("Forwarded", "for=6.6.6.6")],
        "198.51.100.7",
    ),
    (
        "a trusted peer's Forwarded alone is ignored when X-Forwarded-For is configured",
        LB,
        [("Forwarded", "for=203.0.113.66")],
        LB,
    ),
    (
        "a trusted peer's garbage Forwarded is ignored, not rejected, when it is not configured",
        LB,
        [("Forwarded", "for=;;==")],
        LB,
    ),
]

# The same walk through RFC 7239 Forwarded, with ``proxy.client_address_header: forwarded``.
FORWARDED_CASES: list[tuple[str, str, Pairs, str]] = [
    (
        "a Forwarded for= is the client",
        LB,
        [("Forwarded", "for=198.51.100.7;proto=https;by=10.0.0.5")],
        "198.51.100.7",
    ),
    (
        "a quoted bracketed IPv6 Forwarded for= with a port is accepted",
        LB,
        [("Forwarded", 'for="[2001:db8:cafe::17]:4711"')],
        "2001:db8:cafe::17",
    ),
    (
        "a Forwarded chain is walked from the right, skipping trusted hops",
        LB,
        [("Forwarded", 'for=6.6.6.6, for=198.51.100.7;proto=https, for="10.0.0.2:80"')],
        "198.51.100.7",
    ),
    (
        "several Forwarded lines are one list in order",
        LB,
        [("Forwarded", "for=198.51.100.7"), ("Forwarded", "For=10.0.0.2")],
        "198.51.100.7",
    ),
    (
        "a quoted comma or semicolon does not split a Forwarded element",
        LB,
        [("Forwarded", 'host="a,b;c";for=198.51.100.7')],
        "198.51.100.7",
    ),
    (
        "an obfuscated hop stops the walk at the trusted proxy that reported it",
        LB,
        [("Forwarded", "for=6.6.6.6, for=_hidden, for=10.0.0.2")],
        "10.0.0.2",
    ),
    (
        "an unknown hop right behind the peer yields the peer",
        LB,
        [("Forwarded", "for=6.6.6.6, for=unknown")],
        LB,
    ),
    (
        "a Forwarded element without for= is an unknown hop",
        LB,
        [("Forwarded", "proto=https;host=example.com")],
        LB,
    ),
    (
        "an obfuscated port does not hide a real address",
        LB,
        [("Forwarded", 'for="198.51.100.7:_abc"')],
        "198.51.100.7",
    ),
    (
        "X-Forwarded-For is ignored when Forwarded is the configured header",
        LB,
        [("X-Forwarded-For", "6.6.6.6"), ("Forwarded", "for=198.51.100.7")],
        "198.51.100.7",
    ),
    (
        "a trusted peer's X-Forwarded-For alone is ignored when Forwarded is configured",
        LB,
        [("X-Forwarded-For", "203.0.113.66")],
        LB,
    ),
]


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [c[1:] for c in RESOLVE_CASES],
    ids=[c[0] for c in RESOLVE_CASES],
)
def test_effective_client_address(peer: str, headers: Pairs, expected: str) -> None:
    assert effective_client_address(peer, headers, TRUSTED) == expected


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [c[1:] for c in FORWARDED_CASES],
    ids=[c[0] for c in FORWARDED_CASES],
)
def test_effective_client_address_from_forwarded(peer: str, headers: Pairs, expected: str) -> None:
    assert effective_client_address(peer, headers, TRUSTED_FORWARDED) == expected


def test_an_unknown_client_address_header_is_refused() -> None:
    with pytest.raises(ValueError, match="x-real-ip"):
        TrustedProxies(["10.0.0.0/8"], header="x-real-ip")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-For", "10.0.0.3")], "198.51.100.7"),
        ({"x-forwarded-for": "198.51.100.7"}, "198.51.100.7"),
    ],
    ids=[
        "aiohttp's multi-value header proxy keeps every line",
        "a plain dict with a lower-case name works",
    ],
)
def test_header_containers(headers: Pairs | dict[str, str], expected: str) -> None:
    container: CIMultiDictProxy[str] | dict[str, str] = (
        CIMultiDictProxy(CIMultiDict(headers)) if isinstance(headers, list) else headers
    )
    assert effective_client_address(LB, container, TRUSTED) == expected


MALFORMED_CASES: list[tuple[str, Pairs]] = [
    ("a word is not an address", [("X-Forwarded-For", "evil.example.com")]),
    ("an IPv4 address with a bad octet", [("X-Forwarded-For", "198.51.100.256")]),
    ("an IPv4 address with a port over 65535", [("X-Forwarded-For", "198.51.100.7:65536")]),
    ("an IPv4 address with an empty port", [("X-Forwarded-For", "198.51.100.7:")]),
    ("an unterminated bracket", [("X-Forwarded-For", "[2001:db8::1")]),
    ("an IPv4 address in brackets", [("X-Forwarded-For", "[198.51.100.7]")]),
    ("a zone id on a bare IPv6 address", [("X-Forwarded-For", "fe80::1%eth0")]),
    ("a header that is only commas", [("X-Forwarded-For", " , ,")]),
    ("more hops than the maximum", [("X-Forwarded-For", ", ".join(["10.0.0.1"] * 33))]),
    ("a header longer than the maximum", [("X-Forwarded-For", "1" * 9000)]),
    ("a Forwarded parameter without a value", [("Forwarded", "for")]),
    ("a Forwarded unterminated quoted string", [("Forwarded", 'for="198.51.100.7')]),
    ("a Forwarded garbage for= value", [("Forwarded", "for=nonsense")]),
    ("a Forwarded element with two for= parameters", [("Forwarded", "for=1.2.3.4;for=5.6.7.8")]),
    ("Forwarded junk after a value", [("Forwarded", "for=1.2.3.4 proto=http")]),
    ("a Forwarded header with no elements", [("Forwarded", " , ")]),
    ("a Forwarded empty value", [("Forwarded", "for=;proto=https")]),
    (
        "a Forwarded chain longer than the maximum",
        [("Forwarded", ", ".join(["for=10.0.0.1"] * 33))],
    ),
]


@pytest.mark.parametrize(
    "headers",
    [c[1] for c in MALFORMED_CASES],
    ids=[f"{c[0]} from a trusted peer is rejected" for c in MALFORMED_CASES],
)
def test_malformed_from_trusted_peer(headers: Pairs) -> None:
    forwarded = any(name == "Forwarded" for name, _ in headers)
    with pytest.raises(BadRequest) as info:
        effective_client_address(LB, headers, TRUSTED_FORWARDED if forwarded else TRUSTED)
    assert info.value.code is Code.INVALID_FORWARDED_HEADER
    assert info.value.status == 400


def test_non_ip_peer_is_returned_unchanged_and_headers_ignored() -> None:
    assert effective_client_address("unknown", [("X-Forwarded-For", "1.2.3.4")], TRUSTED) == (
        "unknown"
    )
