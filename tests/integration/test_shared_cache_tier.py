"""With ``cache.backend: redis`` the replicas share their Entra and AIA results: what one
replica fetched, another does not fetch again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.agent import run_join
from gateway.core.config import CacheConfig
from gateway.dev.devstack import agent_settings, dev_stack
from gateway.server.serve import GatewayServer
from tests.support.binaries import require_binary
from tests.support.redis_server import RedisServer
from tests.support.tokens import azure_token_yaml

SUB = "11111111-1111-1111-1111-111111111111"
TOKENS = azure_token_yaml(SUB)


async def test_a_second_replica_reuses_the_first_ones_jwks_and_intermediates(
    tmp_path: Path,
) -> None:
    require_binary("redis-server")
    with RedisServer(tmp_path / "redis") as redis:

        def use_redis(config):  # type: ignore[no-untyped-def]
            return dataclasses.replace(
                config, cache=CacheConfig(backend="redis", redis_url=redis.url)
            )

        async with dev_stack(tmp_path / "stack", tokens_yaml=TOKENS, adjust=use_redis) as st:
            emu = st.emulator
            tenant = emu.add_tenant()
            vms = [
                emu.add_vm(
                    subscription=SUB,
                    resource_group="rg",
                    name=f"t-{i}",
                    tenant=tenant,
                    identity="user",
                )
                for i in range(2)
            ]
            # Agents send no intermediates: each replica would need AIA on its own.
            await run_join(agent_settings(st, vms[0], collect_intermediates=False))
            fetched = {k: emu.counters.get(k, 0) for k in ("entra.discovery", "entra.jwks", "aia")}
            assert fetched == {"entra.discovery": 1, "entra.jwks": 1, "aia": 1}

            async with GatewayServer(st.config) as replica_b:
                await run_join(
                    agent_settings(
                        st, vms[1], collect_intermediates=False, gateway_url=replica_b.url()
                    )
                )
            after = {k: emu.counters.get(k, 0) for k in fetched}
            assert after == fetched  # replica B's first join cost Azure nothing
