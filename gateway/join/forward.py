"""Forwarding an approved registration to the auth service (DESIGN §4).

The registration API itself (``Registration``, ``RegisterResult``, paths, rules) is
``gateway.protocol``'s; this module is the gateway's client for it.

``AuthClient.register`` is the gateway's one call to the auth service: ``POST
{upstream}/v1/register`` over mTLS, with the challenge as idempotency key. Because the
key makes the call idempotent, a retry can never register a node twice, so the client
retries where a retry is *safe and useful*: the connection failed or was reset before an
answer, or the service answered 502/503/504. It never retries a 4xx (our request is wrong;
sending it again changes nothing), a timeout (the budget is spent; the agent retries), a 503
with ``Retry-After`` (the service said when; the agent is told) nor ``signing_refused``.

A :class:`CircuitBreaker` sits in front: after ``failure_threshold`` consecutive failed
registrations it opens, and for ``reset_timeout`` seconds every call fails at once with
``Overloaded(UPSTREAM_UNAVAILABLE, retry_after=<time left>)`` — a dead auth service then
costs microseconds per join, not a timeout each. Then one probe is let through
(half-open); its outcome closes or re-opens the circuit.

Every aiohttp exception is translated here into ``gateway.core.errors``; none escapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from enum import StrEnum
from typing import Self

import aiohttp

from gateway.core.clock import Clock
from gateway.core.errors import (
    BadRequest,
    Code,
    GatewayError,
    JoinRejected,
    Overloaded,
    UpstreamFailed,
)
from gateway.core.httputil import (
    TRANSPORT_ERRORS,
    Failure,
    classify,
    describe,
    parse_retry_after,
    read_capped,
)
from gateway.protocol import (
    HEALTH_PATH,
    REGISTER_PATH,
    ErrorBody,
    RegisterCode,
    RegisterResult,
    Registration,
)

__all__ = ["AuthClient", "BreakerState", "CircuitBreaker"]

log = logging.getLogger(__name__)

_RETRYABLE_STATUSES = frozenset({502, 503, 504})
_MAX_RESPONSE_BYTES = 1 << 20
# When a failure gives no better hint, agents are told to come back after this long.
_DEFAULT_RETRY_AFTER = 1.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed → (``failure_threshold`` consecutive failures) → open → (``reset_timeout``
    seconds) → half-open: one probe call; success closes, failure re-opens.

    Time comes from ``clock.monotonic()``, so the state machine is tested without sleeping.
    ``state`` is exported as a metric.
    """

    def __init__(
        self, *, failure_threshold: int = 5, reset_timeout: float = 10.0, clock: Clock
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout <= 0:
            raise ValueError("reset_timeout must be > 0")
        self._threshold = failure_threshold
        self._reset_timeout = reset_timeout
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock.monotonic() - self._opened_at >= self._reset_timeout:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        """Seconds until a call may be let through again (0 when closed)."""
        if self._opened_at is None:
            return 0.0
        left = self._opened_at + self._reset_timeout - self._clock.monotonic()
        return max(left, 0.0)

    def acquire(self) -> None:
        """Call before a call; raises ``Overloaded`` without I/O when the circuit refuses."""
        state = self.state
        if state is BreakerState.CLOSED:
            return
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return
        # Open, or half-open with its one probe already out: fail fast.
        wait = self.retry_after() if state is BreakerState.OPEN else _DEFAULT_RETRY_AFTER
        raise Overloaded(
            Code.UPSTREAM_UNAVAILABLE,
            retry_after=max(wait, 0.001),
            detail=f"auth service circuit {state}",
        )

    def record_success(self) -> None:
        if self._opened_at is not None:
            log.info("auth service circuit closed")
        self._failures = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        if was_probe or (self._opened_at is None and self._failures >= self._threshold):
            self._opened_at = self._clock.monotonic()
            log.warning(
                "auth service circuit open for %ss after %s failures",
                self._reset_timeout,
                self._failures,
            )

    def release(self) -> None:
        """A call ended without a verdict on the upstream's health (e.g. cancelled)."""
        self._probe_in_flight = False

    def __repr__(self) -> str:
        return f"<CircuitBreaker state={self.state} failures={self._failures}>"


class _Retryable(Exception):
    """An attempt failed in a way a retry may fix; carries the error to raise if none does."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(str(error))
        self.error = error


class _Rejected(Exception):
    """The upstream answered 4xx: it is healthy and our request is wrong."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(str(error))
        self.error = error


class AuthClient:
    """The gateway's client for the auth service.

    Parameters:

    * url — the auth service's base URL (``https://host:port``).
    * ssl_context — trusts the auth service's CA and presents the gateway's client cert.
    * clock — for the circuit breaker.
    * timeout — seconds for one attempt (connect, send, answer), always applied.
    * max_connections — size of the connection pool.
    * retries — extra attempts after a safe-to-retry failure.
    * breaker — defaults to ``CircuitBreaker(clock=clock)``.
    * session — an existing session to share (not closed by ``aclose``); by default the
      client opens its own pooled session.
    * backoff — base of the jittered exponential backoff between attempts, in seconds.
    * rng — randomness for the jitter (injected so tests are deterministic).
    """

    def __init__(
        self,
        *,
        url: str,
        ssl_context: ssl.SSLContext,
        clock: Clock,
        timeout: float = 10.0,
        max_connections: int = 64,
        retries: int = 2,
        breaker: CircuitBreaker | None = None,
        session: aiohttp.ClientSession | None = None,
        backoff: float = 0.05,
        rng: random.Random | None = None,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"url must be http(s)://..., not {url!r}")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._endpoint = url.rstrip("/") + REGISTER_PATH
        self._health_url = url.rstrip("/") + HEALTH_PATH
        self._ssl = ssl_context
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._retries = retries
        self.breaker = breaker or CircuitBreaker(clock=clock)
        self._session = session
        self._owns_session = session is None
        self._backoff = backoff
        self._rng = rng or random.Random()  # jitter, not security

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside a running loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, raise_for_status=False
            )
        return self._session

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def register(self, reg: Registration) -> RegisterResult:
        """Register ``reg``; raises ``Overloaded`` or ``UpstreamFailed``, nothing else."""
        self.breaker.acquire()
        body = json.dumps(reg.to_json(), separators=(",", ":")).encode()
        verdict: bool | None = None  # True healthy, False failed, None unknown
        try:
            for attempt in range(self._retries + 1):
                if attempt:
                    await asyncio.sleep(self._delay(attempt))
                try:
                    result = await self._attempt(body)
                except _Retryable as exc:
                    if attempt == self._retries:
                        verdict = False
                        raise exc.error from exc.__cause__
                    log.info("auth service attempt %s failed (%s), retrying", attempt + 1, exc)
                    continue
                except _Rejected as exc:
                    # 4xx means the upstream is up and we are wrong: not a health failure.
                    verdict = True
                    raise exc.error from exc.__cause__
                except GatewayError:
                    verdict = False
                    raise
                verdict = True
                return result
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            if verdict is True:
                self.breaker.record_success()
            elif verdict is False:
                self.breaker.record_failure()
            else:
                self.breaker.release()

    async def ready(self) -> bool:
        """For ``/readyz``: is the auth service reachable and healthy right now?

        An open circuit answers ``False`` without I/O. The probe does not move the breaker:
        readiness polling must not open or close the circuit for real traffic.
        """
        if self.breaker.state is BreakerState.OPEN:
            return False
        try:
            async with self._get_session().get(
                self._health_url, ssl=self._ssl, timeout=self._timeout, allow_redirects=False
            ) as resp:
                await resp.read()
                return resp.status == 200
        except TRANSPORT_ERRORS as exc:
            log.info("auth service health probe failed: %s", describe(exc))
            return False

    def _delay(self, attempt: int) -> float:
        # Full jitter: a uniform draw below an exponentially growing cap.
        cap = min(self._backoff * (2 ** (attempt - 1)), 1.0)
        return self._rng.uniform(0, cap)

    async def _attempt(self, body: bytes) -> RegisterResult:
        session = self._get_session()
        try:
            async with session.post(
                self._endpoint,
                data=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                ssl=self._ssl,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raw = await read_capped(resp, _MAX_RESPONSE_BYTES)
        except TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, self._timeout.total) from exc

        if status == 200:
            try:
                return RegisterResult.from_json(json.loads(raw))
            except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError too
                raise UpstreamFailed(
                    f"auth service sent a malformed 200 body: {exc}", retry_after=1.0
                ) from exc
        summary = _error_summary(raw)
        err = _error_body(raw)
        if status >= 500:
            error: GatewayError = UpstreamFailed(
                f"auth service answered {status}: {summary}",
                retry_after=retry_after or _DEFAULT_RETRY_AFTER,
            )
            if status == 503:
                # The auth service (its registry, its signing backend) is unavailable for
                # now: the agent gets its Retry-After.
                error = Overloaded(
                    Code.UPSTREAM_UNAVAILABLE,
                    retry_after=retry_after or _DEFAULT_RETRY_AFTER,
                    detail=f"auth service answered 503: {summary}",
                )
                if retry_after is not None:
                    # It said when to come back (Vault sealed or rate-limited): retrying
                    # sooner would only add load where it is short; the agent waits.
                    raise error
            if err is not None and err.code == RegisterCode.SIGNING_REFUSED:
                # Vault refused a well-formed request (policy, role): the same request
                # would be refused again; an operator must act.
                raise error
            if status in _RETRYABLE_STATUSES:
                raise _Retryable(error)
            raise error
        if status == 403 and err is not None and err.code == Code.HOST_LOCKED:
            # An operator locked this VM (host, vmId, subscription or token): a decision,
            # not a fault — the agent must stop, and the audit record says why.
            raise _Rejected(JoinRejected(Code.HOST_LOCKED, f"auth service: {err.message[:300]}"))
        if status == 400 and err is not None and err.code == Code.CSR_REQUIRED:
            # The auth service demands proof of possession this node did not send: the
            # node must be upgraded, not the request retried.
            raise _Rejected(BadRequest(Code.CSR_REQUIRED, detail=f"auth service: {err.message}"))
        # 4xx (or any other status): our request was wrong — a bug in us, not a retry case.
        raise _Rejected(
            UpstreamFailed(f"auth service rejected the registration ({status}): {summary}")
        )

    def __repr__(self) -> str:
        return f"<AuthClient {self._endpoint} breaker={self.breaker.state}>"


