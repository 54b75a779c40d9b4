"""Admission control for joins: bounded in flight, a short FIFO queue, then shed (DESIGN §5).

Under a join storm an unbounded server admits everything, every join slows down together,
and all of them time out — including the ones it could have finished. Bounding the work in
flight keeps the admitted joins fast; a short queue absorbs bursts; beyond that a join is
refused at once with ``503`` + ``Retry-After`` (``Overloaded(OVERLOADED)``) so the agent
backs off with jitter and comes back, instead of holding a connection open.

* ``max_in_flight`` joins run at once; the next ``max_queue`` wait in arrival order (a
  released slot is handed straight to the oldest waiter, so a newcomer cannot overtake the
  queue); a waiter gives up after ``queue_timeout`` seconds with ``503``.
* The fast path (a free slot, nobody queued) is two integer updates: no task, future or
  timer is created unless the caller has to wait.
* ``in_flight``, ``queued`` and ``shed`` are readable for metrics and tests.

Usage: ``async with controller.slot(): ...``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from types import TracebackType

from gateway.core.errors import Code, Overloaded

__all__ = ["AdmissionController", "AdmissionSlot"]

logger = logging.getLogger(__name__)


class AdmissionSlot:
    """The async context manager ``AdmissionController.slot()`` returns (reusable: it
    holds no per-use state)."""

    __slots__ = ("_controller",)

    def __init__(self, controller: AdmissionController) -> None:
        self._controller = controller

    async def __aenter__(self) -> None:
        await self._controller.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._controller.release()


class AdmissionController:
    """Parameters:

    * max_in_flight — joins running at once (>= 1).
    * max_queue — joins waiting for a slot (>= 0); beyond it, shed at once.
    * queue_timeout — the longest a queued join waits (seconds).
    * retry_after — the ``Retry-After`` seconds sent with a shed join.
    """

    def __init__(
        self, *, max_in_flight: int, max_queue: int, queue_timeout: float, retry_after: float
    ) -> None:
        if max_in_flight < 1 or max_queue < 0 or queue_timeout < 0 or retry_after < 0:
            raise ValueError(
                "max_in_flight must be >= 1; max_queue, queue_timeout, retry_after >= 0"
            )
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._slot = AdmissionSlot(self)
        self.shed = 0  # refused at once: queue full
        self.timed_out = 0  # gave up in the queue
        self.admitted = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def slot(self) -> AdmissionSlot:
        """``async with controller.slot():`` runs the body holding one slot."""
        return self._slot

    async def acquire(self) -> None:
        """Take a slot, queue for one, or raise ``Overloaded(OVERLOADED)``."""
        if self._in_flight < self.max_in_flight and not self._waiters:
            self._in_flight += 1
            self.admitted += 1
            return
        if len(self._waiters) >= self.max_queue:
            self.shed += 1
            raise Overloaded(
                Code.OVERLOADED,
                retry_after=self.retry_after,
                detail=(f"{self._in_flight} joins in flight and {len(self._waiters)} queued: shed"),
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await fut
        except TimeoutError:
            if self._granted(fut):
                self.admitted += 1
                return  # the slot arrived as the timer fired: keep it
            self.timed_out += 1
            raise Overloaded(
                Code.OVERLOADED,
                retry_after=self.retry_after,
                detail=f"waited {self.queue_timeout:g}s in the admission queue",
            ) from None
        except BaseException:
            if self._granted(fut):
                self.release()  # cancelled after the hand-over: pass the slot on
            raise
        self.admitted += 1

    def release(self) -> None:
        """Give a slot back: to the oldest live waiter, else to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves; in_flight is unchanged
                return
        self._in_flight -= 1

    def _granted(self, fut: asyncio.Future[None]) -> bool:
        """Whether ``fut`` was handed a slot; if not, take it out of the queue."""
        if fut.done() and not fut.cancelled():
            return True
        if fut in self._waiters:
            self._waiters.remove(fut)
        return False

    def __repr__(self) -> str:
        return (
            f"<AdmissionController in_flight={self._in_flight}/{self.max_in_flight} "
            f"queued={len(self._waiters)}/{self.max_queue} shed={self.shed} "
            f"timed_out={self.timed_out}>"
        )
