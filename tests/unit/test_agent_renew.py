"""The renewal agent: its schedule as a table, then the loop against the fake gateway.

The loop runs on a ``FixedClock`` that only the test's ``wait`` moves, so a day of renewals
takes milliseconds and every delay the agent chose is recorded and checked.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web

from gateway.agent.backoff import Backoff
from gateway.agent.identity import DATA_FILES, Identity, load_identity
from gateway.agent.nodeconfig import AgentSettings
from gateway.agent.renew import EXIT_OK, EXIT_REFUSED, NodeAgent, plan_delay
from gateway.agent.runner import run_join
from gateway.core.clock import FixedClock
from tests.unit.test_agent_fakes import Scripted, SleepRecorder
from tests.unit.test_agent_runner import world

T0 = datetime(2026, 1, 1, tzinfo=UTC)
H = 3600.0


def ident(*, obtained: float, lifetime: float, backdate: float = 300.0) -> Identity:
    """Certificates obtained ``obtained`` seconds after T0, living ``lifetime`` seconds."""
    at = T0 + timedelta(seconds=obtained)
    return Identity(
        host_id="h",
        not_before=at - timedelta(seconds=backdate),
        not_after=at + timedelta(seconds=lifetime),
        obtained_at=at,
        directory=Path("/nonexistent"),
    )


def backoff() -> Backoff:
    return Backoff(base=1.0, cap=60.0, rng=random.Random(7))


@pytest.mark.parametrize(
    ("now", "identity", "failures", "jitter", "check"),
    [
        (0, None, 0, 0.0, lambda d: d == 0),
        (0, ident(obtained=0, lifetime=24 * H), 0, 0.0, lambda d: d == 16 * H),
        (0, ident(obtained=0, lifetime=24 * H), 0, -0.1, lambda d: d == pytest.approx(14.4 * H)),
        (0, ident(obtained=0, lifetime=24 * H), 0, 0.1, lambda d: d == pytest.approx(17.6 * H)),
        (0, ident(obtained=0, lifetime=6, backdate=300), 0, 0.0, lambda d: d == 4),
        (12 * H, ident(obtained=0, lifetime=24 * H), 0, 0.0, lambda d: d == 4 * H),
        (20 * H, ident(obtained=0, lifetime=24 * H), 0, 0.0, lambda d: d == 0),
        (25 * H, ident(obtained=0, lifetime=24 * H), 0, 0.0, lambda d: d == 0),
        (17 * H, ident(obtained=0, lifetime=24 * H), 1, 0.0, lambda d: 0 <= d <= 1),
        (17 * H, ident(obtained=0, lifetime=24 * H), 4, 0.0, lambda d: 0 <= d <= 8),
        (17 * H, ident(obtained=0, lifetime=24 * H), 30, 0.0, lambda d: 0 <= d <= 60),
        (30 * H, ident(obtained=0, lifetime=24 * H), 3, 0.0, lambda d: 0 < d <= 4),
        (0, ident(obtained=0, lifetime=24 * H, backdate=-60), 0, 0.0, lambda d: d > 15 * H),
    ],
    ids=[
        "no identity on disk: join now",
        "fresh 24 h certificates are renewed at two thirds, 16 h",
        "jitter -10 % brings the renewal to 14.4 h",
        "jitter +10 % takes the renewal to 17.6 h",
        "a backdated not_before does not eat a short lifetime: 6 s renew after 4 s",
        "after a restart half-way the remaining time counts from when they were obtained",
        "a renewal already due runs now",
        "expired certificates: join now",
        "after one failure the retry waits at most the backoff base",
        "after four failures the retry waits at most 8 base delays",
        "the backoff never exceeds its cap",
        "after expiry a failing node keeps retrying with backoff, not in a tight loop",
        "a node clock behind the auth service does not see fresh certificates as none",
    ],
)
def test_the_schedule(
    now: float,
    identity: Identity | None,
    failures: int,
    jitter: float,
    check: Callable[[float], bool],
) -> None:
    delay = plan_delay(
        T0 + timedelta(seconds=now),
        identity,
        failures=failures,
        jitter=jitter,
        backoff=backoff(),
    )
    assert check(delay), delay


def test_jitter_outside_ten_percent_is_a_bug() -> None:
    with pytest.raises(ValueError):
        plan_delay(T0, ident(obtained=0, lifetime=H), failures=0, jitter=0.2, backoff=backoff())


class Waits:
    """The agent's ``wait``: moves the clock by the delay, then runs the next scripted step."""

    def __init__(self, clock: FixedClock) -> None:
        self.clock = clock
        self.delays: list[float] = []
        self.steps: list[Callable[[], None]] = []
        self.agent: NodeAgent | None = None

    async def __call__(self, delay: float, wake: asyncio.Event) -> None:
        self.delays.append(delay)
        step = self.steps.pop(0) if self.steps else None
        if step is not None:
            step()
        if wake.is_set():  # a signal arrived: the wait ends early, the clock barely moves
            return
        self.clock.advance(delay)


