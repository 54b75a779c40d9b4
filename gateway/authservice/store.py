"""The auth service's registration records: one JSON file per registration, on disk.

Each file (``registrations/<host_id>.json``) holds who asked (gateway certificate subject,
client address), what was verified (the join block), what was asked for (host params),
what was issued (the response), when, and the idempotency key with a digest of the
request. Files are written with ``gateway.core.files.write_atomic`` (temp file, fsync,
rename, fsync of the directory) so a crash leaves the old state or the new, never half a
record.

The in-memory index by idempotency key is rebuilt from the files at start-up, so a
gateway retrying after an auth service restart still gets the stored answer rather than
a second host ID. Concurrent requests with one key within the process are coalesced:
the first issues and writes, the others wait for its outcome (single flight).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.authservice.wire import AuthServiceError, ErrorCode
from gateway.core.files import write_atomic
from gateway.protocol import HostParams, JoinBlock, RegisterResult, Registration

__all__ = ["RegistrationRecord", "RegistrationStore"]

log = logging.getLogger(__name__)

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


class RegistrationStore:
    """Records on disk under ``directory`` plus an in-memory index by idempotency key.

    Call :meth:`load` once before use (the app's cleanup context does).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._dir = Path(directory)
        self._by_key: dict[str, RegistrationRecord] = {}
        self._inflight: dict[str, asyncio.Future[RegistrationRecord]] = {}

    async def load(self) -> None:
        records = await asyncio.to_thread(self._read_all)
        self._by_key = {r.idempotency_key: r for r in records}
        log.info("loaded %s registration records from %s", len(records), self._dir)

    def _read_all(self) -> list[RegistrationRecord]:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        out: list[RegistrationRecord] = []
        for path in sorted(self._dir.glob("*.json")):
            if path.name.startswith("."):
                continue  # a temp file left by a crash mid-write: never renamed, not a record
            try:
                out.append(RegistrationRecord.from_json(json.loads(path.read_text("utf-8"))))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Refuse to start rather than silently forget a key: that would hand a
                # retrying gateway a second identity for the same join.
                raise ValueError(f"{path}: unreadable registration record: {exc}") from exc
        return out

    def records(self) -> list[RegistrationRecord]:
        return sorted(self._by_key.values(), key=lambda r: (r.registered_at, r.host_id))

    def __len__(self) -> int:
        return len(self._by_key)

    async def register(
        self,
        reg: Registration,
        *,
        digest: str,
        create: Callable[[], RegistrationRecord],
    ) -> tuple[RegistrationRecord, bool]:
        """The record for ``reg``'s idempotency key: stored if known, else ``create()``d,
        written and indexed. Returns ``(record, created)``; raises ``AuthServiceError``
        (409) when the key is known with a different request.
        """
        key = reg.idempotency_key
        while True:
            existing = self._by_key.get(key)
            if existing is not None:
                return _same_request(existing, digest), False
            pending = self._inflight.get(key)
            if pending is None:
                break
            # Another request with this key is being issued: wait for its outcome. If it
            # failed, loop and try ourselves.
            await asyncio.wait([pending])

        fut: asyncio.Future[RegistrationRecord] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            record = create()
            await asyncio.to_thread(self._write, record)
            self._by_key[key] = record
            fut.set_result(record)
            return record, True
        except BaseException:
            fut.cancel()
            raise
        finally:
            del self._inflight[key]

    def _write(self, record: RegistrationRecord) -> None:
        data = json.dumps(record.to_json(), indent=2, sort_keys=True).encode()
        write_atomic(self._dir / f"{record.host_id}.json", data + b"\n", mode=0o600)

    def __repr__(self) -> str:
        return f"<RegistrationStore {self._dir} records={len(self._by_key)}>"


def _same_request(record: RegistrationRecord, digest: str) -> RegistrationRecord:
    if record.request_digest != digest:
        raise AuthServiceError(
            409,
            ErrorCode.IDEMPOTENCY_CONFLICT,
            "idempotency_key was already used for a different registration",
        )
    return record
