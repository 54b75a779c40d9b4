"""``benchmarks/hostile.py`` runs (one sample per case) and reports what the README cites:
each case's CPU next to the normal join's, the ratios, the plot, and the work each hostile
class caused — which is asserted (counts, never time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.hostile import CASES, main

pytestmark = pytest.mark.integration

# (path-builder calls, untrusted candidates, AIA fetches) per request, by case.
WORK = {
    "normal join": (0, 0, 0),  # the chain is cached after the warm-up joins
    "reproducer, Azure name (key refused)": (0, 0, 0),
    "reproducer, other name (CAs dropped)": (1, 0, 0),
    "signer with a huge exponent": (0, 0, 0),
    "4 known-named intermediates (max search)": (1, 4, 0),
    "leaf with 300 caIssuers URLs": (1, 0, 1),
    "repeated hostile chain (cached failure)": (0, 0, 0),
}


def test_hostile_benchmark_reports_every_case_next_to_a_normal_join(tmp_path: Path) -> None:
    assert main(["--samples", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "hostile.png").stat().st_size > 0
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [c.name for c in CASES]
    for name, (calls, candidates, fetches) in WORK.items():
        row = rows[name]
        assert (row["path_builder_calls"], row["untrusted_candidates"], row["aia_fetches"]) == (
            calls,
            candidates,
            fetches,
        ), name
    assert set(result["ratios_to_normal_join"]) == set(WORK) - {"normal join"}
    assert result["worst_hostile"]["case"] in WORK
    assert result["max_signature_checks_per_request"] == 257
