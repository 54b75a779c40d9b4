"""A strict DER reader: just enough ASN.1 to walk a known structure, fast.

Every read is bounds-checked against the enclosing element; what is not DER is an error:
indefinite lengths (BER), non-minimal length octets, lengths running past their parent,
multi-byte (high) tag numbers, empty OIDs or INTEGERs. Nothing is decoded that the caller
does not ask for: the reader hands back offsets, so a certificate stays a byte slice until
someone loads it. Errors are :class:`DerError` (a ``ValueError``); the caller translates
them into its own code at its boundary.
"""

from __future__ import annotations

__all__ = [
    "TAG_CONTEXT_0",
    "TAG_CONTEXT_1",
    "TAG_INTEGER",
    "TAG_OCTET_STRING",
    "TAG_OID",
    "TAG_SEQUENCE",
    "TAG_SET",
    "DerError",
    "expect",
    "read_integer",
    "read_oid",
    "read_tlv",
]

TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_SEQUENCE = 0x30
TAG_SET = 0x31
TAG_CONTEXT_0 = 0xA0  # [0] constructed
TAG_CONTEXT_1 = 0xA1  # [1] constructed

# Lengths beyond 4 octets would describe more than 4 GiB: never a document of ours.
_MAX_LENGTH_OCTETS = 4

# The OIDs a document carries repeat on every join: decoding each costs a loop in Python.
# Bounded: an attacker sending fresh OIDs must not grow it.
_OID_CACHE: dict[bytes, str] = {}
_OID_CACHE_MAX = 256


class DerError(ValueError):
    """The bytes are not strict DER, or not the element the caller expected."""


def read_tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The element at ``buf[pos:end]``: ``(tag, content_start, content_end)``."""
    if pos + 2 > end:
        raise DerError(f"element header at offset {pos} runs past its parent")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte tag at offset {pos}")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DerError(f"indefinite length at offset {pos - 2} (BER, not DER)")
    else:
        count = first & 0x7F
        if count > _MAX_LENGTH_OCTETS or pos + count > end:
            raise DerError(f"length of {count} octets at offset {pos - 2}")
        # One or two length octets (every element of a document): no slice, no call.
        if count == 1:
            length = buf[pos]
        elif count == 2:
            length = buf[pos] << 8 | buf[pos + 1]
        else:
            length = int.from_bytes(buf[pos : pos + count], "big")
        # DER: the shortest form, so no leading zero octet and no long form under 128.
        if buf[pos] == 0 or length < 0x80:
            raise DerError(f"non-minimal length at offset {pos - 2}")
        pos += count
    content_end = pos + length
    if content_end > end:
        raise DerError(f"element at offset {pos} is longer than its parent")
    return tag, pos, content_end


def expect(buf: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    """The element at ``pos`` must carry ``tag``: its ``(content_start, content_end)``."""
    got, start, content_end = read_tlv(buf, pos, end)
    if got != tag:
        raise DerError(f"{what}: expected tag 0x{tag:02x}, found 0x{got:02x}")
    return start, content_end


def read_integer(buf: bytes, start: int, end: int) -> int:
    """An INTEGER's content octets (two's complement, big-endian)."""
    if start == end:
        raise DerError("empty INTEGER")
    return int.from_bytes(buf[start:end], "big", signed=True)


def read_oid(buf: bytes, start: int, end: int) -> str:
    """An OBJECT IDENTIFIER's content octets, dotted."""
    raw = buf[start:end]
    dotted = _OID_CACHE.get(raw)
    if dotted is not None:
        return dotted
    if not raw or raw[-1] & 0x80:
        raise DerError("empty or unterminated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for octet in raw:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    # X.690 §8.19.4: the first subidentifier packs the first two arcs.
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    dotted = ".".join(str(arc) for arc in head + arcs[1:])
    if len(_OID_CACHE) >= _OID_CACHE_MAX:
        _OID_CACHE.clear()
    _OID_CACHE[raw] = dotted
    return dotted
