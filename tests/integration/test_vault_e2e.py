"""Joins through the whole system with the CA keys in a real OpenBao.

gateway → auth service (``VaultSigner``, set up by ``join-gateway auth vault-setup``) →
``bao server -dev``, all on loopback with real TLS. What a node receives is checked with
``openssl verify`` against OpenBao's own ``ca_chain`` and with ``ssh-keygen -L``; every
failure is produced for real (a sealed or stopped server, a revoked token, OpenBao's own
rate-limit quota, a proxy that holds bytes), and the registry is read after each to check
that no registration was recorded without its certificates, and none twice. Work is
counted (Vault sign calls, logins), not timed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from gateway.authservice import AuthSettings
from gateway.authservice.authority import init_auth_dir
from gateway.authservice.vault import (
    RELOGIN_INTERVAL,
    TokenFileAuth,
    VaultAuth,
    VaultClient,
    VaultSettings,
    VaultSigner,
)
from gateway.core.clock import FixedClock, SystemClock
from gateway.core.tlsutil import spki_pin
from gateway.dev.devstack import DEFAULT_TOKEN, DEV_SUBSCRIPTION, DEV_TOKENS, DevStack, dev_stack
from gateway.dev.emulator import EmulatedVm
from gateway.join.forward import AuthClient
from gateway.protocol import RegisterResult, Registration
from gateway.protocol.possession import make_csr, sign_ssh_possession
from tests.integration.test_authservice import (
    ROOT,
    auth_client,
    gateway_ctx,
    make_reg,
    new_keys,
)
from tests.support.binaries import require_binary
from tests.support.joins import JoinAnswer, join
from tests.support.openbao import VaultSetup as Setup
from tests.support.slow_proxy import slow_proxy
from tests.support.tokens import azure_token_yaml

pytestmark = pytest.mark.integration


@dataclass
class VaultStack:
    stack: DevStack
    signer: VaultSigner
    setup: Setup
    keys: Path

    def vm(self, name: str) -> EmulatedVm:
        emu = self.stack.emulator
        return emu.add_vm(
            subscription=DEV_SUBSCRIPTION,
            resource_group=f"rg-{name}",
            name=name,
            tenant=emu.add_tenant(),
            identity="system",
        )

    async def join(self, vm: EmulatedVm) -> JoinAnswer:
        return await join(self.stack, vm, self.keys / vm.name, token=DEFAULT_TOKEN, possession=True)

    async def registrations(self) -> int:
        return len(await self.stack.auth.records())


@asynccontextmanager
async def vault_stack(
    setup: Setup,
    workdir: Path,
    *,
    addr: str | None = None,
    auth: VaultAuth | None = None,
    vault_timeout: float = 5.0,
    tokens_yaml: str = DEV_TOKENS,
    spiffe_trust_domain: str | None = None,
) -> AsyncIterator[VaultStack]:
    settings = VaultSettings(addr=addr or setup.bao.addr, timeout=vault_timeout)
    signer = VaultSigner(VaultClient(settings, auth or setup.approle()), settings)
    async with dev_stack(
        workdir / "stack",
        tokens_yaml=tokens_yaml,
        signer=signer,
        auth_settings=AuthSettings(require_csr=True, spiffe_trust_domain=spiffe_trust_domain),
    ) as stack:
        yield VaultStack(stack=stack, signer=signer, setup=setup, keys=workdir / "keys")


def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)


def _principals(ssh_keygen_l: str) -> list[str]:
    return ssh_keygen_l.split("Principals:", 1)[1].split("Critical Options:", 1)[0].split()


def _verify_against_openbao(setup: Setup, workdir: Path, leaf_pem: str) -> str:
    """``openssl verify`` of ``leaf_pem`` against OpenBao's own ``ca_chain`` (not what the
    auth service says it is); returns that chain."""
    chain = setup.bao.request("GET", "pki/ca_chain", token=None)[1]["text"]
    (workdir / "bao-chain.pem").write_text(chain)
    (workdir / "leaf.pem").write_text(leaf_pem)
    verify = _run(
        require_binary("openssl"), "verify", "-CAfile", str(workdir / "bao-chain.pem"),
        str(workdir / "leaf.pem"),
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return chain


async def test_a_join_is_signed_by_openbao_and_a_renewal_signs_again(
    setup: Setup, tmp_path: Path
) -> None:
    ssh_keygen = require_binary("ssh-keygen")
    async with vault_stack(setup, tmp_path) as vs:
        vm = vs.vm("vault-vm-1")
        first = await vs.join(vm)
        assert first.status == 200, first.body
        host_id = first.body["host_id"]
        certs = first.body["certs"]

        chain = _verify_against_openbao(setup, tmp_path, certs["tls"])
        assert "".join(certs["tls_ca_certs"]).strip() == chain.strip()

        (tmp_path / "host-cert.pub").write_text(certs["ssh"] + "\n")
        shown = _run(ssh_keygen, "-L", "-f", str(tmp_path / "host-cert.pub")).stdout
        assert "host certificate" in shown
        assert f'Key ID: "{host_id}"' in shown
        assert _principals(shown) == [host_id, vm.name]
        bao_ssh_ca = setup.bao.request("GET", "ssh/public_key", token=None)[1]["text"].strip()
        assert certs["ssh_ca_keys"] == [bao_ssh_ca]

        # A renewal: the same VM joins again, Vault signs again, the host ID stays.
        second = await vs.join(vm)
        assert second.status == 200, second.body
        assert second.body["host_id"] == host_id
        assert second.body["certs"]["tls"] != certs["tls"]
        (tmp_path / "host-cert-2.pub").write_text(second.body["certs"]["ssh"] + "\n")
        shown = _run(ssh_keygen, "-L", "-f", str(tmp_path / "host-cert-2.pub")).stdout
        assert f'Key ID: "{host_id}"' in shown
        assert vs.signer.sign_calls == 2
        assert await vs.registrations() == 2
        [host] = await vs.stack.auth.registry.hosts()
        assert (host.host_id, host.renewals) == (host_id, 1)

        # `join-gateway status` prints the pins of OpenBao's CAs (what nodes put in their
        # config), from the auth service's data directory.
        status = _run(
            sys.executable, "-m", "gateway.cli", "status", "--auth-data-dir",
            str(vs.stack.workdir / "auth"),
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        anchor = x509.load_pem_x509_certificate(
            ("-----BEGIN" + chain.rsplit("-----BEGIN", 1)[1]).encode()
        )
        assert f"CA pin: {spki_pin(anchor)}" in status.stdout
        assert f"SSH CA pin: {vs.signer.ca_bundle().ssh_ca_pin}" in status.stdout
        assert "CA backend: vault" in status.stdout
        fingerprint = _run(ssh_keygen, "-l", "-E", "sha256", "-f", "/dev/stdin", stdin=bao_ssh_ca)
        digest = fingerprint.stdout.split("SHA256:", 1)[1].split()[0]
        assert _b64_to_hex(digest) in status.stdout


def _b64_to_hex(b64: str) -> str:
    return base64.b64decode(b64 + "=" * (-len(b64) % 4)).hex()


# --- the naming policy, labels and SPIFFE IDs, signed by Vault --------------------------

TD = "cluster.test"
NAMED_TOKENS = f"""
kind: token
version: v2
metadata:
  name: named
