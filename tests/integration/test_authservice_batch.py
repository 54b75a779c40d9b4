"""``POST /v1/register/batch`` of the reference auth service, over real mTLS on 127.0.0.1.

Each item is answered as ``/v1/register`` answers it (the same function runs both), in
request order, and one item's refusal leaves its batch-mates' answers alone; a batch that
breaks the batch rules is refused whole with one code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.authservice import AuthPaths, AuthService, LockTarget
from gateway.core.tlsutil import client_ssl_context
from gateway.protocol import MAX_BATCH, REGISTER_BATCH_PATH, Registration
from tests.integration.test_authservice import (
    gateway_ctx,
    make_reg,
    new_keys,
    paths,
    post_raw,
    service,
)

pytestmark = pytest.mark.integration

__all__ = ["paths", "service"]  # fixtures, imported for pytest

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def vm_reg(i: int, *, key: str | None = None) -> Registration:
    """A registration of VM number ``i`` (its own vmId, node name and key)."""
    reg = make_reg(new_keys(), key=key or f"batch-key-{i:04d}")
    vm_id = f"22222222-2222-2222-2222-{i:012d}"
    return replace(
        reg,
        join=replace(reg.join, vm_id=vm_id),
        host=replace(reg.host, node_name=f"web-{i}"),
    )


def batch_body(regs: list[Registration] | list[dict[str, Any]]) -> bytes:
    items = [r.to_json() if isinstance(r, Registration) else r for r in regs]
    return json.dumps({"registrations": items}).encode()


async def post_batch(
    svc: AuthService, paths: AuthPaths, body: bytes, *, content_type: str = "application/json"
) -> tuple[int, Any]:
    return await post_raw(
        svc, gateway_ctx(paths), body, content_type=content_type, path=REGISTER_BATCH_PATH
    )


async def test_a_batch_registers_each_item_and_answers_in_request_order(
    service: AuthService, paths: AuthPaths
) -> None:
    regs = [vm_reg(i) for i in range(5)]
    status, body = await post_batch(service, paths, batch_body(regs))
    assert status == 200
    results = body["results"]
    assert [r["status"] for r in results] == [200] * 5
    assert all(r["replay"] is False and r["renewal"] is False for r in results)
    records = await service.records()
    assert len(records) == 5
    # Request order: item i's host is VM i's.
    by_vm = {rec.registration.join.vm_id: rec.host_id for rec in records}
    assert [r["host_id"] for r in results] == [by_vm[reg.join.vm_id] for reg in regs]
    assert set(results[0]) == {"status", "host_id", "certs", "renewal", "replay"}


async def test_a_locked_host_is_refused_next_to_a_batch_mate_that_registers(
    service: AuthService, paths: AuthPaths
) -> None:
    locked, free = vm_reg(1), vm_reg(2)
    await service.registry.add_lock(
        LockTarget.VM_ID, locked.join.vm_id, reason="compromised", now=NOW
    )
    status, body = await post_batch(service, paths, batch_body([locked, free]))
    assert status == 200
    refused, ok = body["results"]
    assert refused["status"] == 403
    assert refused["code"] == "host_locked"
    assert "compromised" in refused["message"]
    assert refused["retry_after"] is None
    assert ok["status"] == 200
    assert [r.registration.join.vm_id for r in await service.records()] == [free.join.vm_id]


async def test_a_replayed_item_gets_the_stored_answer_and_a_conflict_is_409(
    service: AuthService, paths: AuthPaths
) -> None:
    first, second = vm_reg(1), vm_reg(2)
    status, body = await post_batch(service, paths, batch_body([first]))
    assert status == 200
    stored = body["results"][0]
    conflicting = replace(first, client_address="198.51.100.1")
    # The same key with a different body, in another request, next to a fresh item.
    status, body = await post_batch(service, paths, batch_body([second, conflicting]))
    assert status == 200
    fresh, conflict = body["results"]
    assert fresh["status"] == 200
    assert (conflict["status"], conflict["code"]) == (409, "idempotency_conflict")
    status, body = await post_batch(service, paths, batch_body([first]))
    (replayed,) = body["results"]
    assert replayed["replay"] is True
    assert {k: replayed[k] for k in ("host_id", "certs")} == {
        k: stored[k] for k in ("host_id", "certs")
    }
    assert len(await service.records()) == 2


async def test_a_batch_item_and_a_single_registration_share_idempotency(
    service: AuthService, paths: AuthPaths
) -> None:
    reg = vm_reg(3)
    status, single = await post_raw(service, gateway_ctx(paths), json.dumps(reg.to_json()).encode())
    assert status == 200
    status, body = await post_batch(service, paths, batch_body([reg]))
    (item,) = body["results"]
    assert item["replay"] is True
    assert item["host_id"] == single["host_id"]
    assert item["certs"] == single["certs"]


async def test_a_full_batch_of_64_is_accepted(service: AuthService, paths: AuthPaths) -> None:
    regs = [vm_reg(i) for i in range(MAX_BATCH)]
    status, body = await post_batch(service, paths, batch_body(regs))
    assert status == 200
    assert [r["status"] for r in body["results"]] == [200] * MAX_BATCH
    assert len({r["host_id"] for r in body["results"]}) == MAX_BATCH
    assert len(await service.records()) == MAX_BATCH


@dataclass(frozen=True)
class BadBatch:
    body: bytes
    status: int
    code: str
    content_type: str = "application/json"


def _bad_item() -> dict[str, Any]:
    item = vm_reg(9).to_json()
    item["role"] = "Emperor"
    return item


BAD_BATCHES = [
    (
        "65 registrations are refused whole",
        BadBatch(batch_body([vm_reg(i) for i in range(MAX_BATCH + 1)]), 400, "invalid_request"),
    ),
    ("an empty batch is refused", BadBatch(batch_body([]), 400, "invalid_request")),
    (
        "two items with one idempotency key are refused whole",
        BadBatch(
            batch_body([vm_reg(1, key="same-key"), vm_reg(2, key="same-key")]),
            400,
            "invalid_request",
        ),
    ),
    (
        "one malformed item refuses the whole batch",
        BadBatch(batch_body([vm_reg(1), _bad_item()]), 400, "invalid_request"),
    ),
    (
        "registrations that are not a list are refused",
        BadBatch(json.dumps({"registrations": {}}).encode(), 400, "invalid_request"),
    ),
    (
        "an unknown top-level field is refused",
        BadBatch(
            json.dumps({"registrations": [vm_reg(1).to_json()], "x": 1}).encode(),
            400,
            "invalid_request",
        ),
    ),
    ("a body that is not JSON is refused", BadBatch(b"{", 400, "malformed_body")),
    (
        "a wrong content type is refused",
        BadBatch(batch_body([vm_reg(1)]), 415, "unsupported_media_type", "text/plain"),
    ),
]


@pytest.mark.parametrize("case", [c for _, c in BAD_BATCHES], ids=[i for i, _ in BAD_BATCHES])
async def test_a_batch_that_breaks_the_rules_is_refused_whole(
    service: AuthService, paths: AuthPaths, case: BadBatch
) -> None:
    status, body = await post_batch(service, paths, case.body, content_type=case.content_type)
    assert (status, body["error"]["code"]) == (case.status, case.code)
    assert await service.records() == []


async def test_the_item_that_broke_a_batch_is_named(service: AuthService, paths: AuthPaths) -> None:
    status, body = await post_batch(service, paths, batch_body([vm_reg(1), _bad_item()]))
    assert status == 400
    assert body["error"]["message"].startswith("registrations[1]: ")


async def test_the_single_endpoint_keeps_its_own_body_cap(
    service: AuthService, paths: AuthPaths
) -> None:
    # The app's cap is the batch's (64 registrations); one registration stays at 64 KiB.
    padded = vm_reg(1).to_json()
    padded["labels"] = {"pad": "x" * 70_000}
    raw = json.dumps(padded).encode()
    status, body = await post_raw(service, gateway_ctx(paths), raw)
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    too_big = b'{"registrations":["' + b"x" * (64 * 65 * 1024) + b'"]}'
    status, body = await post_batch(service, paths, too_big)
    assert (status, body["error"]["code"]) == (413, "body_too_large")


async def test_the_admin_certificate_cannot_register_in_batches(
    service: AuthService, paths: AuthPaths
) -> None:
    ctx = client_ssl_context(
        paths.internal_ca_cert, cert_file=paths.admin_cert, key_file=paths.admin_key
    )
    status, body = await post_raw(service, ctx, batch_body([vm_reg(1)]), path=REGISTER_BATCH_PATH)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert await service.records() == []
