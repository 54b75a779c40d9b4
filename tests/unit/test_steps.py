"""The step-table runners: fail-fast for the gateway, recording for inspect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

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


# -- the concurrent group: no task while its steps do not wait, one per step once one does --


class CountTasks:
    """Counts the tasks the running loop creates (its task factory) while installed."""

    def __init__(self) -> None:
        self.created = 0

    def __enter__(self) -> CountTasks:
        loop = asyncio.get_running_loop()
        self._previous = loop.get_task_factory()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            self.created += 1
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.get_running_loop().set_task_factory(self._previous)


async def test_a_group_whose_steps_do_not_wait_runs_without_tasks() -> None:
    state = State()
    with CountTasks() as tasks:
        await run_fail_fast(TABLE, state)
    assert tasks.created == 0
    assert state.ran == ["a", "b", "c", "d", "e"]


async def test_a_group_step_failing_without_waiting_is_raised_and_the_rest_never_start() -> None:
    # As the task group did: the first failure cancels the tasks that had not started.
    async def b_fails(state: State) -> Detail:
        state.ran.append("b")
        raise JoinRejected(Code.NONCE_MISMATCH, "b failed")

    table: StepTable[State] = ((Step("b", b_fails), _step("c", code=Code.ACCESS_TOKEN_INVALID)),)
    state = State()
    with CountTasks() as tasks, pytest.raises(JoinRejected) as err:
        await run_fail_fast(table, state)
    assert err.value.code is Code.NONCE_MISMATCH and state.ran == ["b"]
    assert tasks.created == 0


def _waiting_step(
    name: str, event: asyncio.Event, *, then_fail: BaseException | None = None
) -> Step[State]:
    async def run(state: State) -> Detail:
        state.ran.append(name)
        await event.wait()
        state.ran.append(f"{name} resumed")
        if then_fail is not None:
            raise then_fail
        return "ok"

    return Step(name, run)


def _setting_step(
    name: str, event: asyncio.Event, *, fail: BaseException | None = None
) -> Step[State]:
    async def run(state: State) -> Detail:
        state.ran.append(name)
        event.set()
        if fail is not None:
            raise fail
        return "ok"

    return Step(name, run)


async def test_once_a_group_step_waits_the_rest_of_the_group_runs_concurrently() -> None:
    # b waits for what c does: run one after the other, this would never finish.
    event = asyncio.Event()
    table: StepTable[State] = (
        _step("a"),
        (_waiting_step("b", event), _setting_step("c", event)),
        _step("d"),
    )
    state = State()
    with CountTasks() as tasks:
        async with asyncio.timeout(5):
            await run_fail_fast(table, state)
    assert state.ran == ["a", "b", "c", "b resumed", "d"]
    assert tasks.created == 2  # the waiting step and the one after it


async def test_a_waiting_group_keeps_the_task_group_order_of_errors() -> None:
    # c fails first, b (waiting on c) right after: b's error, first in the table, wins.
    event = asyncio.Event()
    table: StepTable[State] = (
        (
            _waiting_step("b", event, then_fail=JoinRejected(Code.NONCE_MISMATCH, "b")),
            _setting_step("c", event, fail=JoinRejected(Code.ACCESS_TOKEN_INVALID, "c")),
        ),
    )
    with pytest.raises(JoinRejected) as err:
        await run_fail_fast(table, State())
    assert err.value.code is Code.NONCE_MISMATCH
    # A bug wins over a rejection, even one earlier in the table.
    event = asyncio.Event()
    table = (
        (
            _waiting_step("b", event, then_fail=JoinRejected(Code.NONCE_MISMATCH, "b")),
            _setting_step("c", event, fail=RuntimeError("bug in c")),
        ),
    )
    with pytest.raises(RuntimeError, match="bug in c"):
        await run_fail_fast(table, State())


async def test_a_waiting_step_that_is_cancelled_sees_the_cancellation() -> None:
    event = asyncio.Event()
    cleaned: list[str] = []

    async def waits(state: State) -> Detail:
        try:
            await event.wait()
        finally:
            cleaned.append("b")
        return "ok"

    table: StepTable[State] = ((Step("b", waits), _step("c", code=Code.ACCESS_TOKEN_INVALID)),)
    with pytest.raises(JoinRejected):
        await run_fail_fast(table, State(fail={"c"}))
    assert cleaned == ["b"]  # c's failure cancelled b mid-wait, and b's cleanup ran