spec:
  roles: [Node]
  join_method: azure
  azure:
    node_name: "{{vm_name}}.{{resource_group}}.internal"
    host_names: ["{{vm_name}}.prod.internal"]
    host_ips: nic
    labels_from_tags: [env]
    allow:
      - subscription: {DEV_SUBSCRIPTION}
        tags: {{env: prod}}
---
""" + azure_token_yaml(DEV_SUBSCRIPTION, name="plain")


async def test_names_labels_and_the_spiffe_id_come_through_openbao(
    setup: Setup, tmp_path: Path
) -> None:
    """The seam between the two features: what the gateway decided (node name, host
    names, the NIC's IP, labels) and the auth service's SPIFFE ID reach OpenBao's sign
    calls and come back in certificates that OpenBao's own chain verifies; a name the
    policy refuses never reaches Vault."""
    ssh_keygen = require_binary("ssh-keygen")
    async with vault_stack(setup, tmp_path, tokens_yaml=NAMED_TOKENS, spiffe_trust_domain=TD) as vs:
        emu = vs.stack.emulator
        tenant = emu.add_tenant()
        vm = emu.add_vm(
            subscription=DEV_SUBSCRIPTION, resource_group="App", name="Web-7", tenant=tenant,
            identity="system", location="northeurope", tags={"ENV": "prod", "other": "x"},
        )  # fmt: skip
        own_ip = vm.private_ips[0]
        answer = await join(
            vs.stack, vm, vs.keys / vm.name, token="named", possession=True,
            host={"node_name": None, "dns_names": ["WEB-7.prod.internal"],
                  "additional_principals": [own_ip]},
        )  # fmt: skip
        assert answer.status == 200, answer.body
        host_id = answer.body["host_id"]
        certs = answer.body["certs"]

        _verify_against_openbao(setup, tmp_path, certs["tls"])

        cert = x509.load_pem_x509_certificate(certs["tls"].encode())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://{TD}/azure/{tenant}/{DEV_SUBSCRIPTION}/{vm.vm_id.lower()}"
        ]
        assert set(sans.get_values_for_type(x509.DNSName)) - {host_id} == {
            "web-7.app.internal",
            "web-7.prod.internal",
        }
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [own_ip]

        (tmp_path / "host-cert.pub").write_text(certs["ssh"] + "\n")
        shown = _run(ssh_keygen, "-L", "-f", str(tmp_path / "host-cert.pub")).stdout
        assert f'Key ID: "{host_id}"' in shown
        assert set(_principals(shown)) == {
            host_id,
            "web-7.app.internal",
            "web-7.prod.internal",
            own_ip,
        }

        [host] = await vs.stack.auth.registry.hosts()
        assert host.labels == {
            "azure/tenant": tenant,
            "azure/subscription": DEV_SUBSCRIPTION,
            "azure/resource_group": "App",
            "azure/vm_id": vm.vm_id,
            "azure/vm_name": "Web-7",
            "azure/location": "northeurope",
            "azure/tag/env": "prod",
        }
        assert vs.signer.sign_calls == 1

        # A uniform scale set's instance: `<set>_<id>` is an SSH principal, no dNSName.
        [_, inst] = emu.add_scale_set(
            subscription=DEV_SUBSCRIPTION, resource_group="uni", name="pool", tenant=tenant,
            capacity=2, identity="user",
        )  # fmt: skip
        pooled = await join(
            vs.stack, inst, vs.keys / inst.name, token="plain", possession=True,
            host={"node_name": None},
        )  # fmt: skip
        assert pooled.status == 200, pooled.body
        (tmp_path / "pool-cert.pub").write_text(pooled.body["certs"]["ssh"] + "\n")
        shown = _run(ssh_keygen, "-L", "-f", str(tmp_path / "pool-cert.pub")).stdout
        assert _principals(shown) == [pooled.body["host_id"], "pool_1"]
        pool_cert = x509.load_pem_x509_certificate(pooled.body["certs"]["tls"].encode())
        pool_sans = pool_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert "pool_1" not in pool_sans.value.get_values_for_type(x509.DNSName)
        assert vs.signer.sign_calls == 2

        # Another VM's name is refused by the gateway: Vault is not asked to sign it.
        refused = await join(
            vs.stack, vm, vs.keys / vm.name, token="named", possession=True,
            host={"node_name": None, "dns_names": ["auth.cluster.internal"]},
        )  # fmt: skip
        assert (refused.status, refused.body["error"]["code"]) == (403, "name_not_allowed")
        assert vs.signer.sign_calls == 2
        assert await vs.registrations() == 2


# --- failures: the agent is told to come back; nothing is recorded ----------------------


async def _assert_unavailable(vs: VaultStack, vm: EmulatedVm) -> JoinAnswer:
    before = await vs.registrations()
    answer = await vs.join(vm)
    assert (answer.status, answer.body["error"]["code"]) == (503, "upstream_unavailable")
    assert int(answer.headers["Retry-After"]) >= 1
    assert await vs.registrations() == before, "no registration without certificates"
    return answer


async def test_a_sealed_openbao_is_503_and_unsealing_recovers(setup: Setup, tmp_path: Path) -> None:
    async with vault_stack(setup, tmp_path) as vs:
        vm = vs.vm("sealed-vm")
        setup.bao.seal()
        await _assert_unavailable(vs, vm)
        # The auth service said when to come back: the gateway did not retry (one call).
        assert vs.signer.sign_calls == 1
        assert await vs.stack.auth.registry.hosts() == [], "the new host was forgotten again"
        setup.bao.unseal()
        answer = await vs.join(vm)
        assert answer.status == 200, answer.body
        assert await vs.registrations() == 1


def possessed_reg(key: str) -> Registration:
    """A registration as a gateway forwards it, with the node's CSR and SSH key proof."""
    keys = new_keys()
    reg = make_reg(keys, key=key)
    return replace(
        reg,
        host=replace(
            reg.host,
            csr=make_csr(keys.tls_private),
            ssh_key_proof=sign_ssh_possession(keys.ssh_private, key),
        ),
    )


async def register_directly(vs: VaultStack, key: str) -> tuple[int, dict[str, Any], str | None]:
    """``POST /v1/register`` to the auth service with the gateway's client certificate:
    (status, body, Retry-After)."""
    auth = vs.stack.auth
    assert auth.paths is not None
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            auth.url + "/v1/register",
            json=possessed_reg(key).to_json(),
            ssl=gateway_ctx(auth.paths),
        ) as resp,
    ):
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def test_the_auth_service_answers_503_signing_unavailable_with_retry_after(
    setup: Setup, tmp_path: Path
) -> None:
    # The auth service's own answer, to a client holding the gateway's certificate.
    async with vault_stack(setup, tmp_path) as vs:
        setup.bao.seal()
        status, payload, retry_after = await register_directly(
            vs, "direct-key-00000000000000000000000"
        )
        assert (status, payload["error"]["code"]) == (503, "signing_unavailable")
        assert retry_after is not None and int(retry_after) >= 1
        assert vs.signer.sign_calls == 1
        assert await vs.registrations() == 0


