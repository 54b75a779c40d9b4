"""A short, bounded atheris run of every fuzz target inside ``make test``.

Each target runs in its own process (``atheris.Fuzz`` ends the process) for a fixed
number of inputs from a fixed seed, starting from valid seeds: a crash — any exception that
is not the module's own error — fails the test with libFuzzer's report. The long run is
``make fuzz``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS, write_seeds

REPO = Path(__file__).resolve().parents[2]
RUNS = {"cms": 1500, "certificate": 3000, "token": 3000, "der": 3000}


@pytest.mark.parametrize(
    "target",
    sorted(TARGETS),
    ids=[f"{t} survives a bounded atheris run" for t in sorted(TARGETS)],
)
def test_fuzz_target_short_run(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_seeds(target, corpus)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.targets",
            target,
            f"-runs={RUNS[target]}",
            "-seed=8",
            "-max_len=8192",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done" in proc.stderr, proc.stderr[-2000:]
