"""The audit log: one JSON line per join decision.

Records go to the ``gateway.audit`` logger as a JSON string, so operators route them
like any log (a file, journald, a collector). A record names what was decided and why
(``detail``, which a 403 body never shows), and never carries an access token, a
document, a key or a challenge key: it is built from an allow-list of fields.
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
    "duration_ms",
    "steps_ms",
)


class Auditor:
    def __init__(self, *, clock: Clock, logger: logging.Logger | None = None) -> None:
        self._clock = clock
        self._log = logger or logging.getLogger("gateway.audit")

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
    ) -> dict[str, object]:
        rec: dict[str, object] = {
            "time": datetime.fromtimestamp(self._clock.time(), tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "request_id": request_id,
            "client_address": client_address,
            "outcome": outcome,
            "code": code,
            "detail": detail,
            "host_id": host_id,
            "duration_ms": round(duration * 1000, 3),
            "steps_ms": {k: round(v * 1000, 3) for k, v in steps.items()},
        }
        for key in (
            "token_name",
            "node_name",
            "tenant",
            "subscription",
            "resource_group",
            "vm_id",
            "resource_id",
        ):
            rec[key] = facts.get(key)
        self._log.info("%s", json.dumps(rec, separators=(",", ":"), sort_keys=True))
        return rec