def make_agent(
    settings: AgentSettings, clock: FixedClock, waits: Waits, *, max_wait: float = float("inf")
) -> NodeAgent:
    join = functools.partial(run_join, sleep=SleepRecorder())
    agent = NodeAgent(
        settings,
        clock=clock,
        rng=random.Random(1),
        join=join,
        wait=waits,
        retry_cap=60.0,
        max_wait=max_wait,
    )
    waits.agent = agent
    return agent


def _stop_after(waits: Waits, n: int) -> None:
    """Let ``n`` waits pass, then SIGTERM at the next one."""
    waits.steps = [lambda: None] * n + [lambda: waits.agent.stop()]  # type: ignore[union-attr]


async def test_the_agent_joins_then_renews_at_two_thirds_with_jitter(tmp_path: Path) -> None:
    clock = FixedClock(T0)
    async with world(tmp_path, max_attempts=1) as (_imds, gw, settings):
        gw.cert_ttl, gw.clock = timedelta(hours=1), clock
        waits = Waits(clock)
        agent = make_agent(settings, clock, waits)
        _stop_after(waits, 3)
        assert await agent.run() == EXIT_OK
        # One join at start (no identity), then one renewal after each of three waits.
        assert len(gw.joins) == 4 and agent.joins == 4 and agent.renewals == 3
        # Each wait is two thirds of the hour, ±10 %, and the jitter differs between them.
        renewal_waits = waits.delays[:3]
        assert all(2400 * 0.9 <= d <= 2400 * 1.1 for d in renewal_waits), waits.delays
        assert len(set(renewal_waits)) == 3
        challenges = {j.body["challenge"] for j in gw.joins}
        assert len(challenges) == 4  # every renewal is a fresh join
        keys = {j.body["host"]["public_tls_key"] for j in gw.joins}
        assert len(keys) == 1  # the node's keys stay; only the certificates change
    identity = load_identity(settings.data_dir)
    assert identity is not None and identity.host_id.startswith("host-4-")
    # Only the current set and the one before it are kept.
    assert len(list((settings.data_dir / "sets").iterdir())) == 2


async def test_long_sleeps_are_cut_into_clock_checks_that_do_not_renew_early(
    tmp_path: Path,
) -> None:
    """A suspended VM's sleep does not count the suspension: the agent re-reads the clock
    every ``max_wait`` and joins only once the planned time has come."""
    clock = FixedClock(T0)
    async with world(tmp_path, max_attempts=1) as (_imds, gw, settings):
        gw.cert_ttl, gw.clock = timedelta(hours=1), clock
        waits = Waits(clock)
        agent = make_agent(settings, clock, waits, max_wait=600.0)

        def stop_at_the_renewal() -> None:
            if len(gw.joins) == 2:
                agent.stop()

        waits.steps = [stop_at_the_renewal] * 20
        assert await agent.run() == EXIT_OK
    assert len(gw.joins) == 2
    # Four or five slices of at most 600 s before the renewal, adding up to 2/3 h ± 10 %.
    before = waits.delays[:-1]
    assert 4 <= len(before) <= 5 and all(d <= 600 for d in before), waits.delays
    assert 2400 * 0.9 <= sum(before) <= 2400 * 1.1


