"""Running an experiment's child in one tree: what the before/after experiments share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_in_tree"]


def run_in_tree(tree: Path, argv: Sequence[str], *, cwd: Path | None = None) -> dict[str, Any]:
    """``python *argv`` with ``PYTHONPATH`` set to ``tree`` (its ``gateway`` is the one
    imported), and the JSON object the child printed last on stdout."""
    result = subprocess.run(
        [sys.executable, *argv],
        env=dict(os.environ, PYTHONPATH=str(tree)),
        check=True,
        capture_output=True,
        text=True,
        cwd=None if cwd is None else str(cwd),
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))
