"""Executors for tests that count what reaches a thread pool."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["GatedExecutor"]


class GatedExecutor(ThreadPoolExecutor):
    """Runs nothing until ``gate`` opens: builds pile up as pending."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.gate = threading.Event()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            self.gate.wait(10)
            return fn(*args, **kwargs)

        return super().submit(run)
