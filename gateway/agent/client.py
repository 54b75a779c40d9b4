"""Client for the gateway's wire protocol v1 (DESIGN §2): challenge, then join.

Reused as is by the demo and the join-storm benchmark, which pass their own session and URL.
Every failure becomes a :class:`JoinError` carrying the gateway's stable ``code`` (or one of
ours for transport failures) and whether a fresh attempt can cure it.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import aiohttp

from gateway.agent.errors import AgentCode, JoinError
from gateway.agent.transport import read_capped
from gateway.core.clock import Clock, SystemClock
from gateway.core.httputil import TRANSPORT_ERRORS, Failure, classify, describe, parse_retry_after
from gateway.protocol import (
    CHALLENGE_PATH,
    JOIN_PATH,
    ChallengeResponse,
    ErrorBody,
    HostParams,
    WireError,
    build_join_body,
)

__all__ = [
    "CHALLENGE_PATH",
    "JOIN_PATH",
    "GatewayClient",
    "HostParams",
    "build_join_body",
]

log = logging.getLogger(__name__)

MAX_RESPONSE = 1024 * 1024  # certificates for one node are a few KiB


class GatewayClient:
    """The gateway's two endpoints over one session; reusable by the demo and benchmarks.

    Parameters:
        session: HTTP session (its connector decides source address and default TLS trust).
        base_url: ``https://host:port`` of the gateway (or its load balancer).
        ssl_context: TLS context per request; ``None`` uses the session's connector default.
        timeout: seconds per request.
        clock: for ``Retry-After`` given as an HTTP-date.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock: Clock = clock or SystemClock()

    def __repr__(self) -> str:
        return f"GatewayClient(base_url={self._base!r})"

    async def challenge(self) -> str:
        """A fresh challenge (the IMDS nonce for this attempt)."""
        body = await self._post(CHALLENGE_PATH, {})
        try:
            return ChallengeResponse.from_json(body).challenge
        except WireError as exc:
            raise JoinError(200, AgentCode.BAD_RESPONSE, exc.message, transient=False) from exc

    async def join(self, body: dict[str, Any]) -> dict[str, Any]:
        """Submit the join; the ``200`` body (``host_id``, ``certs``, ``join``)."""
        return await self._post(JOIN_PATH, body)

    def _transport_error(self, path: str, exc: BaseException) -> JoinError:
        failure = classify(exc)
        if failure is Failure.TLS:
            # A certificate we do not trust is not going to fix itself on retry.
            return JoinError(
                0,
                AgentCode.TLS_VERIFY_FAILED,
                f"TLS to {self._base} failed: {exc}",
                transient=False,
            )
        if failure is Failure.TIMEOUT:
            return JoinError(
                0,
                AgentCode.TIMEOUT,
                f"{path}: no answer within {self._timeout.total}s",
                transient=True,
            )
        where = f"cannot connect to {self._base}" if failure is Failure.CONNECT else "failed"
        return JoinError(
            0, AgentCode.CONNECTION_FAILED, f"{path}: {where}: {describe(exc)}", transient=True
        )

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = self._base + path
        try:
            async with self._session.post(
                url,
                json=payload,
                timeout=self._timeout,
                ssl=self._ssl,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                retry_after = parse_retry_after(
                    resp.headers.get("Retry-After"), now=self._clock.now()
                )
                raw = await read_capped(resp, MAX_RESPONSE)
        except TRANSPORT_ERRORS as exc:
            raise self._transport_error(path, exc) from exc
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if status == 200:
            if not isinstance(body, dict):
                raise JoinError(
                    status,
                    AgentCode.BAD_RESPONSE,
                    f"{path}: 200 without a JSON object",
                    transient=False,
                )
            return body
        code, message = _error_fields(body, status)
        log.debug("%s answered %s %s", path, status, code)
        raise JoinError(status, code, message, retry_after)


def _error_fields(body: object, status: int) -> tuple[str, str]:
    """``{"error": {"code", "message"}}`` → (code, message).

    A proxy's HTML error page has no code: it becomes ``http_<status>``.
    """
    err = ErrorBody.from_json(body)
    if err is None:
        return f"http_{status}", f"HTTP {status} without an error body"
    return err.code, err.message
