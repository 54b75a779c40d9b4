"""``join-gateway auth vault-setup``: a Vault/OpenBao ready for the auth service, in one go.

With an operator's token it (idempotently):

1. enables the PKI mount (max lease 10 years) and, when it has no issuer yet, generates an
   internal root CA — fine for a lab; in production import an intermediate signed by your
   offline root instead (``pki/intermediate/set-signed``) and this step is skipped;
2. writes the PKI role: names only from the request (``use_csr_common_name=false``,
   ``use_csr_sans=false``), any name the auth service decided (the auth service is the
   policy), IP SANs, URI SANs, server + client auth, ``no_store=true`` (a join storm must
   not grow Vault's storage by one certificate per join), ``max_ttl``;
3. enables the SSH mount, generates its CA key when there is none, and writes the host role
   (host certificates only, any principal, caller-chosen key ID, ``max_ttl``);
4. writes a least-privilege policy — ``update`` on the two ``sign`` paths, nothing else —
   and an AppRole bound to it with short-lived tokens; prints the policy and the role ID
   and writes a fresh secret ID to ``--secret-id-out`` (0600).

Everything it does goes through :class:`~gateway.authservice.vault.VaultClient`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

from gateway.authservice.vault import TokenFileAuth, VaultClient, VaultError, VaultSettings
from gateway.core.files import write_atomic

__all__ = ["SetupPlan", "add_arguments", "policy_text", "run", "vault_setup"]

_SETUP_TIMEOUT = 30.0


@dataclass(frozen=True)
class SetupPlan:
    pki_mount: str = "pki"
    pki_role: str = "join-node"
    ssh_mount: str = "ssh"
    ssh_role: str = "join-host"
    max_ttl: str = "72h"
    policy: str = "join-auth-service"
    approle: str = "join-auth-service"
    token_ttl: str = "1h"  # noqa: S105 - a lifetime, not a secret
    token_max_ttl: str = "24h"  # noqa: S105 - a lifetime, not a secret
    root_common_name: str = "join-gateway host CA (Vault)"


def policy_text(plan: SetupPlan) -> str:
    """The auth service's whole policy: it may sign, and nothing else (CA chain and SSH
    public key are unauthenticated reads; renew-self and capabilities-self come with
    Vault's ``default`` policy)."""
    return (
        f'path "{plan.pki_mount}/sign/{plan.pki_role}" {{\n  capabilities = ["update"]\n}}\n'
        f'path "{plan.ssh_mount}/sign/{plan.ssh_role}" {{\n  capabilities = ["update"]\n}}\n'
    )


async def _mounts(client: VaultClient, kind: str) -> dict[str, object]:
    path = "sys/mounts" if kind == "secret" else "sys/auth"
    data = await client.authed("GET", path)
    body = data.get("data", data)
    return body if isinstance(body, dict) else {}


