"""PROXY protocol v1/v2 parsing: bytes in, (info, consumed) out (DESIGN §6)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from gateway.http.proxyproto import (
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyInfo,
    ProxyProtocolError,
    parse_proxy_header,
)

TLS = b"\x16\x03\x01\x02\x00\x01"  # the start of a ClientHello that must stay unread


def v2(
    *,
    ver_cmd: int = 0x21,
    fam: int = 0x11,
    src: str = "198.51.100.7",
    dst: str = "10.0.0.1",
    sport: int = 4711,
    dport: int = 443,
    tlvs: bytes = b"",
    body: bytes | None = None,
    length: int | None = None,
) -> bytes:
    if body is None:
        body = (
            ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed
            + struct.pack("!HH", sport, dport)
            + tlvs
        )
    n = len(body) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", n) + body


V1_TCP4 = b"PROXY TCP4 198.51.100.7 10.0.0.1 4711 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n"
TLV_AWS = b"\xea\x00\x05\x01vpce"  # a PP2_TYPE_AWS-style TLV, skipped

OK_CASES: list[tuple[str, bytes, ProxyInfo, int]] = [
    (
        "a v1 TCP4 header gives the source and leaves TLS bytes unread",
        V1_TCP4 + TLS,
        ProxyInfo(1, "PROXY", "198.51.100.7", 4711, "10.0.0.1", 443),
        len(V1_TCP4),
    ),
    (
        "a v1 TCP6 header gives the source",
        V1_TCP6,
        ProxyInfo(1, "PROXY", "2001:db8::7", 65535, "2001:db8::1", 443),
        len(V1_TCP6),
    ),
    (
        "a v1 UNKNOWN header has no source",
        b"PROXY UNKNOWN\r\n" + TLS,
        ProxyInfo(1, "PROXY"),
        15,
    ),
    (
        "a v1 UNKNOWN header ignores what follows the word",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ProxyInfo(1, "PROXY"),
        35,
    ),
    (
        "a v1 port of zero is allowed",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0 443\r\n",
        ProxyInfo(1, "PROXY", "1.2.3.4", 0, "5.6.7.8", 443),
        34,
    ),
    (
        "a v2 TCP4 header gives the source and leaves TLS bytes unread",
        v2() + TLS,
        ProxyInfo(2, "PROXY", "198.51.100.7", 4711, "10.0.0.1", 443),
        len(v2()),
    ),
    (
        "a v2 TCP6 header gives the source",
        v2(fam=0x21, src="2001:db8::7", dst="2001:db8::1"),
        ProxyInfo(2, "PROXY", "2001:db8::7", 4711, "2001:db8::1", 443),
        16 + 36,
    ),
    (
        "v2 TLVs after the addresses are skipped",
        v2(tlvs=TLV_AWS) + TLS,
        ProxyInfo(2, "PROXY", "198.51.100.7", 4711, "10.0.0.1", 443),
        16 + 12 + len(TLV_AWS),
    ),
    (
        "a v2 LOCAL header has no source, whatever its body",
        v2(ver_cmd=0x20, fam=0x00, body=b"junk"),
        ProxyInfo(2, "LOCAL"),
        20,
    ),
    (
        "a v2 LOCAL header may be empty",
        v2(ver_cmd=0x20, fam=0x00, body=b""),
        ProxyInfo(2, "LOCAL"),
        16,
    ),
    (
        "a v2 PROXY header with the unspecified family has no source",
        v2(fam=0x00, body=b""),
        ProxyInfo(2, "PROXY"),
        16,
    ),
    (
        "a v2 PROXY header with a UNIX family has no source",
        v2(fam=0x31, body=b"\x00" * 216),
        ProxyInfo(2, "PROXY"),
        16 + 216,
    ),
    (
        "a v2 header of exactly the maximum length is accepted",
        v2(tlvs=b"\x00" * (MAX_V2_LENGTH - 12)),
        ProxyInfo(2, "PROXY", "198.51.100.7", 4711, "10.0.0.1", 443),
        16 + MAX_V2_LENGTH,
    ),
]


@pytest.mark.parametrize(
    ("data", "info", "consumed"),
    [c[1:] for c in OK_CASES],
    ids=[c[0] for c in OK_CASES],
)
def test_parse_complete(data: bytes, info: ProxyInfo, consumed: int) -> None:
    assert parse_proxy_header(data) == (info, consumed)


@pytest.mark.parametrize(
    "header",
    [V1_TCP4, V1_TCP6, b"PROXY UNKNOWN\r\n", v2(), v2(fam=0x21, src="::1", dst="::2")],
    ids=[
        "every prefix of a v1 TCP4 header needs more bytes",
        "every prefix of a v1 TCP6 header needs more bytes",
        "every prefix of a v1 UNKNOWN header needs more bytes",
        "every prefix of a v2 TCP4 header needs more bytes",
        "every prefix of a v2 TCP6 header needs more bytes",
    ],
)
def test_truncated_needs_more(header: bytes) -> None:
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) == (None, 0), cut
    assert parse_proxy_header(header)[1] == len(header)


BAD_CASES: list[tuple[str, bytes]] = [
    ("a TLS ClientHello fails on its first byte", TLS),
    ("an HTTP request fails on its first byte", b"GET / HTTP/1.1\r\n"),
    ("a word that is not PROXY fails before the line ends", b"PROXZ"),
    ("a v1 line ending in a bare LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
    ("a v1 line with a CR not followed by LF", b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n"),
    ("a v1 line longer than 107 bytes", b"PROXY UNKNOWN " + b"x" * 100),
    ("a v1 unknown protocol", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("a v1 line with too few fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
    ("a v1 line with too many fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
    ("a v1 line with two spaces", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
    ("a v1 TCP4 line carrying IPv6", b"PROXY TCP4 ::1 ::2 1 2\r\n"),
    ("a v1 TCP6 line carrying IPv4", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("a v1 address that is a name", b"PROXY TCP4 example.com 5.6.7.8 1 2\r\n"),
    ("a v1 port over 65535", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
    ("a v1 port with a leading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"),
    ("a v1 port that is not a number", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
    ("a v1 line with non-ASCII bytes", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n"),
    ("a v1 line with no protocol", b"PROXY \r\n"),
    ("a wrong v2 signature", b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + b"\x00" * 12),
    ("a v2 header with version 1", v2(ver_cmd=0x11)),
    ("a v2 header with an undefined command", v2(ver_cmd=0x22)),
    ("a v2 header with an undefined family", v2(fam=0x41)),
    ("a v2 header with the datagram transport", v2(fam=0x12)),
    ("a v2 header with an undefined transport", v2(fam=0x13)),
    ("a v2 TCP4 body too short for its addresses", v2(body=b"\x01\x02\x03\x04")),
    ("a v2 TCP6 body too short for its addresses", v2(fam=0x21, body=b"\x00" * 35)),
    ("an oversized v2 length is refused before the body arrives", v2(body=b"", length=4097)),
]


@pytest.mark.parametrize("data", [c[1] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_parse_malformed(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data)


def test_empty_input_needs_more() -> None:
    assert parse_proxy_header(b"") == (None, 0)


def test_max_v2_length_is_a_parameter() -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(v2(tlvs=b"\x00" * 100), max_v2_length=64)
    assert parse_proxy_header(v2(tlvs=b"\x00" * 100), max_v2_length=112)[1] == 128
