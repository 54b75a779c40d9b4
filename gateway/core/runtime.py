"""Process-wide runtime settings for the long-running services (gateway, auth service).

The cyclic garbage collector. CPython's defaults (a young collection every 700 net
container allocations) are tuned for scripts, not for a server with hundreds of requests
in flight: a join allocates a few thousand containers, so the collector ran several times
per join, and each young collection promoted the objects of every join still in flight to
the older generations, whose growth then triggered full collections over every live
object — the VM-record and chain caches included. A storm's profile put the collector at
~6 % of a worker's CPU. Two changes, both standard for servers:

* ``gc.freeze()`` once the service has started: what exists then (modules, the app, the
  configuration, the dependencies) is moved to a permanent generation that no collection
  walks again.
* A young-generation threshold of 50,000: most of a request's objects die by reference
  counting before a collection runs, so far fewer reach the older generations.

Memory stays bounded: garbage in reference cycles (exceptions with tracebacks, futures) is
held until the next young collection, at most 50,000 net container allocations later —
a few MB. Reference counting still frees everything else at once.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["GC_THRESHOLDS", "tune_gc"]

# (young, middle, old): young collections every 50,000 net allocations; the middle and old
# generations keep CPython's ratios (a middle collection every 10 young ones, ...).
GC_THRESHOLDS: Final = (50_000, 10, 10)


def tune_gc() -> None:
    """Call once the service has started (after its imports, app and dependencies exist)."""
    gc.collect()  # nothing collectable goes into the permanent generation
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
