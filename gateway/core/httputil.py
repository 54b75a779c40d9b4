"""HTTP client plumbing every outbound client shares: capped reads, ``Retry-After``, and
what an aiohttp failure means.

Each client (Entra ID keys, AIA, Resource Manager, the auth service, and the agent's calls
to IMDS and the gateway) still decides what a failure means *for it* — a refused key fetch
is a 503, a refused AIA fetch a cached policy refusal — but the facts it decides on come
from here, in one place: whether the body fit (:func:`read_capped`), how long the server
asked us to wait (:func:`parse_retry_after`), and which kind of transport failure an
exception is (:func:`classify`), as httpcore's ``map_exceptions`` does for its backends.
"""

from __future__ import annotations

import math
from datetime import datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

import aiohttp

__all__ = [
    "MAX_RETRY_AFTER",
    "TRANSPORT_ERRORS",
    "Failure",
    "ResponseTooLarge",
    "classify",
    "describe",
    "parse_retry_after",
    "read_capped",
]

# A server asking for more than an hour is misconfigured: nobody parks a node that long.
MAX_RETRY_AFTER = 3600.0
_CHUNK = 64 * 1024

# What one aiohttp request can raise besides our own errors (a total timeout is a
# TimeoutError, not a ClientError).
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)


class ResponseTooLarge(aiohttp.ClientPayloadError):
    """The body is larger than the caller's cap (announced or actually sent).

    A ``ClientPayloadError``, so a client that treats every transport failure alike needs
    no extra clause; one that means something else by it catches it first."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        self.limit = limit
        self.size = size
        told = f"body of {size} bytes" if size is not None else "body"
        super().__init__(f"{told} exceeds {limit} bytes")


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes with :class:`ResponseTooLarge`.

    A ``Content-Length`` above the cap is refused before reading; a body that lies about
    its length (or is chunked) is cut off at the first chunk past the cap."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ResponseTooLarge(limit, resp.content_length)
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise ResponseTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_retry_after(
    value: str | None, *, now: datetime | None = None, cap: float = MAX_RETRY_AFTER
) -> float | None:
    """``Retry-After`` as seconds (RFC 9110 §10.2.3), at most ``cap``; else ``None``.

    Delta-seconds (a decimal is accepted, a negative number or NaN is not) or an HTTP-date,
    which needs ``now`` (an aware datetime from the injected clock); a date in the past
    means "now" (0). Anything unreadable is ``None``: the caller's default applies."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if math.isnan(seconds) or seconds < 0:
            return None
        return min(seconds, cap)
    if now is None:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive: the RFC says GMT, we cannot be sure
        return None
    return min(max(0.0, (when - now).total_seconds()), cap)


class Failure(StrEnum):
    """What went wrong with one request, as far as a retry decision cares."""

    TLS = "tls"  # handshake or certificate: the same call fails again
    CONNECT = "connect"  # no connection was made: nothing was sent
    DISCONNECTED = "disconnected"  # reset or closed before a whole answer came back
    TIMEOUT = "timeout"  # the call's deadline passed (our budget is spent)
    TOO_LARGE = "too_large"  # the answer was bigger than we accept
    OTHER = "other"  # malformed HTTP, a bad payload, anything else aiohttp raises


def classify(exc: BaseException) -> Failure:
    """The :class:`Failure` an exception of :data:`TRANSPORT_ERRORS` stands for.

    Order matters: aiohttp's certificate error is also a connector error, and its server
    timeout is also a connection error."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return Failure.TLS
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Failure.CONNECT
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return Failure.DISCONNECTED
    if isinstance(exc, ResponseTooLarge):
        return Failure.TOO_LARGE
    return Failure.OTHER


def describe(exc: BaseException) -> str:
    """``Type: message`` for logs and error details (never includes request headers)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