async def test_a_stopped_openbao_is_503(setup: Setup, tmp_path: Path) -> None:
    async with vault_stack(setup, tmp_path) as vs:
        setup.bao.stop()
        await _assert_unavailable(vs, vs.vm("stopped-vm"))
        assert vs.signer.sign_calls == 1


async def test_a_slow_openbao_is_bounded_by_the_timeout(setup: Setup, tmp_path: Path) -> None:
    async with (
        slow_proxy("127.0.0.1", setup.bao.port) as proxy,
        vault_stack(
            setup, tmp_path, addr=f"http://127.0.0.1:{proxy.port}", vault_timeout=0.5
        ) as vs,
    ):
        proxy.delay = 3.0
        try:
            await _assert_unavailable(vs, vs.vm("slow-vm"))
        finally:
            proxy.delay = 0.0
        assert vs.signer.sign_calls == 1


async def test_openbaos_rate_limit_is_503_with_its_retry_after(
    setup: Setup, tmp_path: Path
) -> None:
    async with vault_stack(setup, tmp_path) as vs:
        assert (await vs.join(vs.vm("rl-vm-0"))).status == 200
        # With rate-limit headers on, OpenBao's 429 says how long the quota blocks.
        setup.bao.ok("POST", "sys/quotas/config", {"enable_rate_limit_response_headers": True})
        setup.bao.ok(
            "POST",
            "sys/quotas/rate-limit/pki-sign",
            {"path": "pki/", "rate": 1, "interval": "60s", "block_interval": "45s"},
        )
        try:
            first = await vs.join(vs.vm("rl-vm-1"))  # may use the quota's one call
            calls = vs.signer.sign_calls
            answer = await _assert_unavailable(vs, vs.vm("rl-vm-2"))
            # OpenBao's Retry-After reaches the agent, and nobody retried before it.
            assert 30 <= int(answer.headers["Retry-After"]) <= 45
            assert vs.signer.sign_calls == calls + 1
        finally:
            setup.bao.ok("DELETE", "sys/quotas/rate-limit/pki-sign")
        assert await vs.registrations() == (2 if first.status == 200 else 1)


