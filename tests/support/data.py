"""Where the vendored test data lives (tests/data/, see its README for provenance)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA", "REAL", "REAL_ATTESTED", "REAL_CA"]

DATA = Path(__file__).resolve().parents[1] / "data"
REAL = DATA / "azure-real"
REAL_ATTESTED = REAL / "attested"
REAL_CA = REAL / "ca"
