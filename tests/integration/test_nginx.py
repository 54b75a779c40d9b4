"""The real balancer: nginx (config/nginx.conf) terminating TLS in front of two gateway
replicas with two workers each, sharing one real Redis.

300 emulated VMs join through nginx with the real agent, each from its own loopback
address. Half go through the shipped config as it is (round robin); the other half
through a variant that sends every challenge to replica A and every join to replica B,
so each of those joins' two requests deliberately cross replicas. Every VM joins exactly
once; the auth service records the address nginx saw; a forged X-Forwarded-For sent
straight to a replica from an untrusted address is recorded with the real address, and
so is a client's forged Forwarded (and X-Forwarded-For) sent through nginx.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from gateway.agent import JoinFailed, make_ssl_context, run_join
from gateway.agent.keys import load_or_create_keys
from gateway.core.config import CacheConfig, ProxyConfig
from gateway.core.tlsutil import issue_cert, load_ca, write_pem_files
from gateway.dev.devstack import DevStack, agent_settings, dev_stack
from gateway.dev.emulator import EmulatedVm
from tests.support.binaries import require_binary
from tests.support.gateway_proc import GatewayProcess, free_port, gateway_process
from tests.support.redis_server import RedisServer
from tests.support.tokens import azure_token_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = Path(__file__).resolve().parents[2]
SUB = "11111111-1111-1111-1111-111111111111"
TOKENS = azure_token_yaml(SUB)
N_VMS = 300


def vm_address(i: int) -> str:
    return f"127.1.{i // 200}.{i % 200 + 2}"


@dataclasses.dataclass
class Lb:
    stack: DevStack
    replicas: list[GatewayProcess]
    workdir: Path
    lb_ca_file: Path


def render_nginx(
    conf: str,
    *,
    port: int,
    upstreams: list[int],
    cert: Path,
    key: Path,
    gateway_ca: Path,
    split: bool,
) -> str:
    """config/nginx.conf with this run's ports and files (and, for ``split``, the
    challenge pinned to replica A and the join to replica B)."""
    conf = conf.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    conf = conf.replace("/etc/join-gateway/lb.crt", str(cert))
    conf = conf.replace("/etc/join-gateway/lb.key", str(key))
    conf = conf.replace("/etc/join-gateway/gateway-ca.crt", str(gateway_ca))
    conf = conf.replace("proxy_ssl_name gateway.internal;", "proxy_ssl_name localhost;")
    conf = conf.replace("server 10.0.0.11:443", f"server 127.0.0.1:{upstreams[0]}")
    conf = conf.replace("server 10.0.0.12:443", f"server 127.0.0.1:{upstreams[1]}")
    assert "10.0.0." not in conf and "/etc/join-gateway" not in conf
    if split:
        pinned = "\n".join(
            f"    upstream replica_{name} {{ server 127.0.0.1:{p}; keepalive 16; }}"
            for name, p in zip("ab", upstreams, strict=True)
        )
        conf = conf.replace("    upstream join_gateway {", pinned + "\n    upstream join_gateway {")
        location = re.search(r"        location / \{.*?\n        \}\n", conf, re.S)
        assert location is not None
        block = location.group(0)
        challenge = block.replace("location / {", "location = /v1/join/azure/challenge {")
        challenge = challenge.replace("https://join_gateway", "https://replica_a")
        join = block.replace("location / {", "location = /v1/join/azure {")
        join = join.replace("https://join_gateway", "https://replica_b")
        conf = conf.replace(block, block + challenge + join)
    return conf


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lb(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lb]:
    require_binary("nginx")
    require_binary("redis-server")
    workdir = tmp_path_factory.mktemp("nginx")
    with RedisServer(workdir / "redis") as redis:

        def shared(config):  # type: ignore[no-untyped-def]
            return dataclasses.replace(
                config,
                cache=CacheConfig(backend="redis", redis_url=redis.url),
                proxy=ProxyConfig(trusted_cidrs=("127.0.0.1/32",)),
            )

        async with (
            dev_stack(
                workdir / "stack", tokens_yaml=TOKENS, start_gateway=False, adjust=shared
            ) as st,
            gateway_process(st.config, workdir / "a", st.gateway_ca_file) as a,
            gateway_process(st.config, workdir / "b", st.gateway_ca_file) as b,
        ):
            yield Lb(st, [a, b], workdir, st.gateway_ca_file)


async def run_nginx(lb: Lb, *, split: bool, name: str) -> tuple[asyncio.subprocess.Process, str]:
    nginx = require_binary("nginx")
    prefix = lb.workdir / name
    prefix.mkdir()
    gw_ca = load_ca(
        lb.stack.gateway_ca_file, lb.stack.gateway_ca_file.with_name("gateway-ca-key.pem")
    )
    cert, key = write_pem_files(
        issue_cert(gw_ca, common_name="127.0.0.1", ip_addresses=("127.0.0.1",), server=True),
        prefix,
        "lb",
    )
    port = free_port()
    upstream_ports = [int(r.url.rsplit(":", 1)[1]) for r in lb.replicas]
    conf = render_nginx(
        (REPO / "config" / "nginx.conf").read_text(),
        port=port,
        upstreams=upstream_ports,
        cert=cert,
        key=key,
        gateway_ca=lb.stack.gateway_ca_file,
        split=split,
    )
    (prefix / "nginx.conf").write_text(conf)
    proc = await asyncio.create_subprocess_exec(
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(prefix / "nginx.conf"),
        "-e",
        "stderr",
        "-g",
        "daemon off;",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(lb.stack.gateway_ca_file))
    for _ in range(100):
        try:
            async with aiohttp.ClientSession() as s, s.get(url + "/healthz", ssl=ctx) as r:
                if r.status == 200:
                    return proc, url
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.1)
    proc.terminate()
    _, err = await proc.communicate()
    raise AssertionError(f"nginx did not start: {err.decode()[-2000:]}")


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        await proc.wait()


def audit_records(replica: GatewayProcess) -> list[dict[str, object]]:
    out = []
    for line in replica.log().splitlines():
        if " gateway.audit " in line:
            out.append(json.loads(line.split(" gateway.audit ", 1)[1]))
    return out


async def test_300_vms_join_through_nginx_across_two_replicas(lb: Lb) -> None:
    emu = lb.stack.emulator
    tenant = emu.add_tenant()
    vms = [
        emu.add_vm(
            subscription=SUB,
            resource_group=f"rg-{i % 10}",
            name=f"lb-{i:03d}",
            tenant=tenant,
            identity="user" if i % 3 else "system",
        )
        for i in range(N_VMS)
    ]
    address = {vm.name: vm_address(i) for i, vm in enumerate(vms)}
    ssl_ctx = make_ssl_context(lb.stack.gateway_ca_file)
    gate = asyncio.Semaphore(60)

    async def join(vm: EmulatedVm, url: str) -> object:
        async with gate:
            settings = agent_settings(
                lb.stack,
                vm,
                gateway_url=url,
                local_addr=address[vm.name],
                data_dir=lb.workdir / "nodes" / vm.name,
                backoff_base=0.05,
                backoff_cap=0.5,
            )
            try:
                return await run_join(settings, ssl_context=ssl_ctx)
            except JoinFailed as exc:
                return exc

    half = N_VMS // 2
    for split, batch in ((False, vms[:half]), (True, vms[half:])):
        proc, url = await run_nginx(lb, split=split, name="split" if split else "shipped")
        try:
            results = await asyncio.gather(*(join(vm, url) for vm in batch))
        finally:
            await stop(proc)
        failed = [r for r in results if isinstance(r, Exception)]
        assert not failed, failed[:3]

    # Every VM joined exactly once, recorded with the address nginx saw.
    records = await lb.stack.auth.records()
    per_vm = Counter(r.registration.join.vm_id for r in records)
    by_vm_id = {vm.vm_id: vm for vm in vms}
    for vm in vms:
        assert per_vm[vm.vm_id] == 1, vm.name
    for r in records:
        vm = by_vm_id.get(r.registration.join.vm_id)
        if vm is not None:
            assert r.registration.client_address == address[vm.name]

    # Both replicas did joins, and in the split phase every join landed on replica B
    # with a challenge replica A issued.
    joined = [
        Counter(rec["node_name"] for rec in audit_records(r) if rec["outcome"] == "joined")
        for r in lb.replicas
    ]
    assert all(sum(c.values()) > 0 for c in joined)
    split_names = {vm.name for vm in vms[half:]}
    assert not split_names & set(joined[0]), "a split-phase join reached replica A"
    assert split_names <= set(joined[1])


async def forged_join(lb: Lb, url: str, name: str, local_addr: str) -> str:
    """A join of a new VM from ``local_addr`` with forged client-address headers on both
    requests; returns the host ID (the join must succeed)."""
    emu = lb.stack.emulator
    vm = emu.add_vm(
        subscription=SUB, resource_group="rg-forge", name=name, tenant=emu.add_tenant(),
        identity="user",
    )  # fmt: skip
    keys = load_or_create_keys(lb.workdir / name)
    forged = {"X-Forwarded-For": "203.0.113.66", "Forwarded": "for=203.0.113.66"}
    connector = aiohttp.TCPConnector(local_addr=(local_addr, 0))
    ctx = ssl.create_default_context(cafile=str(lb.stack.gateway_ca_file))
    async with aiohttp.ClientSession(connector=connector, headers=forged) as s:
        async with s.post(url + "/v1/join/azure/challenge", json={}, ssl=ctx) as r:
            challenge = (await r.json())["challenge"]
        body = {
            "token_name": "azure-token",
            "challenge": challenge,
            "attested_data": emu.attested_document_for(vm, nonce=challenge),
            "access_token": emu.token_for(vm),
            "host": {
                "node_name": vm.name,
                "role": "Node",
                "public_ssh_key": keys.public_ssh_key,
                "public_tls_key": keys.public_tls_key,
            },
        }
        async with s.post(url + "/v1/join/azure", json=body, ssl=ctx) as r:
            assert r.status == 200, await r.text()
            return str((await r.json())["host_id"])


async def recorded_address(lb: Lb, host_id: str) -> str:
    record = next(r for r in await lb.stack.auth.records() if r.host_id == host_id)
    return str(record.registration.client_address)


async def test_a_forged_x_forwarded_for_from_an_untrusted_peer_is_ignored(lb: Lb) -> None:
    host_id = await forged_join(lb, lb.replicas[0].url, "forger", "127.2.0.9")
    assert await recorded_address(lb, host_id) == "127.2.0.9"


async def test_a_forged_forwarded_through_nginx_records_the_peer_nginx_saw(lb: Lb) -> None:
    """The client sends its own Forwarded (and X-Forwarded-For) through the shipped
    config: nginx overwrites one and clears the other, and the gateway reads only the
    configured one — the auth service records the address nginx's peer really had."""
    proc, url = await run_nginx(lb, split=False, name="forged")
    try:
        host_id = await forged_join(lb, url, "forger-via-nginx", "127.3.0.7")
    finally:
        await stop(proc)
    assert await recorded_address(lb, host_id) == "127.3.0.7"