async def test_a_revoked_approle_token_means_a_fresh_login(setup: Setup, tmp_path: Path) -> None:
    clock = FixedClock(datetime.now(UTC))
    auth = setup.approle(clock=clock)
    async with vault_stack(setup, tmp_path, auth=auth) as vs:
        token = await auth.token(vs.signer.client)
        setup.bao.ok("POST", "auth/token/revoke", {"token": token})
        clock.advance(RELOGIN_INTERVAL)  # a token this old that Vault refuses was lost
        answer = await vs.join(vs.vm("revoked-vm"))
        assert answer.status == 200, answer.body
        assert auth.logins == 2
        assert await vs.registrations() == 1


async def test_a_revoked_file_token_is_a_clear_non_retryable_error(
    setup: Setup, tmp_path: Path
) -> None:
    created = setup.bao.ok(
        "POST", "auth/token/create", {"policies": ["join-auth-service"], "ttl": "1h"}
    )
    token_file = tmp_path / "svc-token"
    token_file.write_text(created["auth"]["client_token"])
    async with vault_stack(setup, tmp_path, auth=TokenFileAuth(token_file)) as vs:
        setup.bao.ok("POST", "auth/token/revoke", {"token": created["auth"]["client_token"]})
        answer = await vs.join(vs.vm("file-token-vm"))
        # The auth service said 502 signing_refused: the gateway does not retry it.
        assert (answer.status, answer.body["error"]["code"]) == (502, "upstream_failed")
        assert vs.signer.sign_calls == 1
        status, payload, _ = await register_directly(vs, "refused-key-0000000000000000000000")
        assert (status, payload["error"]["code"]) == (502, "signing_refused")
        assert await vs.registrations() == 0


