"""Process-wide runtime settings (gateway/core/runtime.py), checked in a fresh interpreter:
they change the process they run in, and this one is the test runner."""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path

from gateway.core.runtime import GC_THRESHOLDS

_PROBE = """
import gc, json
before = gc.get_freeze_count()
from gateway.core.runtime import tune_gc
import gateway.server.serve  # what a started gateway has imported, at least
tune_gc()
cycle = []
cycle.append(cycle)  # made after the freeze: collectable as ever
del cycle
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(),
                  "threshold": gc.get_threshold(), "collected": gc.collect()}))
"""


def test_tune_gc_freezes_what_exists_and_raises_the_young_threshold() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(out.stdout)
    assert seen["before"] == 0
    assert seen["frozen"] > 10_000  # the modules and their objects, walked no more
    assert tuple(seen["threshold"]) == GC_THRESHOLDS
    assert seen["collected"] >= 1  # a cycle made later is still found


def test_a_profiled_gateway_exits_through_the_profiler_so_its_stats_are_written(
    tmp_path: Path,
) -> None:
    """``serve.run`` skips the interpreter's teardown with ``os._exit``, except under
    ``python -m cProfile`` (the storm's ``--profile-gateway``): there the profiler writes
    its stats as SystemExit unwinds (and, being cProfile, exits 0)."""
    script = tmp_path / "serve_once.py"
    script.write_text(
        "from gateway.server import serve\n"
        "serve._run = lambda config, metrics_dir: 3  # the service ran and ended with 3\n"
        "serve.run(None)  # type: ignore[arg-type]\n",
        encoding="utf-8",
    )
    stats = tmp_path / "gateway.pstats"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(stats), str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    names = {func for _, _, func in pstats.Stats(str(stats)).stats}  # type: ignore[attr-defined]
    assert "run" in names
    # Not profiled: the same exit code, by os._exit.
    plain = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert plain.returncode == 3, plain.stderr
