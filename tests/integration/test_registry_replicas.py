"""Two auth service replicas on ONE PostgreSQL (a throwaway cluster of the test's own),
under a burst of concurrent registrations over mTLS: each VM is registered once.

Every VM joins three times (three idempotency keys), and each join is sent to both
replicas at once, as a gateway retrying on another replica would: the database alone
decides, so each VM gets one host, each key one answer.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.authservice import AuthService, init_auth_dir
from gateway.protocol import RegisterResult
from tests.integration.test_authservice import auth_client
from tests.integration.test_registry import vm_reg
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.integration

VMS = 30
JOINS_PER_VM = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster() as pg:
        yield pg


async def test_two_replicas_on_one_postgresql_register_each_vm_once(
    cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = await cluster.create_database()
    paths = init_auth_dir(tmp_path / "auth")  # both replicas hold the same CAs
    replicas = [AuthService(data_dir=paths.data_dir, database=url) for _ in range(2)]
    # Started together: the schema's migration must run once (advisory lock).
    await asyncio.gather(*(r.start() for r in replicas))
    try:
        vm_ids = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(VMS)]
        regs = [
            vm_reg(vm_id, key=f"vm{v}-join{j}", node_name=f"node-{v}")
            for v, vm_id in enumerate(vm_ids)
            for j in range(JOINS_PER_VM)
        ]
        async with auth_client(replicas[0], paths) as a, auth_client(replicas[1], paths) as b:
            answers = await asyncio.gather(
                *(client.register(reg) for reg in regs for client in (a, b))
            )
        assert len(answers) == 2 * len(regs)

        by_key: dict[str, set[RegisterResult]] = defaultdict(set)
        by_vm: dict[str, set[str]] = defaultdict(set)
        new_per_vm: dict[str, int] = defaultdict(int)
        for i, answer in enumerate(answers):
            reg = regs[i // 2]
            by_key[reg.idempotency_key].add(answer)
            by_vm[reg.join.vm_id].add(answer.host_id)
        for key, results in by_key.items():
            assert len(results) == 1, f"{key}: the two replicas answered differently"
            (result,) = results
            vm = next(r.join.vm_id for r in regs if r.idempotency_key == key)
            new_per_vm[vm] += 0 if result.renewal else 1
        assert all(len(ids) == 1 for ids in by_vm.values()), "a VM got two host IDs"
        assert len({next(iter(ids)) for ids in by_vm.values()}) == VMS, "two VMs share one"
        assert set(new_per_vm.values()) == {1}, "each VM is new exactly once"

        registry = replicas[1].registry
        hosts = await registry.hosts()
        assert sorted(h.vm_id for h in hosts) == sorted(vm_ids)
        assert all(h.renewals == JOINS_PER_VM - 1 for h in hosts)
        records = await registry.registrations()
        assert len(records) == VMS * JOINS_PER_VM
        kinds = await registry.registration_kinds()
        assert sorted(kinds.values()).count("new") == VMS
    finally:
        await asyncio.gather(*(r.aclose() for r in replicas))
