"""``join-gateway auth init|serve|vault-setup``: argparse glue for the reference auth service.

``add_arguments`` fills the ``auth`` sub-parser; ``run`` only parses, calls library code
and maps the outcome to an exit code (0 ok, 1 failure, 2 usage, 3 startup failure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from datetime import timedelta

from gateway.authservice import vault_setup
from gateway.authservice.app import AuthService, AuthSettings
from gateway.authservice.authority import AuthPaths, HostAuthority, init_auth_dir
from gateway.authservice.registry import RegistryError

__all__ = ["add_arguments", "run"]

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
        help="refuse registrations without the node's CSR and SSH key proof (possession)",
    )
    serve.add_argument(
        "--spiffe-trust-domain",
        metavar="TD",
        help="add the URI SAN spiffe://TD/azure/<tenant>/<subscription>/<vmId> to every "
        "node's X.509 certificate",
    )

    setup = sub.add_parser(
        "vault-setup", help="configure Vault/OpenBao's PKI and SSH mounts and an AppRole"
    )
    vault_setup.add_arguments(setup)


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
                require_csr=args.require_csr,
                spiffe_trust_domain=args.spiffe_trust_domain,
            )
        except ValueError as exc:
            print(f"--spiffe-trust-domain: {exc}", file=sys.stderr)
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
        )
        return asyncio.run(_serve(service))
    if args.auth_command == "vault-setup":
        return vault_setup.run(args)
    print(f"unknown auth command {args.auth_command!r}", file=sys.stderr)
    return 2


async def _serve(service: AuthService) -> int:
    try:
        await service.start()
    except (OSError, ValueError, RegistryError) as exc:
        print(f"auth service failed to start: {exc}", file=sys.stderr)
        return 3
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The handler only sets a flag; shutdown happens below, in order.
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"auth service listening on {service.url}", flush=True)
        print(f"CA pin: {service.ca_pin()}", flush=True)
        await stop.wait()
        log.info("auth service stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await service.aclose()
    return 0
