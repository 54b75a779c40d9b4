"""A declared table of verification steps, run two ways from the one declaration.

``run_fail_fast`` is the gateway's way: steps in order, the first ``GatewayError`` is
raised as it is, and a step that skips itself is a bug (every input is given there).
``run_recording`` is ``inspect``'s: every step runs whose prerequisites (``needs``)
passed, each outcome is recorded, nothing is raised. Because both read the same table,
what ``inspect`` says about a document or token is what the gateway would answer — they
cannot drift apart step by step.

A step is a small adapter: it calls the typed ``check_*`` function of its module, stores
the evidence on the run's state object (owned by the table's module, one per call) and
returns a one-line detail for the report. A step that does not apply to this run (no
nonce given, an offline inspection without Resource Manager) raises :class:`Skip` with
the reason, which the recording runner reports.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from gateway.core.errors import Code, GatewayError

__all__ = [
    "Detail",
    "Skip",
    "Step",
    "StepResult",
    "StepTable",
    "codes_of",
    "first_error",
    "run_fail_fast",
    "run_recording",
    "step_names",
]

S = TypeVar("S")

StepStatus = Literal["ok", "failed", "skipped"]
# A step's detail line, or a function making it: only ``inspect`` reads details, so the
# gateway's hot path does not pay for formatting (certificate names) it never shows.
Detail = str | Callable[[], str]


class Skip(Exception):
    """The step does not apply to this run; ``reason`` says why (shown by ``inspect``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class StepResult:
    """One row of a recorded run."""

    name: str
    status: StepStatus
    detail: str
    code: Code | None = None


@dataclass(frozen=True)
class Step(Generic[S]):
    """Parameters:

    * name — the row's name in reports, metrics (step durations) and ``needs``.
    * run — does the check on the state; returns the detail line (or a function making
      it), raises ``GatewayError``
      (rejection) or :class:`Skip`.
    * needs — steps that must have passed for this one to make sense (recording only:
      in fail-fast order they always have).
    * codes — every code the step can raise (the pipeline's code set is their union, and
      its table test must reach each one).
    * record — optional: a step that is itself a table (the attested document) gives its
      own rows here for ``run_recording``; the step counts as failed if any row failed,
      as skipped if every row was.
    """

    name: str
    run: Callable[[S], Awaitable[Detail]]
    needs: tuple[str, ...] = ()
    codes: frozenset[Code] = frozenset()
    record: Callable[[S], Awaitable[tuple[StepResult, ...]]] | None = None


# An entry is a step, or a tuple of independent steps the fail-fast run does concurrently.
StepTable = tuple["Step[S] | tuple[Step[S], ...]", ...]

Timer = Callable[[str], AbstractContextManager[object]]


def _flat(table: StepTable[S]) -> Iterator[Step[S]]:
    for entry in table:
        if isinstance(entry, Step):
            yield entry
        else:
            yield from entry


def step_names(table: StepTable[S]) -> tuple[str, ...]:
    return tuple(step.name for step in _flat(table))


def codes_of(table: StepTable[S]) -> frozenset[Code]:
    """Every code a run of ``table`` can end with."""
    out: set[Code] = set()
    for step in _flat(table):
        out |= step.codes
    return frozenset(out)


class _NoTimer:
    """The timer of an untimed run: one shared object that does nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NOTHING = _NoTimer()


def _no_timer(name: str) -> AbstractContextManager[object]:
    return _NOTHING


def _skipped(step: Step[S], skip: Skip) -> RuntimeError:
    # The gateway gives every input; a check that skips itself there would let a join
    # through unchecked. Fail loudly (a 500 and a log line), never pass.
    return RuntimeError(f"step {step.name!r} skipped in a fail-fast run: {skip}")


async def _run_one(step: Step[S], state: S, timer: Timer) -> None:
    with timer(step.name):
        try:
            await step.run(state)
        except Skip as skip:
            raise _skipped(step, skip) from None


async def run_fail_fast(table: StepTable[S], state: S, *, timer: Timer = _no_timer) -> None:
    """Every step in order; the first failure is raised unchanged.

    A group of independent steps (the document ∥ the access token) starts eagerly, in
    table order, in this task: a step that finishes without waiting for anything (its
    caches warm: the usual join) costs no task at all. At the first step that has to wait
    (a cold JWKS or AIA fetch), that step and the rest of the group go on as tasks of a
    ``TaskGroup``, concurrently, exactly as the whole group used to. Either way the order
    of errors is the group's: a step that fails before any other started its wait is
    raised at once (the later ones never start, as a task group cancels a task that has
    not started); once tasks run, :func:`first_error` picks (a bug first, then table
    order).
    """
    for entry in table:
        if isinstance(entry, Step):
            await _run_one(entry, state, timer)
            continue
        for i, step in enumerate(entry):
            coro = _run_one(step, state, timer)
            try:
                waiting_on = coro.send(None)
            except StopIteration:
                continue  # done without waiting: the common case
            await _finish_concurrently(_Started(coro, waiting_on), entry[i + 1 :], state, timer)
            break


class _Started:
    """A step's coroutine that already ran up to its first wait (``waiting_on``, the
    future it yielded), resumed as an awaitable: the task awaiting this waits on that
    future, then drives the coroutine on (a cancellation is thrown into it)."""

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, None, None]:
        coro, waiting_on = self._coro, self._waiting_on
        while True:
            try:
                yield waiting_on
            except BaseException as exc:  # handed to the step as it came (a cancellation)
                resume = functools.partial(coro.throw, exc)
            else:
                resume = functools.partial(coro.send, None)
            try:
                waiting_on = resume()
            except StopIteration:
                return


async def _await(started: _Started) -> None:
    await started


async def _finish_concurrently(
    started: _Started, rest: tuple[Step[S], ...], state: S, timer: Timer
) -> None:
    """The group from its first waiting step on, concurrently (one task each)."""
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            tasks.append(tg.create_task(_await(started)))
            tasks += [tg.create_task(_run_one(step, state, timer)) for step in rest]
    except BaseExceptionGroup as group:
        raise first_error(group, tasks) from None


async def run_recording(table: StepTable[S], state: S) -> tuple[StepResult, ...]:
    """Every step whose ``needs`` passed, in table order; one or more rows per step."""
    rows: list[StepResult] = []
    status: dict[str, StepStatus] = {}
    for step in _flat(table):
        blocked = next((n for n in step.needs if status.get(n) != "ok"), None)
        if blocked is not None:
            rows.append(StepResult(step.name, "skipped", f"not run: {blocked} {status[blocked]}"))
            status[step.name] = "skipped"
            continue
        if step.record is not None:
            sub = await step.record(state)
            rows.extend(sub)
            status[step.name] = _overall(sub)
            continue
        try:
            detail = await step.run(state)
        except Skip as skip:
            rows.append(StepResult(step.name, "skipped", skip.reason))
            status[step.name] = "skipped"
        except GatewayError as exc:
            rows.append(StepResult(step.name, "failed", exc.detail, exc.code))
            status[step.name] = "failed"
        else:
            text = detail if isinstance(detail, str) else detail()
            rows.append(StepResult(step.name, "ok", text))
            status[step.name] = "ok"
    return tuple(rows)


def _overall(rows: tuple[StepResult, ...]) -> StepStatus:
    """A table step's status from its rows: failed if one failed, skipped if all were."""
    if any(r.status == "failed" for r in rows):
        return "failed"
    if all(r.status == "skipped" for r in rows):
        return "skipped"
    return "ok"


def first_error(
    group: BaseExceptionGroup[BaseException], tasks: list[asyncio.Task[None]]
) -> BaseException:
    """The error to report when concurrent steps failed.

    A bug (anything not ours) wins so that it is never disguised as a rejection;
    otherwise the first task's in table order (the document before the token).
    """
    leaves = list(_leaves(group))
    for exc in leaves:
        if not isinstance(exc, GatewayError):
            return exc
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            err = task.exception()
            assert err is not None
            return err
    return leaves[0]


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc
