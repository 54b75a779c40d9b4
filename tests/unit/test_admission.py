"""Admission control: in flight, queue, shed, FIFO, timeouts, cancellation.

Joins are stand-in coroutines that hold their slot until the test releases them, so each
assertion is about the controller's state, not about timing.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.errors import Code, Overloaded
from gateway.http.admission import AdmissionController


class Joins:
    """Starts stand-in joins that enter a slot, record it, and wait to be released."""

    def __init__(self, controller: AdmissionController) -> None:
        self.controller = controller
        self.started: list[int] = []
        self.release: dict[int, asyncio.Event] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, n: int) -> None:
        self.release[n] = asyncio.Event()
        self.tasks[n] = asyncio.create_task(self._run(n))

    async def _run(self, n: int) -> None:
        async with self.controller.slot():
            self.started.append(n)
            await self.release[n].wait()

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


def controller(
    max_in_flight: int = 2, max_queue: int = 2, queue_timeout: float = 30.0
) -> AdmissionController:
    return AdmissionController(
        max_in_flight=max_in_flight,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        retry_after=3.0,
    )


async def test_five_joins_two_run_two_queue_one_is_shed_at_once() -> None:
    c = controller()
    joins = Joins(c)
    for n in range(5):
        joins.start(n)
    await joins.settle()
    assert joins.started == [0, 1]
    assert (c.in_flight, c.queued, c.shed) == (2, 2, 1)
    with pytest.raises(Overloaded) as info:
        await joins.tasks[4]
    assert info.value.code == Code.OVERLOADED
    assert info.value.status == 503
    assert info.value.retry_after == 3.0
    for n in range(4):
        joins.release[n].set()
    await asyncio.gather(*(joins.tasks[n] for n in range(4)))
    assert joins.started == [0, 1, 2, 3]
    assert (c.in_flight, c.queued, c.shed, c.admitted) == (0, 0, 1, 4)


async def test_queued_joins_start_in_arrival_order() -> None:
    c = controller(max_in_flight=1, max_queue=5)
    joins = Joins(c)
    for n in range(5):
        joins.start(n)
        await joins.settle()
    assert joins.started == [0]
    for n in range(5):
        joins.release[n].set()
        await joins.settle()
    assert joins.started == [0, 1, 2, 3, 4]


async def test_a_newcomer_does_not_overtake_the_queue() -> None:
    c = controller(max_in_flight=1, max_queue=2)
    joins = Joins(c)
    joins.start(0)
    joins.start(1)
    await joins.settle()
    joins.release[0].set()
    await asyncio.sleep(0)  # join 0 leaves: its slot is handed to join 1, not yet running
    assert (c.in_flight, c.queued) == (1, 0)
    joins.start(2)  # arrives before join 1 has run
    await joins.settle()
    assert joins.started == [0, 1]
    assert (c.in_flight, c.queued, c.shed) == (1, 1, 0)
    joins.release[1].set()
    joins.release[2].set()
    await asyncio.gather(*joins.tasks.values())
    assert joins.started == [0, 1, 2]


async def test_a_queued_join_gives_up_after_the_queue_timeout() -> None:
    c = controller(max_in_flight=1, max_queue=1, queue_timeout=0.05)
    joins = Joins(c)
    joins.start(0)
    joins.start(1)
    await joins.settle()
    with pytest.raises(Overloaded) as info:
        await joins.tasks[1]
    assert info.value.code == Code.OVERLOADED
    assert (c.in_flight, c.queued, c.timed_out, c.shed) == (1, 0, 1, 0)
    joins.release[0].set()
    await joins.tasks[0]
    assert c.in_flight == 0
    joins.start(2)  # the freed queue place and slot are usable again
    await joins.settle()
    assert joins.started == [0, 2]
    joins.release[2].set()
    await joins.tasks[2]


async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    c = controller(max_in_flight=1, max_queue=2)
    joins = Joins(c)
    for n in range(3):
        joins.start(n)
    await joins.settle()
    joins.tasks[1].cancel()
    await joins.settle()
    assert (c.in_flight, c.queued) == (1, 1)
    joins.release[0].set()
    await joins.settle()
    assert joins.started == [0, 2], "the slot skips the cancelled waiter"
    joins.release[2].set()
    await joins.tasks[2]
    assert (c.in_flight, c.queued) == (0, 0)


async def test_a_waiter_cancelled_after_the_hand_over_passes_the_slot_on() -> None:
    c = controller(max_in_flight=1, max_queue=2)
    joins = Joins(c)
    for n in range(3):
        joins.start(n)
    await joins.settle()
    joins.release[0].set()
    await asyncio.sleep(0)  # join 0 leaves and hands its slot to join 1 ...
    assert (c.in_flight, c.queued) == (1, 1) and joins.started == [0]
    joins.tasks[1].cancel()  # ... which is cancelled before it runs
    await joins.settle()
    assert joins.started == [0, 2]
    joins.release[2].set()
    await asyncio.gather(*joins.tasks.values(), return_exceptions=True)
    assert (c.in_flight, c.queued) == (0, 0)


async def test_a_failing_join_frees_its_slot() -> None:
    c = controller(max_in_flight=1, max_queue=0)
    with pytest.raises(RuntimeError):
        async with c.slot():
            raise RuntimeError("join failed")
    assert c.in_flight == 0
    async with c.slot():
        assert c.in_flight == 1


async def test_the_fast_path_never_suspends_or_creates_a_task() -> None:
    c = controller(max_in_flight=2, max_queue=1)
    before = len(asyncio.all_tasks())
    for _ in range(2):
        step = c.acquire().__await__()
        # Completing on the first step proves it awaited no future, timer or task.
        with pytest.raises(StopIteration):
            step.send(None)
    assert len(asyncio.all_tasks()) == before
    assert (c.in_flight, c.queued) == (2, 0)
    step = c.acquire().__await__()
    step.send(None)  # the third one has to wait: it suspends on its queue future
    assert c.queued == 1
    step.close()
    c.release()
    c.release()


@pytest.mark.parametrize(
    "kw",
    [
        {"max_in_flight": 0, "max_queue": 1, "queue_timeout": 1.0, "retry_after": 1.0},
        {"max_in_flight": 1, "max_queue": -1, "queue_timeout": 1.0, "retry_after": 1.0},
        {"max_in_flight": 1, "max_queue": 1, "queue_timeout": -1.0, "retry_after": 1.0},
    ],
    ids=[
        "no slot at all is refused",
        "a negative queue is refused",
        "a negative timeout is refused",
    ],
)
def test_bad_parameters_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdmissionController(**kw)  # type: ignore[arg-type]
