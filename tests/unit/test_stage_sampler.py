"""The storm's per-stage CPU sampler (benchmarks/stage_sampler.py): how a stack is filed.

Stacks are built from real frames of code compiled under the file names the rules match,
innermost last, so the table reads like a traceback.
"""

from __future__ import annotations

import gc
import signal
import ssl
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType

import pytest

from benchmarks.stage_sampler import (
    CLIENT_HANDSHAKE,
    EVENT_LOOP,
    GARBAGE_COLLECTOR,
    SERVER_HANDSHAKE,
    STAGES,
    _Sampler,
    breakdown,
    classify,
)


def _stack(files: list[str]) -> FrameType:
    """A real frame whose callers are functions in ``files`` (outermost first)."""
    call: object = sys._getframe
    for i, path in enumerate(reversed(files)):
        namespace: dict[str, object] = {"inner": call}
        code = compile(f"def f_{i}():\n    return inner()\n", path, "exec")
        exec(code, namespace)  # noqa: S102 - compiling test frames under chosen file names
        call = namespace[f"f_{i}"]
    frame = call()  # type: ignore[operator]
    assert isinstance(frame, FrameType)
    return frame


SERVE = "/srv/gateway/server/serve.py"


@pytest.mark.parametrize(
    ("files", "stage"),
    [
        pytest.param(
            [
                SERVE,
                "/lib/asyncio/events.py",
                "/srv/gateway/azure/attested.py",
                "/lib/json/decoder.py",
            ],
            "document",
            id="json inside the document check is the document's",
        ),
        pytest.param(
            [SERVE, "/srv/gateway/core/audit.py", "/lib/logging/__init__.py"],
            "audit",
            id="logging inside the auditor is audit",
        ),
        pytest.param(
            [SERVE, "/srv/gateway/join/forward.py", "/srv/gateway/core/metrics.py"],
            "metrics",
            id="a metric updated by the upstream client is metrics (innermost wins)",
        ),
        pytest.param(
            [SERVE, "/site/aiohttp/web_protocol.py", "/srv/gateway/http/routes.py"],
            "HTTP handlers",
            id="our route under aiohttp's protocol is ours",
        ),
        pytest.param(
            [SERVE, "/site/aiohttp/web_protocol.py", "/lib/asyncio/tasks.py"],
            "aiohttp server",
            id="aiohttp's request loop",
        ),
        pytest.param([SERVE], EVENT_LOOP, id="nothing inside the worker's outermost frame"),
        pytest.param([SERVE, "/lib/re/__init__.py"], EVENT_LOOP, id="an unmatched library"),
    ],
)
def test_stacks_are_filed_under_the_innermost_known_stage(files: list[str], stage: str) -> None:
    assert classify(_stack(files)) == stage


def test_handshakes_are_split_by_side() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
    seen: list[str] = []

    def probe() -> None:
        seen.append(classify(sys._getframe(1)))
        raise ssl.SSLWantReadError

    # ssl.SSLObject.do_handshake is the frame the rule matches; put a probe under it.
    client._sslobj = type("Probe", (), {"do_handshake": staticmethod(probe)})()  # type: ignore[assignment]
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    assert seen == [CLIENT_HANDSHAKE]
    assert SERVER_HANDSHAKE in STAGES


def test_the_breakdown_scales_shares_to_the_measured_cpu() -> None:
    out = breakdown(Counter({"document": 3_000_000, "audit": 1_000_000}), 0.004, joins=2)
    assert out["us_per_join"]["document"] == 3000.0
    assert out["us_per_join"]["audit"] == 1000.0
    assert out["us_per_join"]["rules"] == 0.0  # every stage is listed, sampled or not
    assert out["sampled_s_per_join"] == 0.002
    assert set(out["us_per_join"]) == set(STAGES)


def test_garbage_collections_are_timed_as_their_own_stage(tmp_path: Path) -> None:
    sampler = _Sampler(tmp_path, interval=1.0)
    gc.callbacks.append(sampler._on_gc)
    try:
        # Cycles enough to give the collector work: each one is found only by a collection.
        junk = []
        for _ in range(20_000):
            a: list[object] = []
            a.append(a)
            junk.append(a)
        del junk, a
        gc.collect()
    finally:
        gc.callbacks.remove(sampler._on_gc)
    spent = sampler._counts[GARBAGE_COLLECTOR]
    assert spent > 0
    # The next sample's weight leaves the collection out: it is already filed.
    assert sampler._gc_unsampled == spent
    # Pretend the collection happened since the previous sample, 1 µs of other work with it.
    sampler._last = time.thread_time_ns() - spent - 1_000
    sampler._on_sample(signal.SIGPROF, sys._getframe())
    assert sampler._gc_unsampled == 0
    filed_elsewhere = sum(n for s, n in sampler._counts.items() if s != GARBAGE_COLLECTOR)
    assert 1_000 <= filed_elsewhere < spent  # without the subtraction: >= spent + 1 µs
    assert GARBAGE_COLLECTOR in STAGES
