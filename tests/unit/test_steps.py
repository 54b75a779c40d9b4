"""The step-table runners: fail-fast for the gateway, recording for inspect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from gateway.core.errors import Code, JoinRejected
from gateway.core.steps import (
    Detail,
    Skip,
    Step,
    StepTable,
    codes_of,
    run_fail_fast,
    run_recording,
    step_names,
)


@dataclass
class State:
    fail: set[str] = field(default_factory=set)
    skip: set[str] = field(default_factory=set)
    ran: list[str] = field(default_factory=list)
    details_made: int = 0


def _step(name: str, *needs: str, code: Code = Code.NOT_ALLOWED) -> Step[State]:
    async def run(state: State) -> Detail:
        state.ran.append(name)
        if name in state.skip:
            raise Skip(f"{name} does not apply")
        if name in state.fail:
            await asyncio.sleep(0)
            raise JoinRejected(code, f"{name} failed")

        def detail() -> str:
            state.details_made += 1
            return f"{name} ok"

        return detail

    return Step(name, run, needs, frozenset({code}))


TABLE: StepTable[State] = (
    _step("a", code=Code.CHALLENGE_INVALID),
    (_step("b", "a", code=Code.NONCE_MISMATCH), _step("c", "a", code=Code.ACCESS_TOKEN_INVALID)),
    _step("d", "b", "c"),
    _step("e", "a"),
)


async def test_fail_fast_runs_in_order_and_makes_no_detail() -> None:
    state = State()
    await run_fail_fast(TABLE, state)
    assert sorted(state.ran) == ["a", "b", "c", "d", "e"] and state.ran[0] == "a"
    assert state.details_made == 0  # details are for inspect only: the hot path skips them


async def test_fail_fast_raises_the_first_failure_in_table_order() -> None:
    state = State(fail={"b", "c"})
    with pytest.raises(JoinRejected) as err:
        await run_fail_fast(TABLE, state)
    assert err.value.code is Code.NONCE_MISMATCH  # b before c, whichever finished first
    assert "d" not in state.ran


async def test_a_step_that_skips_itself_in_a_fail_fast_run_is_a_bug_not_a_pass() -> None:
    with pytest.raises(RuntimeError, match="skipped in a fail-fast run"):
        await run_fail_fast(TABLE, State(skip={"e"}))


async def test_recording_runs_what_it_can_and_says_why_not() -> None:
    rows = await run_recording(TABLE, State(fail={"b"}, skip={"e"}))
    assert [(r.name, r.status, r.code) for r in rows] == [
        ("a", "ok", None),
        ("b", "failed", Code.NONCE_MISMATCH),
        ("c", "ok", None),
        ("d", "skipped", None),
        ("e", "skipped", None),
    ]
    assert rows[3].detail == "not run: b failed"
    assert rows[4].detail == "e does not apply"
    assert rows[0].detail == "a ok"


def test_the_table_declares_its_names_and_codes() -> None:
    assert step_names(TABLE) == ("a", "b", "c", "d", "e")
    assert codes_of(TABLE) == {
        Code.CHALLENGE_INVALID,
        Code.NONCE_MISMATCH,
        Code.ACCESS_TOKEN_INVALID,
        Code.NOT_ALLOWED,
    }
