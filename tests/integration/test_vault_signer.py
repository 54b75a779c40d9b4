"""The ``vault`` signing backend against a real OpenBao (``bao server -dev``, per test).

Set up the way a person would: ``join-gateway auth vault-setup`` (the CLI) with the root
token, then the signer logs in with the AppRole it printed. Each failure the issue lists is
produced for real: sealed (``sys/seal``), down and slow (a TCP proxy in front that is
closed or holds bytes), Vault's own rate limit (a ``rate-limit`` quota on the PKI path),
a revoked token, missing permissions. Certificates are checked with ``openssl verify`` and
``ssh-keygen -L``, not with our own parser.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from gateway.authservice.signing import SigningRefused, SigningUnavailable, SignRequest
from gateway.authservice.vault import (
    RELOGIN_INTERVAL,
    AppRoleAuth,
    TokenFileAuth,
    VaultClient,
    VaultError,
    VaultSettings,
    VaultSigner,
    VaultStartupError,
)
from gateway.authservice.vault_setup import SetupPlan, vault_setup
from gateway.core.clock import FixedClock
from tests.support.binaries import require_binary
from tests.support.gateway_proc import free_port
from tests.support.openbao import VaultSetup as Setup
from tests.support.openbao import bao_binary, run_vault_setup
from tests.support.slow_proxy import slow_proxy

pytestmark = pytest.mark.integration

HOST_ID = "5b0e4f0e-8c2a-4d55-9d3b-2f1f3c9a7e11"


def _request(
    *, csr_names: list[str] | None = None, ttl: timedelta = timedelta(hours=1)
) -> tuple[SignRequest, ec.EllipticCurvePrivateKey]:
    tls_key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (csr_names or ["node"])[0])])
    )
    if csr_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in csr_names]), critical=False
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    csr = builder.sign(tls_key, hashes.SHA256())
    ssh_key = ed25519.Ed25519PrivateKey.generate().public_key()
    now = datetime.now(UTC)
    return (
        SignRequest(
            host_id=HOST_ID,
            role="node",
            node_name="vm-a",
            tls_public_key_pem=tls_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode(),
            ssh_public_key=ssh_key.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ).decode(),
            principals=(HOST_ID, "vm-a"),
            dns_names=(HOST_ID, "vm-a"),
            ip_addresses=("10.1.2.3",),
            uri_sans=(),
            not_before=now,
            not_after=now + ttl,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
        ),
        tls_key,
    )


@pytest.fixture
async def signer(setup: Setup) -> AsyncIterator[VaultSigner]:
    s = VaultSigner(VaultClient(setup.settings(), setup.approle()), setup.settings())
    await s.start()
    try:
        yield s
    finally:
        await s.aclose()


async def test_a_signed_pair_verifies_with_openssl_and_ssh_keygen(
    signer: VaultSigner, tmp_path: Path
) -> None:
    openssl = require_binary("openssl")
    ssh_keygen = require_binary("ssh-keygen")
    # The CSR asks for other names and to be a CA: neither must reach the certificate.
    request, _ = _request(csr_names=["auth.cluster.internal", "localhost"])
    issued = await signer.sign(request)

    bundle = signer.ca_bundle()
    (tmp_path / "ca.pem").write_text("".join(bundle.tls_ca_certs))
    (tmp_path / "leaf.pem").write_text(issued.tls_cert_pem)
    verify = subprocess.run(
        [openssl, "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    cert = x509.load_pem_x509_certificate(issued.tls_cert_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == HOST_ID
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {HOST_ID, "vm-a"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    # Nor the CA flag it asked for (OpenBao writes no basicConstraints: not a CA).
    assert not any(
        isinstance(e.value, x509.BasicConstraints) and e.value.ca for e in cert.extensions
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert (
        cert.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        == request.tls_public_key_pem
    )

    (tmp_path / "host-cert.pub").write_text(issued.ssh_cert + "\n")
    shown = subprocess.run(
        [ssh_keygen, "-L", "-f", str(tmp_path / "host-cert.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "host certificate" in shown
    assert f'Key ID: "{HOST_ID}"' in shown
    principals = shown.split("Principals:", 1)[1].split("Critical Options:", 1)[0].split()
    assert principals == [HOST_ID, "vm-a"]
    # The SSH CA Vault publishes is the one we pin (same fingerprint as ssh-keygen -l).
    fingerprint = subprocess.run(
        [ssh_keygen, "-l", "-f", "/dev/stdin"],
        input=bundle.ssh_ca_keys[0] + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert _as_keygen_digest(bundle.ssh_ca_pin) in fingerprint
    signing_ca = shown.split("Signing CA:", 1)[1].splitlines()[0]
    assert _as_keygen_digest(bundle.ssh_ca_pin) in signing_ca


def _as_keygen_digest(pin: str) -> str:
    """``sha256:<hex>`` (a node's ssh_ca_pin) as ``ssh-keygen -l`` prints it."""
    assert pin.startswith("sha256:")
    digest = bytes.fromhex(pin.removeprefix("sha256:"))
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


async def test_renewal_signs_again_through_vault(signer: VaultSigner) -> None:
    first = await signer.sign(_request()[0])
    second = await signer.sign(_request()[0])
    assert first.tls_cert_pem != second.tls_cert_pem
    assert signer.sign_calls == 2


async def test_without_a_csr_the_vault_backend_refuses(signer: VaultSigner) -> None:
    request, _ = _request()
    bare = SignRequest(**{**request.__dict__, "csr_pem": None})
    with pytest.raises(SigningRefused, match="CSR"):
        await signer.sign(bare)


async def test_a_sealed_vault_is_retryable_and_unsealing_recovers(
    setup: Setup, signer: VaultSigner
) -> None:
    setup.bao.seal()
    with pytest.raises(SigningUnavailable):
        await signer.sign(_request()[0])
    setup.bao.unseal()
    assert (await signer.sign(_request()[0])).ssh_cert


async def test_vault_down_is_retryable(setup: Setup) -> None:
    async with slow_proxy("127.0.0.1", setup.bao.port) as proxy:
        settings = setup.settings(f"http://127.0.0.1:{proxy.port}")
        s = VaultSigner(VaultClient(settings, setup.approle()), settings)
        await s.start()
    # The proxy is gone: nothing listens on its port any more.
    try:
        with pytest.raises(SigningUnavailable):
            await s.sign(_request()[0])
    finally:
        await s.aclose()


async def test_an_answer_that_arrives_in_pieces_is_read_whole(setup: Setup) -> None:
    """Vault's answer reaching us in several reads (a network, not loopback) is read to its
    end: reading only what had arrived made a mount list of 5 KB read as {}, and a re-run
    of vault-setup then mounted pki again and failed (400 "path is already in use")."""
    async with slow_proxy("127.0.0.1", setup.bao.port) as proxy:
        proxy.trickle = 512
        client = VaultClient(
            setup.settings(f"http://127.0.0.1:{proxy.port}"),
            TokenFileAuth(setup.workdir / "root-token"),
        )
        try:
            mounts = await client.authed("GET", "sys/mounts")
            assert {"pki/", "ssh/"} <= set(mounts.get("data", {})), sorted(mounts)
            await vault_setup(client, SetupPlan())  # a re-run: nothing mounted twice
        finally:
            await client.aclose()


async def test_a_slow_vault_is_bounded_by_the_timeout(setup: Setup) -> None:
    async with slow_proxy("127.0.0.1", setup.bao.port) as proxy:
        settings = setup.settings(f"http://127.0.0.1:{proxy.port}", timeout=0.5)
        s = VaultSigner(VaultClient(settings, setup.approle()), settings)
        await s.start()
        proxy.delay = 3.0
        try:
            with pytest.raises(SigningUnavailable):
                await s.sign(_request()[0])
        finally:
            proxy.delay = 0.0
            await s.aclose()


async def test_vaults_rate_limit_is_retryable(setup: Setup, signer: VaultSigner) -> None:
    setup.bao.ok(
        "POST",
        "sys/quotas/rate-limit/pki-sign",
        {"path": "pki/", "rate": 1, "interval": "30s"},
    )
    outcomes: list[str] = []
    for _ in range(3):
        try:
            await signer.sign(_request()[0])
            outcomes.append("signed")
        except SigningUnavailable as exc:
            outcomes.append("unavailable")
            assert exc.retry_after > 0
    assert outcomes[0] == "signed"
    assert "unavailable" in outcomes[1:]
    setup.bao.ok("DELETE", "sys/quotas/rate-limit/pki-sign")


async def test_a_revoked_approle_token_means_a_fresh_login(setup: Setup) -> None:
    clock = FixedClock(datetime.now(UTC))
    auth = setup.approle(clock=clock)
    client = VaultClient(setup.settings(), auth)
    s = VaultSigner(client, setup.settings())
    await s.start()
    try:
        token = await auth.token(client)
        setup.bao.ok("POST", "auth/token/revoke", {"token": token})
        clock.advance(RELOGIN_INTERVAL)  # no longer a fresh token: its refusal means it is lost
        assert (await s.sign(_request()[0])).tls_cert_pem
        assert auth.logins == 2
    finally:
        await s.aclose()


async def test_a_fresh_token_refused_is_a_missing_permission_not_a_login_per_signing(
    setup: Setup,
) -> None:
    """A policy narrowed while running: every signing is refused, and the refusals of a
    storm do not each log in again (one login per RELOGIN_INTERVAL at most)."""
    clock = FixedClock(datetime.now(UTC))
    auth = setup.approle(clock=clock)
    client = VaultClient(setup.settings(), auth)
    s = VaultSigner(client, setup.settings())
    await s.start()
    policy = setup.bao.ok("GET", "sys/policies/acl/join-auth-service")["data"]["policy"]
    setup.bao.ok(
        "PUT",
        "sys/policies/acl/join-auth-service",
        {"policy": 'path "pki/sign/join-node" { capabilities = ["update"] }'},
    )
    try:
        for _ in range(5):
            with pytest.raises(SigningRefused, match="ssh/sign/join-host"):
                await s.sign(_request()[0])
        assert auth.logins == 1, "a fresh token's refusals made no new logins"
        clock.advance(RELOGIN_INTERVAL)
        with pytest.raises(SigningRefused):
            await s.sign(_request()[0])
        assert auth.logins == 2, "past the interval, one fresh login is tried"
    finally:
        setup.bao.ok("PUT", "sys/policies/acl/join-auth-service", {"policy": policy})
        await s.aclose()


async def test_a_revoked_file_token_is_a_clear_error_until_the_file_changes(
    setup: Setup,
) -> None:
    created = setup.bao.ok(
        "POST", "auth/token/create", {"policies": ["join-auth-service"], "ttl": "1h"}
    )
    token_file = setup.workdir / "svc-token"
    token_file.write_text(created["auth"]["client_token"])
    s = VaultSigner(VaultClient(setup.settings(), TokenFileAuth(token_file)), setup.settings())
    await s.start()
    try:
        setup.bao.ok("POST", "auth/token/revoke", {"token": created["auth"]["client_token"]})
        with pytest.raises(SigningRefused, match="403"):
            await s.sign(_request()[0])
        fresh = setup.bao.ok(
            "POST", "auth/token/create", {"policies": ["join-auth-service"], "ttl": "1h"}
        )
        await asyncio.sleep(0.01)  # a new mtime even on coarse file systems
        token_file.write_text(fresh["auth"]["client_token"] + "\n")
        assert (await s.sign(_request()[0])).ssh_cert
    finally:
        await s.aclose()


async def test_missing_permission_is_a_startup_error_naming_it(setup: Setup) -> None:
    setup.bao.ok(
        "PUT",
        "sys/policies/acl/pki-only",
        {"policy": 'path "pki/sign/join-node" { capabilities = ["update"] }'},
    )
    created = setup.bao.ok("POST", "auth/token/create", {"policies": ["pki-only"]})
    token_file = setup.workdir / "pki-only-token"
    token_file.write_text(created["auth"]["client_token"])
    s = VaultSigner(VaultClient(setup.settings(), TokenFileAuth(token_file)), setup.settings())
    try:
        with pytest.raises(VaultStartupError, match="'update' on ssh/sign/join-host"):
            await s.start()
    finally:
        await s.aclose()


async def test_vault_setup_is_idempotent(setup: Setup) -> None:
    token_file = setup.workdir / "root-token"
    before = setup.bao.request("GET", "pki/ca_chain", token=None)[1]["text"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "auth",
            "vault-setup",
            "--vault-addr",
            setup.bao.addr,
            "--token-file",
            str(token_file),
            "--secret-id-out",
            str(setup.workdir / "secret-id-2"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # The same CA: re-running never replaces the trust anchor nodes already pinned.
    after = setup.bao.request("GET", "pki/ca_chain", token=None)[1]["text"]
    assert "BEGIN CERTIFICATE" in before
    assert after == before
    assert f"role_id: {setup.role_id}" in out.stdout


class _SshCaUnreadable(VaultClient):
    """The real OpenBao, except that reading the SSH CA's public key fails as a busy Vault
    fails (503): what a re-run of vault-setup may meet in production."""

    async def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None,
        raw: bool = False,
    ) -> dict[str, Any]:
        if method == "GET" and path == "ssh/public_key":
            raise VaultError(503, ["Vault is busy"])
        return await super().call(method, path, body, token=token, raw=raw)


async def test_rerunning_vault_setup_while_vault_fails_never_replaces_the_ssh_ca(
    setup: Setup,
) -> None:
    before = setup.bao.request("GET", "ssh/public_key", token=None)[1]["text"]
    client = _SshCaUnreadable(setup.settings(), TokenFileAuth(setup.workdir / "root-token"))
    try:
        with pytest.raises(VaultError, match="503"):
            await vault_setup(client, SetupPlan())
    finally:
        await client.aclose()
    after = setup.bao.request("GET", "ssh/public_key", token=None)[1]["text"]
    assert before.startswith("ssh-") and after == before, "the SSH CA nodes trust was kept"


async def test_vault_setup_writes_least_privilege_roles_with_no_store_and_ttl_limits(
    setup: Setup,
) -> None:
    """What ``vault-setup`` configured, read back from OpenBao (not from its own output)."""
    pki = setup.bao.ok("GET", "pki/roles/join-node")["data"]
    # Names come from the auth service only, never from the node's CSR.
    assert (pki["use_csr_common_name"], pki["use_csr_sans"]) == (False, False)
    assert pki["no_store"] is True, "a join storm must not grow Vault's storage"
    assert pki["max_ttl"] == 72 * 3600
    assert pki["allow_wildcard_certificates"] is False
    assert (pki["server_flag"], pki["client_flag"]) == (True, True)
    ssh = setup.bao.ok("GET", "ssh/roles/join-host")["data"]
    assert (ssh["allow_host_certificates"], ssh["allow_user_certificates"]) == (True, False)
    assert ssh["max_ttl"] == 72 * 3600
    approle = setup.bao.ok("GET", "auth/approle/role/join-auth-service")["data"]
    assert approle["token_policies"] == ["join-auth-service"]
    assert (approle["token_ttl"], approle["token_max_ttl"]) == (3600, 24 * 3600)
    policy = setup.bao.ok("GET", "sys/policies/acl/join-auth-service")["data"]["policy"]
    paths = sorted(line.split('"')[1] for line in policy.splitlines() if line.startswith("path"))
    assert paths == ["pki/sign/join-node", "ssh/sign/join-host"]
    assert policy.count('capabilities = ["update"]') == 2


async def test_an_approle_token_is_renewed_before_expiry_and_a_failed_renewal_logs_in_again(
    setup: Setup,
) -> None:
    clock = FixedClock(datetime.now(UTC))
    auth = AppRoleAuth(role_id=setup.role_id, secret_id_file=setup.secret_id_file, clock=clock)
    client = VaultClient(setup.settings(), auth)
    s = VaultSigner(client, setup.settings())
    await s.start()
    try:
        first = await auth.token(client)
        assert (auth.logins, auth.renewals) == (1, 0)
        clock.advance(0.5 * 3600)  # half of vault-setup's 1 h lease: nothing to do
        assert await auth.token(client) == first
        assert auth.renewals == 0
        clock.advance(0.2 * 3600)  # past two thirds: renew-self, the same token
        assert await auth.token(client) == first
        assert (auth.logins, auth.renewals) == (1, 1)
        lookup = setup.bao.ok("POST", "auth/token/lookup", {"token": first})["data"]
        assert lookup["ttl"] > 0.9 * 3600, "OpenBao extended the lease"

        # A renewal Vault refuses (the token was revoked): one fresh login, signing works.
        setup.bao.ok("POST", "auth/token/revoke", {"token": first})
        clock.advance(0.7 * 3600)
        second = await auth.token(client)
        assert second != first
        assert (auth.logins, auth.renewals) == (2, 1)
        assert (await s.sign(_request()[0])).tls_cert_pem
        assert auth.logins == 2

        # Past the lease's end (a suspended host): no renewal attempt, a fresh login.
        clock.advance(2 * 3600)
        assert await auth.token(client) not in (first, second)
        assert (auth.logins, auth.renewals) == (3, 1)
    finally:
        await s.aclose()


async def test_a_vault_namespace_is_sent_with_every_call(setup: Setup) -> None:
    """``--vault-namespace``: vault-setup and the signer work inside the namespace (its
    own mounts, CA and AppRole), never in the root one."""
    setup.bao.ok("POST", "sys/namespaces/team-a", {})
    workdir = setup.workdir / "team-a"
    workdir.mkdir()
    in_ns = run_vault_setup(setup.bao, workdir, namespace="team-a")
    settings = VaultSettings(addr=setup.bao.addr, namespace="team-a")
    auth = in_ns.approle()
    s = VaultSigner(VaultClient(settings, auth), settings)
    await s.start()
    try:
        issued = await s.sign(_request()[0])
    finally:
        await s.aclose()
    ns_chain = setup.bao.request("GET", "team-a/pki/ca_chain", token=None)[1]["text"]
    root_chain = setup.bao.request("GET", "pki/ca_chain", token=None)[1]["text"]
    assert "BEGIN CERTIFICATE" in ns_chain and ns_chain != root_chain
    assert "".join(s.ca_bundle().tls_ca_certs).strip() == ns_chain.strip()
    leaf = x509.load_pem_x509_certificate(issued.tls_cert_pem.encode())
    anchor = x509.load_pem_x509_certificate(s.ca_bundle().tls_ca_certs[-1].encode())
    leaf.verify_directly_issued_by(anchor)


async def test_the_auth_services_lifetime_reaches_both_certificates(signer: VaultSigner) -> None:
    """The TTL is the auth service's (``--cert-ttl``), not the role's default (24 h)."""
    request, _ = _request(ttl=timedelta(hours=2))
    issued = await signer.sign(request)
    cert = x509.load_pem_x509_certificate(issued.tls_cert_pem.encode())
    # Vault back-dates not_before by 30 s (clock skew).
    assert abs(cert.not_valid_after_utc - request.not_after) < timedelta(minutes=1)
    ssh = serialization.load_ssh_public_identity(issued.ssh_cert.encode())
    assert isinstance(ssh, serialization.SSHCertificate)
    assert abs((ssh.valid_before - ssh.valid_after) - 2 * 3600) <= 60


async def test_vaults_tls_certificate_is_checked_against_the_vault_ca_file(
    tmp_path: Path,
) -> None:
    """``--vault-ca-file``: an OpenBao serving TLS (``-dev-tls``, its own generated CA) is
    trusted through that file, and refused without it (the system's CAs do not know it)."""
    certs = tmp_path / "bao-tls"
    certs.mkdir()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        bao_binary(), "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={certs}",
        f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"HOME": str(tmp_path)},
    )  # fmt: skip
    try:
        addr = f"https://127.0.0.1:{port}"
        trusted = VaultSettings(addr=addr, ca_file=certs / "vault-ca.pem")
        client = VaultClient(trusted, TokenFileAuth(tmp_path / "unused"))
        try:
            for _ in range(200):  # the server generates its CA, then listens
                try:
                    health = await client.call("GET", "sys/health", token=None)
                    break
                except VaultError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("OpenBao with -dev-tls did not answer")
        finally:
            await client.aclose()
        assert health["initialized"] is True
        untrusted = VaultClient(VaultSettings(addr=addr), TokenFileAuth(tmp_path / "unused"))
        try:
            with pytest.raises(VaultError, match=r"[Cc]ertificate"):
                await untrusted.call("GET", "sys/health", token=None)
        finally:
            await untrusted.aclose()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
