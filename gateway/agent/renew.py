"""``join-gateway agent``: keep the node's identity fresh by re-joining before it runs out.

A renewal is a full join (:func:`~gateway.agent.runner.run_join`: a fresh challenge, a fresh
attested document and access token), not a certificate-for-certificate swap: a VM that was
deleted, moved out of the allowed subscription, or locked stops being renewed, because the
gateway checks everything again. This is what Teleport's bots on Azure do (re-join at every
renewal) and when step-ca renews (two thirds of the lifetime, with jitter).

The schedule (:func:`plan_delay`) is pure and tested as a table:

- no valid identity on disk → join now;
- otherwise renew at two thirds of the certificates' lifetime, ±10 % jitter so a fleet
  started together does not renew together;
- after a failure, retry with exponential backoff and full jitter (:class:`Backoff`), past the
  certificates' expiry too: a node that lost its identity keeps trying to get one back.

A refusal the node cannot cure by retrying (:data:`FINAL_CODES`: the host is locked, no allow
rule admits it, its token is gone) ends the agent with :data:`EXIT_REFUSED`; the systemd unit
lists that status in ``RestartPreventExitStatus=`` so a locked node stops knocking (each
attempt would cost the gateway a full verification) until an operator restarts it.

Signals only record (the loop acts): SIGHUP renews now, SIGTERM/SIGINT stop — an in-flight
join is cancelled (the set on disk is switched by one rename, so it is the old set or the new).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from gateway.agent.backoff import Backoff
from gateway.agent.errors import FINAL_CODES, AgentError, JoinFailed, NodeConfigError
from gateway.agent.identity import Identity, load_identity
from gateway.agent.keys import load_or_create_keys
from gateway.agent.nodeconfig import AgentSettings
from gateway.agent.runner import JoinOutcome, run_join
from gateway.core.clock import Clock, SystemClock

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "JITTER",
    "RENEW_FRACTION",
    "NodeAgent",
    "plan_delay",
    "renewal_time",
]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 4
RENEW_FRACTION = 2 / 3
JITTER = 0.10

Join = Callable[..., Awaitable[JoinOutcome]]
Wait = Callable[[float, asyncio.Event], Awaitable[None]]


def renewal_time(identity: Identity, *, jitter: float) -> datetime:
    """When to renew: two thirds of the lifetime (times ``1 + jitter``) after it started.

    The lifetime starts when the node got the certificates, not at ``not_before``: the auth
    service backdates ``not_before`` (minutes, to absorb clock skew), which would otherwise
    eat into a short lifetime and bring the renewal forward.
    """
    if not -JITTER <= jitter <= JITTER:
        raise ValueError(f"jitter must be within ±{JITTER}")
    start = min(max(identity.not_before, identity.obtained_at), identity.not_after)
    return start + (identity.not_after - start) * (RENEW_FRACTION * (1.0 + jitter))


def plan_delay(
    now: datetime,
    identity: Identity | None,
    *,
    failures: int,
    jitter: float,
    backoff: Backoff,
) -> float:
    """Seconds until the next join. ``failures``: joins failed in a row since the last success."""
    if failures > 0:
        return backoff.delay(failures)
    if identity is None or not identity.valid_at(now):
        return 0.0
    return max(0.0, (renewal_time(identity, jitter=jitter) - now).total_seconds())


async def wait_or_wake(delay: float, wake: asyncio.Event) -> None:
    """Sleep ``delay`` seconds unless ``wake`` is set first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=delay)