async def test_a_failed_renewal_backs_off_then_recovers(tmp_path: Path) -> None:
    clock = FixedClock(T0)
    async with world(tmp_path, max_attempts=1) as (_imds, gw, settings):
        gw.cert_ttl, gw.clock = timedelta(hours=1), clock
        waits = Waits(clock)
        agent = make_agent(settings, clock, waits)

        def outage() -> None:
            gw.script = [Scripted(503, "overloaded"), Scripted(502, "upstream_failed")] + [
                Scripted(503, "overloaded")
            ] * 2

        waits.steps = [
            outage,
            lambda: None,
            lambda: None,
            lambda: None,
            lambda: None,
            lambda: agent.stop(),
        ]
        assert await agent.run() == EXIT_OK
    # join, wait 2/3 h, four failures with growing backoff ceilings, success, wait, stop.
    assert len(gw.joins) == 6 and agent.joins == 2
    assert 2400 * 0.9 <= waits.delays[0] <= 2400 * 1.1
    for n, delay in enumerate(waits.delays[1:5], start=1):
        assert 0 <= delay <= settings.backoff_base * 2 ** (n - 1), waits.delays
    assert 2400 * 0.9 <= waits.delays[5] <= 2400 * 1.1


@pytest.mark.parametrize(
    ("code", "status", "exit_code", "joins"),
    [
        ("host_locked", 403, EXIT_REFUSED, 2),
        ("not_allowed", 403, EXIT_REFUSED, 2),
        ("name_not_allowed", 403, EXIT_REFUSED, 2),
        ("unknown_token", 404, EXIT_REFUSED, 2),
        ("attested_signature_invalid", 403, EXIT_OK, 3),
        ("internal_error", 500, EXIT_OK, 3),
    ],
    ids=[
        "a locked host stops renewing with exit 4",
        "a VM no rule allows any more stops renewing with exit 4",
        "a node name the token's policy no longer gives stops renewing with exit 4",
        "a deleted token stops renewing with exit 4",
        "an evidence failure is retried (a cloud change the gateway may catch up with)",
        "a gateway error is retried",
    ],
)
async def test_final_refusals_stop_the_agent(
    tmp_path: Path, code: str, status: int, exit_code: int, joins: int
) -> None:
    clock = FixedClock(T0)
    async with world(tmp_path, max_attempts=1) as (_imds, gw, settings):
        gw.cert_ttl, gw.clock = timedelta(hours=1), clock

        waits = Waits(clock)
        agent = make_agent(settings, clock, waits)
        waits.steps = [
            lambda: gw.script.append(Scripted(status, code)),
            lambda: None,
            lambda: agent.stop(),
        ]
        assert await agent.run() == exit_code
        assert len(gw.joins) == joins
    # The refused renewal left the previous set in place.
    assert load_identity(settings.data_dir) is not None


async def test_sighup_renews_now_and_sigterm_cancels_a_join_in_flight(tmp_path: Path) -> None:
    clock = FixedClock(T0)
    async with world(tmp_path, max_attempts=1) as (_imds, gw, settings):
        gw.cert_ttl, gw.clock = timedelta(hours=1), clock
        waits = Waits(clock)
        agent = make_agent(settings, clock, waits)
        hung, release = asyncio.Event(), asyncio.Event()

        async def hang(request: web.Request) -> None:
            hung.set()
            await release.wait()

        def sighup() -> None:
            agent.renew_now()

        def then_hang() -> None:
            gw.hang = hang  # the next join never answers

        waits.steps = [sighup, then_hang]
        task = asyncio.create_task(agent.run())
        await asyncio.wait_for(hung.wait(), 10)
        agent.stop()
        assert await asyncio.wait_for(task, 5) == EXIT_OK
        release.set()
    # The SIGHUP cut the first wait short (the clock moved by the second wait only).
    assert clock.now() == T0 + timedelta(seconds=waits.delays[1])
    assert agent.joins == 2 and len(gw.joins) == 3
    for name in DATA_FILES:
        assert (settings.data_dir / name).exists()


async def test_a_refused_key_file_is_a_failure_not_a_loop(tmp_path: Path) -> None:
    clock = FixedClock(T0)
    settings_dir = tmp_path / "teleport"
    settings_dir.mkdir(mode=0o700)
    (settings_dir / "tls_key.pem").write_text("not a key")
    async with world(tmp_path, max_attempts=1) as (_imds, gw, settings):
        agent = make_agent(replace(settings, data_dir=settings_dir), clock, Waits(clock))
        assert await agent.run() == 1
        assert gw.joins == []
