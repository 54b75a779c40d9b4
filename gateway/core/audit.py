"""The audit log: one JSON line per join decision.

Records go to the ``gateway.audit`` logger as a JSON string, so operators route them
like any log (a file, journald, a collector). A record names what was decided and why
(``detail``, which a 403 body never shows) and the node labels forwarded (verified
Azure attributes), and never carries an access token, a document, a key or a challenge
key: it is built from an allow-list of fields.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from gateway.core.clock import Clock

__all__ = ["AUDIT_FIELDS", "Auditor"]

AUDIT_FIELDS = (
    "time",
    "request_id",
    "client_address",
    "token_name",
    "node_name",
    "tenant",
    "subscription",
    "resource_group",
    "vm_id",
    "resource_id",
    "outcome",
    "code",
    "detail",
    "host_id",
    "labels",
    "duration_ms",
    "steps_ms",
)


# One encoder, built once: ``json.dumps`` with non-default arguments builds a new
# encoder on every call, and ``sort_keys`` sorts every record again. The record is
# assembled in sorted key order instead (and ``steps_ms`` sorted once), so the line is
# byte for byte what ``json.dumps(rec, separators=(",", ":"), sort_keys=True)`` wrote.
_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


class Auditor:
    def __init__(self, *, clock: Clock, logger: logging.Logger | None = None) -> None:
        self._clock = clock
        self._log = logger or logging.getLogger("gateway.audit")
        # "YYYY-MM-DDTHH:MM:SS" of the last second seen: formatted once a second, not per
        # record.
        self._second = -1
        self._second_text = ""

    def _time(self) -> str:
        """``datetime.isoformat(timespec="milliseconds")`` of the clock's time, in UTC."""
        micros = round(self._clock.time() * 1_000_000)
        second, fraction = divmod(micros, 1_000_000)
        if second != self._second:
            self._second_text = datetime.fromtimestamp(second, tz=UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
            self._second = second
        return f"{self._second_text}.{fraction // 1000:03d}+00:00"

    def record(
        self,
        *,
        request_id: str,
        client_address: str,
        outcome: str,
        code: str | None,
        detail: str | None,
        facts: Mapping[str, str],
        steps: Mapping[str, float],
        duration: float,
        host_id: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> dict[str, object]:
        """``labels``: the node labels the join established (null before that step)."""
        get = facts.get
        rec: dict[str, object] = {  # keys in sorted order: see _ENCODE
            "client_address": client_address,
            "code": code,
            "detail": detail,
            "duration_ms": round(duration * 1000, 3),
            "host_id": host_id,
            "labels": None if labels is None else dict(sorted(labels.items())),
            "node_name": get("node_name"),
            "outcome": outcome,
            "request_id": request_id,
            "resource_group": get("resource_group"),
            "resource_id": get("resource_id"),
            "steps_ms": {k: round(steps[k] * 1000, 3) for k in sorted(steps)},
            "subscription": get("subscription"),
            "tenant": get("tenant"),
            "time": self._time(),
            "token_name": get("token_name"),
            "vm_id": get("vm_id"),
        }
        log = self._log
        if log.isEnabledFor(logging.INFO):
            # makeRecord + handle is what ``log.info`` does, minus walking the stack for
            # the caller's file and line (which no audit format shows).
            log.handle(
                log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (_ENCODE(rec),), None)
            )
        return rec