class NodeAgent:
    """The renewal loop for one node.

    Parameters:
        settings: the node's settings (as ``join-gateway join`` uses them).
        retry_cap: ceiling of the backoff between failed renewals, seconds.
        clock: decides "now" for the schedule (tests pass a ``FixedClock``).
        rng: draws the jitter and the backoff (tests pass a seeded one).
        join: the single join (default :func:`run_join`).
        wait: sleeps until a delay passes or the loop is woken (tests advance their clock).
        max_wait: the longest single sleep before the schedule is worked out again from the
            clock: a VM suspended or paused for hours does not advance the monotonic clock
            a sleep runs on, and must not sleep through its certificates' expiry.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        retry_cap: float = 300.0,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        join: Join = run_join,
        wait: Wait = wait_or_wake,
        max_wait: float = 300.0,
    ) -> None:
        self._s = settings
        self._clock: Clock = SystemClock() if clock is None else clock
        self._rng = random.Random() if rng is None else rng
        self._backoff = Backoff(base=settings.backoff_base, cap=retry_cap, rng=self._rng)
        self._join = join
        self._wait = wait
        self._max_wait = max_wait
        self._wake = asyncio.Event()
        self._renew_requested = False
        self._stopping = False
        self.joins = 0
        self.renewals = 0

    def renew_now(self) -> None:
        """SIGHUP: renew at once (records only; the loop acts)."""
        self._renew_requested = True
        self._wake.set()

    def stop(self) -> None:
        """SIGTERM/SIGINT: stop; an in-flight join is cancelled."""
        self._stopping = True
        self._wake.set()

    def __repr__(self) -> str:
        return f"NodeAgent(data_dir={self._s.data_dir}, joins={self.joins})"

    async def run(self) -> int:
        """Run until stopped (:data:`EXIT_OK`) or refused for good (:data:`EXIT_REFUSED`)."""
        try:
            keys = load_or_create_keys(self._s.data_dir)
        except AgentError as exc:
            log.error("cannot use the node's keys: %s", exc)
            return EXIT_FAILED
        identity = load_identity(self._s.data_dir, keys)
        if identity is not None:
            # A set written before the last restart: its age counts from when it was written.
            identity = dataclasses.replace(
                identity, obtained_at=min(identity.obtained_at, self._clock.now())
            )
            log.info("host %s, certificates valid until %s", identity.host_id, identity.not_after)
        failures = 0
        jitter = self._draw_jitter()
        due: datetime | None = None  # the next join, planned once after each join or failure
        while not self._stopping:
            now = self._clock.now()
            if due is None:
                delay = plan_delay(
                    now, identity, failures=failures, jitter=jitter, backoff=self._backoff
                )
                due = now + timedelta(seconds=delay)
                if delay > 0 and not self._renew_requested:
                    self._announce(now, identity, delay)
            delay = max(0.0, (due - now).total_seconds())
            if delay > 0 and not self._renew_requested:
                await self._wait(min(delay, self._max_wait), self._wake)
                continue  # woken, or time passed: look at the clock again
            self._wake.clear()
            if self._stopping:
                break
            if self._renew_requested:
                log.info("SIGHUP: renewing now")
            self._renew_requested = False
            due = None
            try:
                outcome = await self._join_unless_stopped()
            except NodeConfigError as exc:
                log.error("join-gateway agent: %s", exc.message)
                return EXIT_USAGE
            except JoinFailed as exc:
                if exc.code in FINAL_CODES:
                    log.error(
                        "the gateway refused this node for good (%s: %s); renewal stops until "
                        "an operator acts and restarts the agent",
                        exc.code,
                        exc.message,
                    )
                    return EXIT_REFUSED
                failures += 1
                log.warning(
                    "join failed (%s: %s); failure %d in a row", exc.code, exc.message, failures
                )
                continue
            if outcome is None:  # stopped mid-join
                break
            self.joins += 1
            if identity is not None:
                self.renewals += 1
            log.info("%s as host %s", "renewed" if identity else "joined", outcome.host_id)
            failures = 0
            jitter = self._draw_jitter()
            fresh = load_identity(self._s.data_dir, keys)
            if fresh is None:
                # Written and checked, yet unreadable: count it as a failure, so the loop
                # backs off instead of re-joining as fast as the gateway answers.
                failures = 1
                log.error(
                    "the certificates just written cannot be read back from %s", self._s.data_dir
                )
                continue
            identity = dataclasses.replace(fresh, obtained_at=self._clock.now())
        log.info("agent stopping")
        return EXIT_OK

    @staticmethod
    def _announce(now: datetime, identity: Identity | None, delay: float) -> None:
        if identity is not None and identity.valid_at(now):
            log.info("next join in %.1fs (certificates valid until %s)", delay, identity.not_after)
        else:
            log.warning("the node has no valid identity; next join in %.1fs", delay)

    def _draw_jitter(self) -> float:
        return self._rng.uniform(-JITTER, JITTER)

    async def _join_unless_stopped(self) -> JoinOutcome | None:
        """One join; ``None`` if a stop arrived first (the join is cancelled and awaited)."""
        join = asyncio.ensure_future(self._join(self._s, clock=self._clock))
        stop = asyncio.ensure_future(self._stop_signalled())
        try:
            await asyncio.wait({join, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not join.done():
            join.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await join
            return None
        return join.result()

    async def _stop_signalled(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            if not self._stopping:
                # A SIGHUP during a join: the join under way is the renewal asked for.
                self._wake.clear()
                self._renew_requested = False