async def test_a_permission_removed_while_running_is_a_clear_non_retryable_error(
    setup: Setup, tmp_path: Path
) -> None:
    auth = setup.approle()
    async with vault_stack(setup, tmp_path, auth=auth) as vs:
        assert (await vs.join(vs.vm("perm-vm-0"))).status == 200
        # An operator narrows the auth service's policy to the PKI path only.
        setup.bao.ok(
            "PUT",
            "sys/policies/acl/join-auth-service",
            {"policy": 'path "pki/sign/join-node" { capabilities = ["update"] }'},
        )
        answer = await vs.join(vs.vm("perm-vm-1"))
        assert (answer.status, answer.body["error"]["code"]) == (502, "upstream_failed")
        status, payload, _ = await register_directly(vs, "perm-key-00000000000000000000000000")
        assert (status, payload["error"]["code"]) == (502, "signing_refused")
        assert "ssh/sign/join-host" in payload["error"]["message"]
        assert await vs.registrations() == 1, "nothing recorded without its certificates"
        assert auth.logins == 1, "a fresh token's refusals log in again no more"


async def test_retrying_a_registration_after_success_answers_the_same_certificates(
    setup: Setup, tmp_path: Path
) -> None:
    """The gateway's retry of a registration Vault signed once: one registration, the same
    answer, no second Vault call."""
    async with vault_stack(setup, tmp_path) as vs:
        assert vs.stack.auth.paths is not None
        reg = possessed_reg("retry-key-000000000000000000000000")
        async with auth_client(vs.stack.auth, vs.stack.auth.paths) as client:
            first = await client.register(reg)
            again = await client.register(reg)
        assert again == first
        assert vs.signer.sign_calls == 1
        assert await vs.registrations() == 1


async def test_concurrent_retries_of_one_registration_record_it_once(
    setup: Setup, tmp_path: Path
) -> None:
    """Two replicas' (or a gateway's impatient) copies of one registration in flight while
    Vault signs: one registration, one answer for both."""
    async with vault_stack(setup, tmp_path) as vs:
        assert vs.stack.auth.paths is not None
        reg = possessed_reg("race-key-0000000000000000000000000")
        async with auth_client(vs.stack.auth, vs.stack.auth.paths) as client:
            results = await asyncio.gather(
                *(client.register(reg) for _ in range(4)), return_exceptions=True
            )
        # Each copy may have been signed (Vault keeps nothing: no_store); only one is kept,
        # and every copy answers with it.
        answers = [r for r in results if isinstance(r, RegisterResult)]
        assert len(answers) == 4, results
        assert all(a == answers[0] for a in answers)
        assert await vs.registrations() == 1
        assert len(await vs.stack.auth.registry.hosts()) == 1


