"""``join-gateway auth init|serve|vault-setup``: argparse glue for the reference auth service.

``add_arguments`` fills the ``auth`` sub-parser; ``run`` only parses, calls library code
and maps the outcome to an exit code (0 ok, 1 failure, 2 usage, 3 startup failure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from gateway.authservice import vault_setup
from gateway.authservice.app import AuthService, AuthSettings
from gateway.authservice.authority import AuthPaths, HostAuthority, init_auth_dir
from gateway.authservice.registry import RegistryError
from gateway.authservice.vault import (
    AppRoleAuth,
    TokenFileAuth,
    VaultAuth,
    VaultClient,
    VaultSettings,
    VaultSigner,
    VaultStartupError,
)
from gateway.core.runtime import tune_gc

__all__ = ["add_arguments", "run", "vault_signer"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="auth_command", required=True, metavar="{init,serve,vault-setup}"
    )

    init = sub.add_parser("init", help="create the CAs and certificates (idempotent)")
    init.add_argument("--data-dir", required=True, help="directory for keys and records")
    init.add_argument(
        "--server-name",
        action="append",
        dest="server_names",
        metavar="NAME",
        help="a name or IP the gateways use to reach the auth service (repeatable; "
        "default 127.0.0.1 and localhost)",
    )
    init.add_argument(
        "--host-ca-key-type", choices=("ecdsa-p256", "rsa-2048"), default="ecdsa-p256"
    )

    serve = sub.add_parser("serve", help="run the auth service until SIGTERM/SIGINT")
    serve.add_argument("--data-dir", required=True)
    serve.add_argument(
        "--database",
        metavar="URL",
        help="the registry: postgresql://user:pass@host/db, shared by several replicas "
        "(default: SQLite in --data-dir)",
    )
    serve.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    serve.add_argument(
        "--cert-ttl",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="lifetime of issued host certificates (default 24)",
    )
    serve.add_argument("--tls-cert", help="server certificate (default: from init)")
    serve.add_argument("--tls-key", help="server key (default: from init)")
    serve.add_argument("--client-ca", help="CA of accepted gateway certs (default: from init)")
    serve.add_argument(
        "--require-csr",
        action="store_true",
        help="refuse registrations without the node's CSR and SSH key proof (possession; "
        "always on with --ca-backend vault, whose PKI signs CSRs only)",
    )
    serve.add_argument(
        "--spiffe-trust-domain",
        metavar="TD",
        help="add the URI SAN spiffe://TD/azure/<tenant>/<subscription>/<vmId> to every "
        "node's X.509 certificate",
    )
    _add_backend_arguments(serve)

    setup = sub.add_parser(
        "vault-setup", help="configure Vault/OpenBao's PKI and SSH mounts and an AppRole"
    )
    vault_setup.add_arguments(setup)


def _add_backend_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--ca-backend",
        choices=("local", "vault"),
        default="local",
        help="who holds the CA keys: files in --data-dir (local, the default) or "
        "Vault/OpenBao (vault: the --vault-* flags)",
    )
    vault = serve.add_argument_group("vault backend (--ca-backend vault)")
    vault.add_argument("--vault-addr", metavar="URL", help="https://vault:8200")
    vault.add_argument("--vault-namespace", metavar="NS", help="sent as X-Vault-Namespace")
    vault.add_argument("--vault-ca-file", metavar="F", help="CA for Vault's TLS certificate")
    for flag, default in (
        ("--vault-pki-mount", VaultSettings.pki_mount),
        ("--vault-pki-role", VaultSettings.pki_role),
        ("--vault-ssh-mount", VaultSettings.ssh_mount),
        ("--vault-ssh-role", VaultSettings.ssh_role),
    ):
        vault.add_argument(flag, metavar="NAME", help=f"default {default}")
    vault.add_argument(
        "--vault-timeout",
        type=float,
        metavar="SECONDS",
        help=f"bound on any one Vault call (default {VaultSettings.timeout:g})",
    )
    vault.add_argument("--vault-token-file", metavar="F", help="a token, re-read on change")
    vault.add_argument("--vault-approle-role-id", metavar="ID", help="AppRole role ID")
    vault.add_argument(
        "--vault-approle-secret-id-file", metavar="F", help="AppRole secret ID (a file)"
    )


_VAULT_FLAGS = (
    "vault_addr",
    "vault_namespace",
    "vault_ca_file",
    "vault_pki_mount",
    "vault_pki_role",
    "vault_ssh_mount",
    "vault_ssh_role",
    "vault_timeout",
    "vault_token_file",
    "vault_approle_role_id",
    "vault_approle_secret_id_file",
)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def vault_signer(args: argparse.Namespace) -> VaultSigner | None:
    """The signer ``--ca-backend`` names (None: the local CAs). A missing or contradictory
    flag is a ``ValueError`` saying which (a usage error, exit 2): no flag is inert."""
    given = [d for d in _VAULT_FLAGS if getattr(args, d) is not None]
    if args.ca_backend != "vault":
        if given:
            raise ValueError(f"{_flag(given[0])} needs --ca-backend vault")
        return None
    if args.vault_addr is None:
        raise ValueError("--ca-backend vault needs --vault-addr")
    addr = urlsplit(args.vault_addr)
    if addr.scheme not in ("http", "https") or not addr.hostname:
        raise ValueError(f"--vault-addr must be an http(s) URL, not {args.vault_addr!r}")
    if addr.scheme == "http" and not _is_loopback(addr.hostname):
        raise ValueError("--vault-addr: plain http only on loopback (tokens cross it)")
    approle = (args.vault_approle_role_id, args.vault_approle_secret_id_file)
    if (args.vault_token_file is None) == all(v is None for v in approle):
        raise ValueError(
            "--ca-backend vault needs exactly one of --vault-token-file or "
            "--vault-approle-role-id with --vault-approle-secret-id-file"
        )
    if args.vault_token_file is None and None in approle:
        raise ValueError("--vault-approle-role-id and --vault-approle-secret-id-file go together")
    if args.vault_timeout is not None and args.vault_timeout <= 0:
        raise ValueError("--vault-timeout must be > 0")
    defaults = VaultSettings(addr=args.vault_addr)
    settings = dataclasses.replace(
        defaults,
        namespace=args.vault_namespace,
        ca_file=Path(args.vault_ca_file) if args.vault_ca_file else None,
        pki_mount=args.vault_pki_mount or defaults.pki_mount,
        pki_role=args.vault_pki_role or defaults.pki_role,
        ssh_mount=args.vault_ssh_mount or defaults.ssh_mount,
        ssh_role=args.vault_ssh_role or defaults.ssh_role,
        timeout=args.vault_timeout or defaults.timeout,
    )
    auth: VaultAuth
    if args.vault_token_file is not None:
        auth = TokenFileAuth(Path(args.vault_token_file))
    else:
        auth = AppRoleAuth(
            role_id=args.vault_approle_role_id,
            secret_id_file=Path(args.vault_approle_secret_id_file),
        )
    return VaultSigner(VaultClient(settings, auth), settings)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def _print_paths(paths: AuthPaths, pin: str) -> None:
    print(f"data dir:            {paths.data_dir}")
    print(f"host CA:             {paths.host_ca_cert}")
    print(f"SSH host CA (pub):   {paths.ssh_ca_pub}")
    print(f"upstream CA:         {paths.internal_ca_cert}")
    print(f"gateway client cert: {paths.gateway_client_cert}")
    print(f"gateway client key:  {paths.gateway_client_key}")
    print(f"CA pin:              {pin}")


def run(args: argparse.Namespace) -> int:
    if args.auth_command == "init":
        try:
            paths = init_auth_dir(
                args.data_dir,
                gateway_hosts=tuple(args.server_names or ("127.0.0.1", "localhost")),
                host_ca_key_type=args.host_ca_key_type,
            )
            pin = HostAuthority.load(paths).ca_pin()
        except (OSError, ValueError) as exc:
            print(f"auth init failed: {exc}", file=sys.stderr)
            return 1
        _print_paths(paths, pin)
        return 0
    if args.auth_command == "serve":
        try:
            host, port = _parse_listen(args.listen)
        except ValueError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        if args.cert_ttl <= 0:
            print("--cert-ttl must be > 0", file=sys.stderr)
            return 2
        try:
            settings = AuthSettings(
                cert_ttl=timedelta(hours=args.cert_ttl),
                require_csr=args.require_csr or args.ca_backend == "vault",
                spiffe_trust_domain=args.spiffe_trust_domain,
            )
        except ValueError as exc:
            print(f"--spiffe-trust-domain: {exc}", file=sys.stderr)
            return 2
        try:
            signer = vault_signer(args)
        except ValueError as exc:
            print(f"auth serve: {exc}", file=sys.stderr)
            return 2
        service = AuthService(
            data_dir=args.data_dir,
            host=host,
            port=port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            client_ca=args.client_ca,
            settings=settings,
            database=args.database,
            signer=signer,
        )
        return asyncio.run(_serve(service))
    if args.auth_command == "vault-setup":
        return vault_setup.run(args)
    print(f"unknown auth command {args.auth_command!r}", file=sys.stderr)
    return 2


async def _serve(service: AuthService) -> int:
    try:
        await service.start()
    except (OSError, ValueError, RegistryError, VaultStartupError) as exc:
        print(f"auth service failed to start: {exc}", file=sys.stderr)
        return 3
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The handler only sets a flag; shutdown happens below, in order.
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"auth service listening on {service.url}", flush=True)
        bundle = service.ca_bundle()
        print(f"CA backend: {service.signer.name}", flush=True)
        print(f"CA pin: {bundle.ca_pin}", flush=True)
        print(f"SSH CA pin: {bundle.ssh_ca_pin}", flush=True)
        await stop.wait()
        log.info("auth service stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await service.aclose()
    return 0
