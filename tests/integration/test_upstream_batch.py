"""AuthClient against the reference auth service: registrations in batches, end to end.

The auth service is the real app (registry, local CAs, signing) over real mTLS on
127.0.0.1, with one outer middleware that counts the HTTP requests it receives per path —
so "far fewer requests than registrations" is counted where the work is done.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from gateway.authservice import (
    AuthPaths,
    HostAuthority,
    LockTarget,
    Registry,
    make_auth_app,
    open_registry,
)
from gateway.authservice.signing import LocalSigner
from gateway.core.clock import SystemClock
from gateway.core.errors import Code, JoinRejected
from gateway.join.forward import AuthClient
from gateway.protocol import REGISTER_BATCH_PATH, REGISTER_PATH, RegisterResult, Registration
from tests.integration.test_authservice import gateway_ctx, make_reg, new_keys, paths
from tests.support.mtls_site import serve_mtls

pytestmark = pytest.mark.integration

__all__ = ["paths"]  # the fixture, imported for pytest

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def vm_reg(i: int) -> Registration:
    reg = make_reg(new_keys(), key=f"storm-key-{i:05d}")
    return replace(
        reg,
        join=replace(reg.join, vm_id=f"22222222-2222-2222-2222-{i:012d}"),
        host=replace(reg.host, node_name=f"vm-{i}"),
    )


@dataclass
class Counted:
    url: str
    registry: Registry
    requests: Counter[str] = field(default_factory=Counter)
    batch_sizes: list[int] = field(default_factory=list)  # per batch request answered
    replays: int = 0  # registrations answered from the idempotency record (both paths)
    abort_batches: int = 0  # answer this many batch requests by dropping the connection


@asynccontextmanager
async def counted_auth_service(paths: AuthPaths) -> AsyncIterator[Counted]:
    signer = LocalSigner(HostAuthority.load(paths))
    await signer.start()
    registry = await open_registry(None, data_dir=paths.data_dir)
    app = make_auth_app(signer=signer, registry=registry, clock=SystemClock())
    counted = Counted(url="", registry=registry)

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        counted.requests[request.path] += 1
        response = await handler(request)
        if response.headers.get("Idempotent-Replay") == "true":
            counted.replays += 1
        if request.path == REGISTER_BATCH_PATH and response.status == 200:
            assert isinstance(response, web.Response) and isinstance(response.body, bytes)
            results = json.loads(response.body)["results"]
            counted.batch_sizes.append(len(results))
            counted.replays += sum(r.get("replay") is True for r in results)
            if counted.abort_batches:
                # The registrations are done; the answer never arrives (a crash, a reset).
                counted.abort_batches -= 1
                assert request.transport is not None
                request.transport.abort()
        return response

    app.middlewares.insert(0, count)
    try:
        async with serve_mtls(
            app, cert=paths.server_cert, key=paths.server_key, client_ca=paths.client_ca_cert
        ) as counted.url:
            yield counted
    finally:
        await registry.aclose()
        await signer.aclose()


def client(paths: AuthPaths, url: str) -> AuthClient:
    return AuthClient(
        url=url, ssl_context=gateway_ctx(paths), clock=SystemClock(), retries=2, backoff=0.01
    )


async def hosts_per_vm(registry: Registry) -> Counter[str]:
    records = await registry.registrations()
    hosts = {(r.registration.join.vm_id, r.host_id) for r in records}
    return Counter(vm for vm, _ in hosts)


async def test_a_storm_of_200_registrations_takes_far_fewer_requests(paths: AuthPaths) -> None:
    regs = [vm_reg(i) for i in range(200)]
    async with counted_auth_service(paths) as svc, client(paths, svc.url) as c:
        results: list[RegisterResult] = await asyncio.gather(*(c.register(r) for r in regs))
        records = await svc.registry.registrations()
        per_vm = await hosts_per_vm(svc.registry)
    requests = svc.requests[REGISTER_PATH] + svc.requests[REGISTER_BATCH_PATH]
    assert requests <= 20, svc.requests
    assert svc.requests[REGISTER_BATCH_PATH] >= 3
    # Every registration registered once, one host per VM, each VM's own answer.
    assert sorted(r.idempotency_key for r in records) == sorted(r.idempotency_key for r in regs)
    assert len(per_vm) == 200 and set(per_vm.values()) == {1}
    assert len({r.host_id for r in results}) == 200
    assert all(r.renewal is False for r in results)


async def test_a_batch_whose_answer_is_lost_is_retried_and_registers_each_once(
    paths: AuthPaths,
) -> None:
    regs = [vm_reg(i) for i in range(40)]
    async with counted_auth_service(paths) as svc, client(paths, svc.url) as c:
        svc.abort_batches = 1
        results = await asyncio.gather(*(c.register(r) for r in regs))
        records = await svc.registry.registrations()
        per_vm = await hosts_per_vm(svc.registry)
        assert c.breaker.consecutive_failures == 0
    assert len(results) == 40
    # The first batch was registered and its answer lost: each of its members came back
    # once, and was answered from its idempotency record.
    assert svc.batch_sizes[0] > 1
    assert svc.replays == svc.batch_sizes[0]
    assert sorted(r.idempotency_key for r in records) == sorted(r.idempotency_key for r in regs)
    assert len(per_vm) == 40 and set(per_vm.values()) == {1}


async def test_a_locked_member_is_rejected_while_its_batch_mates_register(
    paths: AuthPaths,
) -> None:
    regs = [vm_reg(i) for i in range(12)]
    locked = regs[-1]  # queued behind the first requests: it travels in a batch
    async with counted_auth_service(paths) as svc, client(paths, svc.url) as c:
        await svc.registry.add_lock(
            LockTarget.VM_ID, locked.join.vm_id, reason="compromised", now=NOW
        )
        results: list[Any] = await asyncio.gather(
            *(c.register(r) for r in regs), return_exceptions=True
        )
        records = await svc.registry.registrations()
    assert svc.requests[REGISTER_BATCH_PATH] == 1
    *ok, refused = results
    assert all(isinstance(r, RegisterResult) for r in ok)
    assert isinstance(refused, JoinRejected)
    assert refused.code == Code.HOST_LOCKED
    assert "compromised" in (refused.detail or "")
    assert sorted(r.idempotency_key for r in records) == sorted(
        r.idempotency_key for r in regs[:-1]
    )