async def vault_setup(client: VaultClient, plan: SetupPlan) -> dict[str, str]:
    """Configure Vault; returns ``{"role_id", "secret_id", "policy"}``."""
    mounts = await _mounts(client, "secret")
    if f"{plan.pki_mount}/" not in mounts:
        await client.authed("POST", f"sys/mounts/{plan.pki_mount}", {"type": "pki"})
    await client.authed(
        "POST", f"sys/mounts/{plan.pki_mount}/tune", {"max_lease_ttl": "87600h"}
    )
    chain = await client.call("GET", f"{plan.pki_mount}/ca_chain", token=None, raw=True)
    if "BEGIN CERTIFICATE" not in chain.get("text", ""):
        await client.authed(
            "POST",
            f"{plan.pki_mount}/root/generate/internal",
            {"common_name": plan.root_common_name, "ttl": "87600h", "key_type": "ec"},
        )
    await client.authed(
        "POST",
        f"{plan.pki_mount}/roles/{plan.pki_role}",
        {
            "allow_any_name": True,
            "enforce_hostnames": False,
            "allow_ip_sans": True,
            "allowed_uri_sans": "spiffe://*",
            "allow_wildcard_certificates": False,
            "use_csr_common_name": False,
            "use_csr_sans": False,
            "server_flag": True,
            "client_flag": True,
            "key_type": "any",
            "no_store": True,
            "max_ttl": plan.max_ttl,
            "cn_validations": ["disabled"],
        },
    )
    if f"{plan.ssh_mount}/" not in mounts:
        await client.authed("POST", f"sys/mounts/{plan.ssh_mount}", {"type": "ssh"})
    try:
        await client.call("GET", f"{plan.ssh_mount}/public_key", token=None, raw=True)
    except VaultError as exc:
        # Only "no CA yet" (400) makes one: a timeout, a 5xx or a 429 while re-running
        # the setup must never replace the SSH CA every node already trusts.
        if exc.status != 400:
            raise
        await client.authed(
            "POST", f"{plan.ssh_mount}/config/ca", {"generate_signing_key": True}
        )
    await client.authed(
        "POST",
        f"{plan.ssh_mount}/roles/{plan.ssh_role}",
        {
            "key_type": "ca",
            "allow_host_certificates": True,
            "allow_user_certificates": False,
            "allowed_domains": "*",
            "allow_subdomains": True,
            "allow_bare_domains": True,
            "allow_user_key_ids": True,
            "max_ttl": plan.max_ttl,
            "ttl": "24h",
        },
    )
    policy = policy_text(plan)
    await client.authed("PUT", f"sys/policies/acl/{plan.policy}", {"policy": policy})
    if "approle/" not in await _mounts(client, "auth"):
        await client.authed("POST", "sys/auth/approle", {"type": "approle"})
    await client.authed(
        "POST",
        f"auth/approle/role/{plan.approle}",
        {
            "token_policies": [plan.policy],
            "token_ttl": plan.token_ttl,
            "token_max_ttl": plan.token_max_ttl,
        },
    )
    role = await client.authed("GET", f"auth/approle/role/{plan.approle}/role-id")
    secret = await client.authed("POST", f"auth/approle/role/{plan.approle}/secret-id", {})
    return {
        "role_id": str(role["data"]["role_id"]),
        "secret_id": str(secret["data"]["secret_id"]),
        "policy": policy,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vault-addr", required=True, help="https://vault:8200")
    p.add_argument("--token-file", required=True, type=Path, help="an operator's token")
    p.add_argument("--vault-namespace", default=None)
    p.add_argument("--vault-ca-file", type=Path, default=None)
    p.add_argument("--pki-mount", default=SetupPlan.pki_mount)
    p.add_argument("--pki-role", default=SetupPlan.pki_role)
    p.add_argument("--ssh-mount", default=SetupPlan.ssh_mount)
    p.add_argument("--ssh-role", default=SetupPlan.ssh_role)
    p.add_argument("--max-ttl", default=SetupPlan.max_ttl, help="longest certificate (72h)")
    p.add_argument("--approle", default=SetupPlan.approle)
    p.add_argument(
        "--secret-id-out",
        type=Path,
        required=True,
        help="write the AppRole secret ID here (0600); pass it as --vault-approle-secret-id-file",
    )


async def _run(args: argparse.Namespace) -> int:
    plan = SetupPlan(
        pki_mount=args.pki_mount,
        pki_role=args.pki_role,
        ssh_mount=args.ssh_mount,
        ssh_role=args.ssh_role,
        max_ttl=args.max_ttl,
        policy=args.approle,
        approle=args.approle,
    )
    settings = VaultSettings(
        addr=args.vault_addr,
        namespace=args.vault_namespace,
        ca_file=args.vault_ca_file,
        pki_mount=plan.pki_mount,
        pki_role=plan.pki_role,
        ssh_mount=plan.ssh_mount,
        ssh_role=plan.ssh_role,
        # A one-off by an operator that generates CA keys: no join waits on it.
        timeout=_SETUP_TIMEOUT,
    )
    client = VaultClient(settings, TokenFileAuth(args.token_file))
    try:
        out = await vault_setup(client, plan)
    except VaultError as exc:
        print(f"vault-setup: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
    write_atomic(args.secret_id_out, out["secret_id"].encode() + b"\n")
    print(f"# policy {plan.policy}\n{out['policy']}")
    print(f"role_id: {out['role_id']}")
    print(f"secret_id written to {args.secret_id_out}")
    print(
        "run: join-gateway auth serve --ca-backend vault "
        f"--vault-addr {args.vault_addr} --vault-pki-mount {plan.pki_mount} "
        f"--vault-pki-role {plan.pki_role} --vault-ssh-mount {plan.ssh_mount} "
        f"--vault-ssh-role {plan.ssh_role} --vault-approle-role-id {out['role_id']} "
        f"--vault-approle-secret-id-file {args.secret_id_out}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
