"""cache.backend: redis makes the gateway redeem challenges in Redis (after deps wiring)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.agent import run_join
from gateway.core.config import CacheConfig
from gateway.dev.devstack import agent_settings, dev_stack
from gateway.join.replay import RedisReplayStore
from tests.support.redis_server import RedisServer
from tests.support.tokens import azure_token_yaml

pytestmark = pytest.mark.integration

TOKENS_YAML = azure_token_yaml()


async def test_the_redis_backend_records_redemptions_in_redis(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as srv:
        async with dev_stack(
            tmp_path / "stack",
            tokens_yaml=TOKENS_YAML,
            config_overrides={"cache": CacheConfig(backend="redis", redis_url=srv.url)},
        ) as st:
            assert isinstance(st.gateway.deps.replay, RedisReplayStore)
            tenant = st.emulator.add_tenant()
            vm = st.emulator.add_vm(
                subscription="11111111-1111-1111-1111-111111111111",
                resource_group="rg1",
                name="vm1",
                tenant=tenant,
                identity="user",
            )
            assert (await run_join(agent_settings(st, vm))).host_id
            client = aioredis.Redis.from_url(srv.url)
            try:
                assert len(await client.keys("jg:replay:*")) == 1
            finally:
                await client.aclose()


async def test_redis_down_is_503_and_unready_and_recovers_on_its_own(tmp_path: Path) -> None:
    import ssl

    import aiohttp

    from gateway.agent import JoinFailed

    with RedisServer(tmp_path / "redis") as srv:
        async with dev_stack(
            tmp_path / "stack",
            tokens_yaml=TOKENS_YAML,
            config_overrides={"cache": CacheConfig(backend="redis", redis_url=srv.url)},
        ) as st:
            tenant = st.emulator.add_tenant()
            vms = [
                st.emulator.add_vm(
                    subscription="11111111-1111-1111-1111-111111111111",
                    resource_group="rg1",
                    name=f"vm{i}",
                    tenant=tenant,
                    identity="user",
                )
                for i in range(2)
            ]
            ctx = ssl.create_default_context(cafile=str(st.gateway_ca_file))

            async def get(path: str) -> tuple[int, dict[str, object]]:
                async with aiohttp.ClientSession() as s, s.get(st.gateway_url + path, ssl=ctx) as r:
                    return r.status, await r.json()

            assert (await get("/readyz"))[0] == 200
            srv.stop()
            status, body = await get("/readyz")
            assert status == 503 and body["checks"]["replay_store"] is False  # type: ignore[index]
            assert (await get("/healthz"))[0] == 200  # the process itself is fine
            with pytest.raises(JoinFailed) as err:
                await run_join(agent_settings(st, vms[0], max_attempts=1))
            assert (err.value.code, err.value.status) == ("replay_store_unavailable", 503)

            srv.restart()
            assert (await get("/readyz"))[0] == 200
            assert (await run_join(agent_settings(st, vms[0]))).host_id
            assert (await run_join(agent_settings(st, vms[1]))).host_id
