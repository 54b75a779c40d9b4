"""The whole system on loopback: Azure emulator, reference auth service, gateway.

Used by ``join-gateway demo``, the end-to-end tests and the benchmarks, so all three run
the same wiring: real TLS on real sockets, the gateway's production dependencies
(``production_deps``) pointed at the emulator through config only — the emulator's root
as an extra pinned root, its Entra and ARM hosts as endpoint overrides, its AIA prefix
allowed explicitly. Nothing in the gateway knows it is talking to an emulator.

This module is not part of the product's serving path (``serve`` never imports it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.agent import AgentSettings
from gateway.authservice import AuthService, AuthSettings, init_auth_dir
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
)
from gateway.core.tlsutil import generate_ca, issue_cert, write_pem_files
from gateway.dev.emulator import AzureEmulator, EmulatedVm, Latency
from gateway.join.challenge import write_new_keys_file
from gateway.server.serve import GatewayServer

__all__ = ["DEFAULT_TOKEN", "DevStack", "agent_settings", "dev_stack"]

DEFAULT_TOKEN = "azure-token"  # noqa: S105 - a token *name*, not a secret (DESIGN §7)


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
        node_name=vm.name,
        aia_allowed_prefixes=(stack.emulator.aia_prefix,),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
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
) -> AsyncIterator[DevStack]:
    """Parameters: ``start_gateway=False`` prepares everything (files, config) but leaves
    the gateway to the caller — e.g. a ``join-gateway serve`` subprocess with workers."""
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
