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

Registrations that arrive together share one request (``POST /v1/register/batch``, up to
64 per request): a registration leaves at once, on ``/v1/register``, while fewer than
:data:`PIPELINE_DEPTH` requests are in flight — a lone join never waits for a timer — and
otherwise queues; the next request to leave takes up to 64 queued registrations (distinct
idempotency keys). Each member keeps its own breaker verdict and retry loop: a batch that
fails whole (transport, 502/503/504) fails each member, and each member is retried as it
would have been alone. An auth service without the batch endpoint (404/405) turns batching
off for good: one request per registration, as before.

Every aiohttp exception is translated here into ``gateway.core.errors``; none escapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections import deque
from dataclasses import dataclass
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
    MAX_BATCH,
    REGISTER_BATCH_PATH,
    REGISTER_PATH,
    ErrorBody,
    RegisterCode,
    RegisterResult,
    Registration,
)

__all__ = ["PIPELINE_DEPTH", "AuthClient", "BreakerState", "CircuitBreaker"]

log = logging.getLogger(__name__)

_RETRYABLE_STATUSES = frozenset({502, 503, 504})
_MAX_RESPONSE_BYTES = 1 << 20
# A batch answer carries up to MAX_BATCH registrations' certificates (a few KiB each).
_MAX_BATCH_RESPONSE_BYTES = 16 << 20
# Requests to the auth service in flight per client before registrations queue for a batch.
PIPELINE_DEPTH = 4
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
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


@dataclass(eq=False)
class _Queued:
    """A registration attempt waiting for a place in a batch request."""

    key: str
    body: bytes
    future: asyncio.Future[RegisterResult]


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
    * batch — coalesce concurrent registrations into ``/v1/register/batch`` requests
      (``upstream.batch``); False: one request per registration, always.
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
        batch: bool = True,
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
        self._batch_endpoint = url.rstrip("/") + REGISTER_BATCH_PATH
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
        # Coalescing: False once the auth service showed it has no batch endpoint.
        self._batching = batch
        self._in_flight = 0  # requests to the register endpoints (batching only)
        self._queue: deque[_Queued] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside a running loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, raise_for_status=False
            )
        return self._session

    @property
    def batching(self) -> bool:
        """Whether registrations are coalesced (off when configured so, or for good once
        the auth service answered the batch endpoint 404/405)."""
        return self._batching

    async def aclose(self) -> None:
        # Waiting registrations first, so that no cancelled request sends the next one.
        while self._queue:
            _settle_closed(self._queue.popleft())
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
        key = reg.idempotency_key
        body = json.dumps(reg.to_json(), separators=(",", ":")).encode()
        verdict: bool | None = None  # True healthy, False failed, None unknown
        try:
            for attempt in range(self._retries + 1):
                if attempt:
                    await asyncio.sleep(self._delay(attempt))
                try:
                    result = await self._attempt(key, body)
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

    async def _attempt(self, key: str, body: bytes) -> RegisterResult:
        """One attempt: alone on the plain endpoint when a request slot is free (or
        batching is off), else in the next batch. Raises what :func:`_outcome` raises."""
        if not self._batching:
            return await self._attempt_single(body)
        if self._in_flight < PIPELINE_DEPTH and not self._queue:
            self._in_flight += 1
            try:
                return await self._attempt_single(body)
            finally:
                self._in_flight -= 1
                self._pump()
        queued = _Queued(key, body, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        # Cancelled here, the future is cancelled too: a batch not yet sent skips it, one
        # already sent drops its answer (the registration may have happened: idempotent).
        return await queued.future

    async def _post(self, url: str, body: bytes, cap: int) -> tuple[int, float | None, bytes]:
        """One POST: its status, Retry-After and body (at most ``cap`` bytes). Raises what
        aiohttp raises (``TRANSPORT_ERRORS``)."""
        async with self._get_session().post(
            url,
            data=body,
            headers=_JSON_HEADERS,
            ssl=self._ssl,
            timeout=self._timeout,
            allow_redirects=False,
        ) as resp:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            return resp.status, retry_after, await read_capped(resp, cap)

    async def _attempt_single(self, body: bytes) -> RegisterResult:
        try:
            status, retry_after, raw = await self._post(self._endpoint, body, _MAX_RESPONSE_BYTES)
        except TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, self._timeout.total) from exc
        return _outcome(status, _decode(raw), retry_after=retry_after, raw=raw)

    def _pump(self) -> None:
        """Send queued registrations while request slots are free (all of them, one
        request each, once batching is off)."""
        loop = asyncio.get_running_loop()
        while self._queue and (not self._batching or self._in_flight < PIPELINE_DEPTH):
            members = self._take(MAX_BATCH if self._batching else 1)
            if not members:
                break
            if self._batching:
                self._in_flight += 1
            task = loop.create_task(self._send(members, counted=self._batching))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, limit: int) -> list[_Queued]:
        """Up to ``limit`` waiting registrations, oldest first, one per idempotency key
        (a batch may not repeat a key; a repeat waits for the next request)."""
        members: list[_Queued] = []
        keys: set[str] = set()
        later: list[_Queued] = []
        while self._queue and len(members) < limit:
            queued = self._queue.popleft()
            if queued.future.done():  # its join was cancelled while it waited
                continue
            if queued.key in keys:
                later.append(queued)
                continue
            keys.add(queued.key)
            members.append(queued)
        self._queue.extendleft(reversed(later))
        return members

    async def _send(self, members: list[_Queued], *, counted: bool) -> None:
        try:
            if len(members) == 1:
                await self._settle_single(members[0])
            else:
                await self._send_batch(members)
        except Exception:
            log.exception("auth service batch request failed unexpectedly")
        finally:
            for queued in members:  # cancelled (aclose), or a bug: nobody is left waiting
                _settle_closed(queued)
            if counted:
                self._in_flight -= 1
            self._pump()

    async def _settle_single(self, queued: _Queued) -> None:
        try:
            result = await self._attempt_single(queued.body)
        except Exception as exc:
            _settle(queued.future, exc)
        else:
            _settle(queued.future, result)

    async def _send_batch(self, members: list[_Queued]) -> None:
        payload = b'{"registrations":[' + b",".join(q.body for q in members) + b"]}"
        try:
            status, retry_after, raw = await self._post(
                self._batch_endpoint, payload, _MAX_BATCH_RESPONSE_BYTES
            )
        except TRANSPORT_ERRORS as exc:
            # The whole request failed: each member failed, and retries on its own.
            for queued in members:
                error = _transport_error(exc, self._timeout.total, _MAX_BATCH_RESPONSE_BYTES)
                error.__cause__ = exc
                _settle(queued.future, error)
            return
        if status in (404, 405):
            # An auth service that predates the batch endpoint: one request per
            # registration from now on (these members too).
            if self._batching:
                self._batching = False
                log.warning(
                    "auth service answered %s on %s: registrations are sent one per request",
                    status,
                    REGISTER_BATCH_PATH,
                )
            await asyncio.gather(*(self._settle_single(q) for q in members))
            return
        body = _decode(raw)
        if status != 200:
            for queued in members:
                _settle_outcome(queued, status, body, retry_after=retry_after, raw=raw)
            return
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != len(members):
            for queued in members:
                _settle(
                    queued.future,
                    UpstreamFailed(
                        f"auth service sent a malformed batch body ({len(raw)} bytes)",
                        retry_after=_DEFAULT_RETRY_AFTER,
                    ),
                )
            return
        for queued, item in zip(members, results, strict=True):
            item_status = item.get("status") if isinstance(item, dict) else None
            if not isinstance(item, dict) or type(item_status) is not int:
                _settle(
                    queued.future,
                    UpstreamFailed(
                        "auth service sent a malformed batch item",
                        retry_after=_DEFAULT_RETRY_AFTER,
                    ),
                )
                continue
            if item_status == 200:
                _settle_outcome(queued, 200, item, retry_after=None, raw=b"")
                continue
            seconds = item.get("retry_after")
            # The Retry-After header's rules (no negative or NaN, capped), as alone.
            item_retry = (
                parse_retry_after(str(seconds))
                if isinstance(seconds, int | float) and not isinstance(seconds, bool)
                else None
            )
            error_body = {"error": {"code": item.get("code"), "message": item.get("message")}}
            _settle_outcome(
                queued,
                item_status,
                error_body,
                retry_after=item_retry,
                raw=json.dumps(item).encode()[:200],
            )

    def __repr__(self) -> str:
        return f"<AuthClient {self._endpoint} breaker={self.breaker.state}>"


