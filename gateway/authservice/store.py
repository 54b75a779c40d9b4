"""Registration records in their JSON form, and the JSON-file directory as an import source.

Before the registry (``registry/``), the auth service kept one JSON file per registration;
the registry imports such a directory once, at its first start, and keeps each record in
this same JSON form. Each file (``registrations/<host_id>.json``) holds who asked (gateway
certificate subject, client address), what was verified (the join block), what was asked
for (host params), what was issued (the response), when, and the idempotency key with a
digest of the request. Files are written with ``gateway.core.files.write_atomic`` (temp
file, fsync, rename, fsync of the directory) so a crash leaves the old state or the new,
never half a record.

"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.core.files import write_atomic
from gateway.protocol import HostParams, JoinBlock, RegisterResult, Registration

__all__ = ["RegistrationRecord", "read_records", "write_record"]

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RegistrationRecord:
    host_id: str
    idempotency_key: str
    request_digest: str
    registered_at: datetime
    gateway: str
    registration: Registration
    result: RegisterResult

    def to_json(self) -> dict[str, Any]:
        reg = self.registration.to_json()
        reg.pop("idempotency_key")
        return {
            "version": _FORMAT_VERSION,
            "host_id": self.host_id,
            "idempotency_key": self.idempotency_key,
            "request_digest": self.request_digest,
            "registered_at": self.registered_at.isoformat().replace("+00:00", "Z"),
            "gateway": self.gateway,
            **reg,
            "response": {"host_id": self.host_id, "certs": self.result.to_json()},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RegistrationRecord:
        if doc.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unknown record version {doc.get('version')!r}")
        h = doc["host"]
        registration = Registration(
            idempotency_key=doc["idempotency_key"],
            token_name=doc["token_name"],
            role=doc["role"],
            client_address=doc["client_address"],
            join=JoinBlock(**doc["join"]),
            host=HostParams(
                node_name=h["node_name"],
                role=h["role"],
                public_ssh_key=h["public_ssh_key"],
                public_tls_key=h["public_tls_key"],
                additional_principals=tuple(h["additional_principals"]),
                dns_names=tuple(h["dns_names"]),
            ),
            labels=MappingProxyType(dict(doc.get("labels", {}))),
        )
        result = RegisterResult.from_json(doc["response"])
        if result.host_id != doc["host_id"]:
            raise ValueError("response.host_id differs from host_id")
        return cls(
            host_id=doc["host_id"],
            idempotency_key=doc["idempotency_key"],
            request_digest=doc["request_digest"],
            registered_at=datetime.fromisoformat(doc["registered_at"]),
            gateway=doc["gateway"],
            registration=registration,
            result=result,
        )


def read_records(directory: str | os.PathLike[str]) -> list[RegistrationRecord]:
    """Every record under ``directory`` (none if it does not exist), oldest first.

    An unreadable record is a ``ValueError``: the import refuses to start rather than
    silently forget a key, which would hand a retrying gateway a second identity.
    """
    out: list[RegistrationRecord] = []
    root = Path(directory)
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*.json")):
        if path.name.startswith("."):
            continue  # a temp file left by a crash mid-write: never renamed, not a record
        try:
            out.append(RegistrationRecord.from_json(json.loads(path.read_text("utf-8"))))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable registration record: {exc}") from exc
    return sorted(out, key=lambda r: (r.registered_at, r.host_id))


def write_record(directory: str | os.PathLike[str], record: RegistrationRecord) -> Path:
    """Write one record in this format (what auth services before the registry did; the
    import tests make such directories with it)."""
    data = json.dumps(record.to_json(), indent=2, sort_keys=True).encode()
    path = Path(directory) / f"{record.host_id}.json"
    write_atomic(path, data + b"\n", mode=0o600, make_parents=True)
    return path
