"""The HTTP side of the join API's decoding: the protocol decodes, we translate its errors.

The rules live in ``gateway.protocol`` (shared with the agent and the auth service); this
module only turns a :class:`~gateway.protocol.WireError` into the gateway's own error at
the boundary, so the one error middleware renders it.
"""

from __future__ import annotations

from gateway.core.errors import from_wire
from gateway.protocol import JoinRequest, WireError
from gateway.protocol import join as wire

__all__ = ["decode_challenge_request", "decode_join_request"]


def decode_challenge_request(raw: bytes) -> None:
    """The challenge request is an empty body or ``{}``; raises ``BadRequest``."""
    try:
        wire.decode_challenge_request(raw)
    except WireError as exc:
        raise from_wire(exc) from exc


def decode_join_request(
    raw: bytes, *, client_address: str, max_bytes: int = wire.MAX_BODY_BYTES
) -> JoinRequest:
    """The join body → :class:`JoinRequest`; raises ``BadRequest`` or ``PayloadTooLarge``."""
    try:
        return wire.decode_join_request(raw, client_address=client_address, max_bytes=max_bytes)
    except WireError as exc:
        raise from_wire(exc) from exc