def _decode(raw: bytes) -> object:
    """The answer's JSON, or None when it is not JSON (a proxy's page, an empty body)."""
    try:
        return json.loads(raw)
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        return None


def _outcome(status: int, body: object, *, retry_after: float | None, raw: bytes) -> RegisterResult:
    """What one registration's answer means: its result, or the exception to raise —
    ``_Retryable`` (a retry may help), ``_Rejected`` (the upstream is healthy, we are
    wrong) or a ``GatewayError`` (the upstream failed). ``body`` is the decoded answer (a
    batch item: its fields), ``raw`` what to quote when it is not an error body."""
    if status == 200:
        try:
            return RegisterResult.from_json(body)
        except ValueError as exc:
            raise UpstreamFailed(
                f"auth service sent a malformed 200 body: {exc}", retry_after=1.0
            ) from exc
    err = ErrorBody.from_json(body)
    summary = f"{err.code}: {err.message}"[:300] if err is not None else repr(raw[:200])
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
    raise _Rejected(UpstreamFailed(f"auth service rejected the registration ({status}): {summary}"))


def _settle(future: asyncio.Future[RegisterResult], outcome: RegisterResult | Exception) -> None:
    if future.done():  # its join was cancelled meanwhile
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _settle_outcome(
    queued: _Queued, status: int, body: object, *, retry_after: float | None, raw: bytes
) -> None:
    try:
        result = _outcome(status, body, retry_after=retry_after, raw=raw)
    except Exception as exc:
        _settle(queued.future, exc)
    else:
        _settle(queued.future, result)


def _settle_closed(queued: _Queued) -> None:
    if queued.future.done():  # the usual case, after its request: no error to build
        return
    _settle(
        queued.future,
        Overloaded(
            Code.UPSTREAM_UNAVAILABLE,
            retry_after=_DEFAULT_RETRY_AFTER,
            detail="auth service client closed",
        ),
    )


def _transport_error(
    exc: BaseException, timeout: float | None, limit: int = _MAX_RESPONSE_BYTES
) -> Exception:
    """What a failed attempt means for the caller (``exc`` is one of TRANSPORT_ERRORS)."""
    failure = classify(exc)
    if failure is Failure.TOO_LARGE:
        # The service answered, with more than a node's certificates can be: a broken
        # upstream, not an unreachable one.
        return UpstreamFailed(
            f"auth service response exceeds {limit} bytes",
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
