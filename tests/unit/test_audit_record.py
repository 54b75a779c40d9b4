"""The audit record (gateway/core/audit.py): one JSON line per decision, serialised once,
byte for byte what ``json.dumps(sort_keys=True)`` of the record would be."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest

from gateway.core.audit import AUDIT_FIELDS, Auditor
from gateway.core.clock import FixedClock


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _auditor(at: datetime) -> tuple[Auditor, _Lines]:
    logger = logging.getLogger(f"test.audit.{id(at)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    lines = _Lines()
    logger.addHandler(lines)
    return Auditor(clock=FixedClock(at), logger=logger), lines


def _record(
    auditor: Auditor, facts: dict[str, str], labels: dict[str, str] | None = None
) -> dict[str, object]:
    return auditor.record(
        request_id="req-1",
        client_address="10.1.2.3",
        outcome="rejected",
        code="attested_expired",
        detail="now … outside the window «ü»",
        facts=facts,
        steps={"upstream": 0.0021, "document": 0.00012345, "challenge": 1e-06},
        duration=0.0123456,
        host_id=None,
        labels=labels,
    )


@pytest.mark.parametrize(
    "at",
    [
        pytest.param(datetime(2026, 1, 1, tzinfo=UTC), id="a whole second"),
        pytest.param(datetime(2026, 7, 28, 13, 24, 0, 999_999, tzinfo=UTC), id="the last µs"),
        pytest.param(datetime(2026, 7, 28, 13, 24, 5, 1_000, tzinfo=UTC), id="one millisecond"),
        pytest.param(datetime(1999, 12, 31, 23, 59, 59, 500_500, tzinfo=UTC), id="last century"),
    ],
)
def test_the_line_is_the_sorted_json_of_the_record(at: datetime) -> None:
    auditor, lines = _auditor(at)
    labels = {"azure/tag/env": "prod", "azure/location": "westeurope"}
    rec = _record(auditor, {"token_name": "azure-token", "vm_id": "b1310a36"}, labels)
    assert rec["labels"] == labels
    assert lines.lines == [json.dumps(rec, separators=(",", ":"), sort_keys=True)]
    assert rec["time"] == at.isoformat(timespec="milliseconds")
    assert sorted(rec) == sorted(AUDIT_FIELDS)
    assert rec["node_name"] is None  # a fact not established is null, not missing


def test_the_second_is_formatted_again_when_it_changes() -> None:
    clock = FixedClock(datetime(2026, 1, 1, 0, 0, 0, 250_000, tzinfo=UTC))
    auditor = Auditor(clock=clock, logger=logging.getLogger("test.audit.seconds"))
    first = _record(auditor, {})["time"]
    clock.advance(1.5)
    assert (first, _record(auditor, {})["time"]) == (
        "2026-01-01T00:00:00.250+00:00",
        "2026-01-01T00:00:01.750+00:00",
    )


def test_nothing_is_written_when_the_audit_logger_is_off() -> None:
    auditor, lines = _auditor(datetime(2026, 1, 1, tzinfo=UTC))
    auditor._log.setLevel(logging.WARNING)
    rec = _record(auditor, {})
    assert lines.lines == []
    assert rec["outcome"] == "rejected"


def test_labels_not_established_are_null() -> None:
    auditor, _ = _auditor(datetime(2026, 1, 1, tzinfo=UTC))
    assert _record(auditor, {})["labels"] is None
