"""The README's error table is the API's documentation: it must list exactly CODES."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.protocol import CODES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_error_table_matches_the_codes() -> None:
    text = README.read_text()
    table = text.split("<!-- codes:begin", 1)[1].split("<!-- codes:end -->", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| (yes|no) \|", table, re.M)
    documented = {code: (int(status), retry == "yes") for code, status, retry in rows}
    expected = {c.value: (i.status, i.retryable) for c, i in CODES.items()}
    assert documented == expected


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text()[:400]
    assert "make demo" in head and "make test" in head