def _transport_error(exc: BaseException, timeout: float | None) -> Exception:
    """What a failed attempt means for the caller (``exc`` is one of TRANSPORT_ERRORS)."""
    failure = classify(exc)
    if failure is Failure.TOO_LARGE:
        # The service answered, with more than a node's certificates can be: a broken
        # upstream, not an unreachable one.
        return UpstreamFailed(
            f"auth service response exceeds {_MAX_RESPONSE_BYTES} bytes",
            retry_after=_DEFAULT_RETRY_AFTER,
        )
    if failure is Failure.TLS:
        why = f"TLS with auth service failed: {exc}"  # wrong trust or certificate: no retry
    elif failure is Failure.TIMEOUT:
        why = f"auth service timed out after {timeout}s"  # the budget is spent: no retry
    elif failure in (Failure.CONNECT, Failure.DISCONNECTED):
        # Refused or reset before an answer: safe to retry (idempotency key).
        return _Retryable(
            Overloaded(
                Code.UPSTREAM_UNAVAILABLE,
                retry_after=_DEFAULT_RETRY_AFTER,
                detail=f"auth service unreachable: {describe(exc)}",
            )
        )
    else:
        why = f"auth service call failed: {describe(exc)}"
    return Overloaded(Code.UPSTREAM_UNAVAILABLE, retry_after=_DEFAULT_RETRY_AFTER, detail=why)


def _error_body(raw: bytes) -> ErrorBody | None:
    try:
        return ErrorBody.from_json(json.loads(raw))
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        return None


def _error_summary(raw: bytes) -> str:
    """``code: message`` from an error body, or a short prefix of whatever came back."""
    err = _error_body(raw)
    return f"{err.code}: {err.message}"[:300] if err is not None else repr(raw[:200])
