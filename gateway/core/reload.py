"""``Reloadable[T]``: one value that SIGHUP replaces whole (token registry, challenge keys).

The deps object is frozen; what may change at run time sits in a holder whose ``current``
is swapped by one attribute assignment. A join reads ``current`` once per step and keeps
what it read, so it sees one version from start to end; a reload that fails keeps the
previous value and says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from gateway.core.config import ConfigError

__all__ = ["Reloadable"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Reloadable(Generic[T]):
    """Parameters:

    * name — what the value is, for log lines ("tokens", "challenge keys").
    * load — builds a fresh value (reads its files); raises ``ConfigError``, ``OSError``
      or ``ValueError`` when they are wrong.
    * initial — the first value; ``None`` calls ``load`` now (and lets its error out, so
      a bad file at startup stops the start).
    """

    def __init__(self, name: str, load: Callable[[], T], *, initial: T | None = None) -> None:
        self.name = name
        self._load = load
        self._current: T = load() if initial is None else initial
        self.reloads = 0  # successful swaps, for tests and logs

    @classmethod
    def fixed(cls, name: str, value: T) -> Reloadable[T]:
        """A holder whose reload yields the same value (tests, embedded use)."""
        return cls(name, lambda: value, initial=value)

    @property
    def current(self) -> T:
        return self._current

    def reload(self) -> bool:
        """Load anew and swap; on failure keep the current value, log why, return False."""
        try:
            value = self._load()
        except (ConfigError, OSError, ValueError) as exc:
            log.error("%s reload failed, keeping the previous version: %s", self.name, exc)
            return False
        self._current = value  # one assignment: readers see the old or the new, whole
        self.reloads += 1
        log.info("%s reloaded", self.name)
        return True

    def __repr__(self) -> str:
        return f"<Reloadable {self.name} {self._current!r} reloads={self.reloads}>"