# --- auth serve --ca-backend vault, the command ----------------------------------------


def _auth_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "auth", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


USAGE = [
    ("a vault flag without the vault backend", ["--vault-addr", "http://127.0.0.1:1"],
     "--vault-addr needs --ca-backend vault"),
    ("the vault backend without an address", ["--ca-backend", "vault", "--vault-token-file", "t"],
     "needs --vault-addr"),
    ("no credentials", ["--ca-backend", "vault", "--vault-addr", "http://127.0.0.1:1"],
     "exactly one of --vault-token-file or --vault-approle-role-id"),
    ("both credentials", ["--ca-backend", "vault", "--vault-addr", "http://127.0.0.1:1",
                          "--vault-token-file", "t", "--vault-approle-role-id", "r",
                          "--vault-approle-secret-id-file", "s"],
     "exactly one of"),
    ("a role ID without its secret ID", ["--ca-backend", "vault", "--vault-addr",
                                         "http://127.0.0.1:1", "--vault-approle-role-id", "r"],
     "go together"),
    ("plain http off loopback", ["--ca-backend", "vault", "--vault-addr", "http://vault:8200",
                                 "--vault-token-file", "t"],
     "plain http only on loopback"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in USAGE], ids=[c[0] for c in USAGE])
def test_contradictory_or_missing_vault_flags_are_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = _auth_serve("--data-dir", str(tmp_path / "auth"), *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr


def test_a_token_lacking_a_capability_stops_auth_serve_naming_it(
    setup: Setup, tmp_path: Path
) -> None:
    setup.bao.ok(
        "PUT",
        "sys/policies/acl/pki-only",
        {"policy": 'path "pki/sign/join-node" { capabilities = ["update"] }'},
    )
    created = setup.bao.ok("POST", "auth/token/create", {"policies": ["pki-only"]})
    token_file = tmp_path / "pki-only-token"
    token_file.write_text(created["auth"]["client_token"])
    out = _auth_serve(
        "--data-dir", str(tmp_path / "auth"), "--ca-backend", "vault",
        "--vault-addr", setup.bao.addr, "--vault-token-file", str(token_file),
    )  # fmt: skip
    assert out.returncode == 3, out.stdout + out.stderr
    assert "'update' on ssh/sign/join-host" in out.stderr
    assert created["auth"]["client_token"] not in out.stdout + out.stderr


async def test_auth_serve_with_an_approle_signs_through_openbao(
    setup: Setup, tmp_path: Path
) -> None:
    """``auth serve --ca-backend vault --spiffe-trust-domain TD``, as an operator runs it:
    OpenBao signs, and the certificate carries the node's SPIFFE ID."""
    paths = init_auth_dir(tmp_path / "auth")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "auth", "serve", "--data-dir", str(paths.data_dir),
        "--ca-backend", "vault", "--vault-addr", setup.bao.addr,
        "--vault-approle-role-id", setup.role_id,
        "--vault-approle-secret-id-file", str(setup.secret_id_file),
        "--spiffe-trust-domain", TD,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        url = line.strip().rsplit(" ", 1)[1]
        assert (await proc.stdout.readline()).decode().strip() == "CA backend: vault"
        client = AuthClient(url=url, ssl_context=gateway_ctx(paths), clock=SystemClock())
        reg = possessed_reg("cli-key-000000000000000000000000")
        async with client:
            result = await client.register(reg)
        chain = _verify_against_openbao(setup, tmp_path, result.tls_cert)
        assert "".join(result.tls_ca_certs).strip() == chain.strip()
        sans = (
            x509.load_pem_x509_certificate(result.tls_cert.encode())
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
        j = reg.join
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://{TD}/azure/{j.tenant}/{j.subscription}/{j.vm_id}"
        ]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        logs = (await proc.stderr.read()).decode()
        assert setup.secret_id_file.read_text().strip() not in logs, "never log a secret ID"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
