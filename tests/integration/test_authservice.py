"""The reference auth service over real mTLS on 127.0.0.1.

Issued certificates are checked by tools that share no code with us: ``openssl verify``
for the X.509 certificate and ``ssh-keygen -L`` for the OpenSSH host certificate, plus
cryptography's own certificate-signature check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.authservice import (
    AuthPaths,
    AuthService,
    AuthSettings,
    HostAuthority,
    ca_pin_for_data_dir,
    init_auth_dir,
)
from gateway.authservice import cli as auth_cli
from gateway.core.clock import SystemClock
from gateway.core.errors import Code, Overloaded, UpstreamFailed
from gateway.core.tlsutil import (
    client_ssl_context,
    generate_ca,
    issue_cert,
    spki_pin,
    write_pem_files,
)
from gateway.join.forward import AuthClient
from gateway.protocol import HostParams, JoinBlock, Registration
from gateway.protocol.possession import make_csr, sign_ssh_possession

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """An outside tool, run to completion (from a thread: tests stay async)."""
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@dataclass(frozen=True)
class NodeKeys:
    tls_private: ec.EllipticCurvePrivateKey
    ssh_private: ed25519.Ed25519PrivateKey

    @property
    def tls_public_pem(self) -> str:
        return (
            self.tls_private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    @property
    def ssh_public_line(self) -> str:
        return (
            self.ssh_private.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )


def new_keys() -> NodeKeys:
    return NodeKeys(ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate())


def make_reg(keys: NodeKeys, key: str = "challenge-0000000000000000000001") -> Registration:
    return Registration(
        idempotency_key=key,
        token_name="azure-token",
        role="Node",
        client_address="203.0.113.7",
        join=JoinBlock(
            method="azure",
            tenant="44444444-4444-4444-4444-444444444444",
            subscription="11111111-1111-1111-1111-111111111111",
            resource_group="group1",
            vm_id="22222222-2222-2222-2222-222222222222",
            resource_id="/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/"
            "group1/providers/Microsoft.Compute/virtualMachines/web-1",
        ),
        host=HostParams(
            node_name="web-1",
            role="Node",
            public_ssh_key=keys.ssh_public_line,
            public_tls_key=keys.tls_public_pem,
            additional_principals=("10.1.2.3", "web-1.example.com"),
            dns_names=("web-1.internal",),
        ),
    )


@pytest.fixture
def paths(tmp_path: Path) -> AuthPaths:
    return init_auth_dir(tmp_path / "auth")


@pytest.fixture
async def service(paths: AuthPaths) -> AsyncIterator[AuthService]:
    async with AuthService(
        data_dir=paths.data_dir,
        tls_cert=paths.server_cert,
        tls_key=paths.server_key,
        client_ca=paths.client_ca_cert,
    ) as svc:
        yield svc


def gateway_ctx(paths: AuthPaths) -> ssl.SSLContext:
    return client_ssl_context(
        paths.internal_ca_cert,
        cert_file=paths.gateway_client_cert,
        key_file=paths.gateway_client_key,
    )


def auth_client(svc: AuthService, paths: AuthPaths) -> AuthClient:
    return AuthClient(
        url=svc.url, ssl_context=gateway_ctx(paths), clock=SystemClock(), retries=0, timeout=10
    )


async def post_raw(
    svc: AuthService,
    ctx: ssl.SSLContext,
    body: bytes,
    *,
    content_type: str = "application/json",
    method: str = "POST",
    path: str = "/v1/register",
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            svc.url + path,
            data=body,
            headers={"Content-Type": content_type},
            ssl=ctx,
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


# --- issuance ---------------------------------------------------------------------------


async def test_registration_issues_certificates_that_outside_tools_accept(
    service: AuthService, paths: AuthPaths, tmp_path: Path
) -> None:
    keys = new_keys()
    reg = make_reg(keys)
    async with auth_client(service, paths) as client:
        result = await client.register(reg)

    # X.509: openssl verifies it against the host CA, for TLS server use.
    leaf = tmp_path / "node.pem"
    leaf.write_text(result.tls_cert)
    out = await asyncio.to_thread(
        _run,
        [
            "openssl",
            "verify",
            "-CAfile",
            str(paths.host_ca_cert),
            "-purpose",
            "sslserver",
            str(leaf),
        ],
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"{leaf}: OK"
    cert = x509.load_pem_x509_certificate(result.tls_cert.encode())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        keys.tls_private.public_key().public_bytes(serialization.Encoding.DER, spki)
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == result.host_id
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Node"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {
        result.host_id,
        "web-1",
        "web-1.example.com",
        "web-1.internal",
    }
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 24 * 3600 <= lifetime.total_seconds() <= 24 * 3600 + 600
    assert [x509.load_pem_x509_certificate(c.encode()) for c in result.tls_ca_certs] == [
        x509.load_pem_x509_certificate(paths.host_ca_cert.read_bytes())
    ]
    assert service.ca_pin() == spki_pin(
        x509.load_pem_x509_certificate(paths.host_ca_cert.read_bytes())
    )

    # OpenSSH: ssh-keygen reads it as a host certificate signed by the SSH CA.
    cert_file = tmp_path / "node-cert.pub"
    cert_file.write_text(result.ssh_cert + "\n")
    keygen = await asyncio.to_thread(_run, ["ssh-keygen", "-L", "-f", str(cert_file)])
    assert keygen.returncode == 0, keygen.stderr
    shown = keygen.stdout
    assert "ssh-ed25519-cert-v01@openssh.com host certificate" in shown
    fingerprint = await asyncio.to_thread(_run, ["ssh-keygen", "-l", "-f", str(paths.ssh_ca_pub)])
    ca_fp = fingerprint.stdout.split()[1]
    assert re.search(rf"Signing CA: ED25519 {re.escape(ca_fp)}", shown), shown
    listed = shown.split("Principals:")[1].split("Critical Options:")[0].split()
    assert listed == [result.host_id, "web-1", "10.1.2.3", "web-1.example.com", "web-1.internal"]
    assert result.ssh_ca_keys == (paths.ssh_ca_pub.read_text().split(" join-gateway")[0],)

    # And cryptography agrees: the signature verifies and the CA is ours.
    ssh_cert = serialization.load_ssh_public_identity(result.ssh_cert.encode())
    assert isinstance(ssh_cert, serialization.SSHCertificate)
    ssh_cert.verify_cert_signature()
    assert ssh_cert.type is serialization.SSHCertificateType.HOST
    ca_pub = serialization.load_ssh_public_key(result.ssh_ca_keys[0].encode())
    assert isinstance(ca_pub, ed25519.Ed25519PublicKey)
    signer = ssh_cert.signature_key()
    assert isinstance(signer, ed25519.Ed25519PublicKey)
    assert signer.public_bytes_raw() == ca_pub.public_bytes_raw()
    node_pub = ssh_cert.public_key()
    assert isinstance(node_pub, ed25519.Ed25519PublicKey)
    assert node_pub.public_bytes_raw() == keys.ssh_private.public_key().public_bytes_raw()


async def test_an_rsa_node_key_is_certified_too(service: AuthService, paths: AuthPaths) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = new_keys()
    reg = make_reg(keys)
    reg = replace(
        reg,
        host=replace(
            reg.host,
            public_tls_key=rsa_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode(),
            public_ssh_key=rsa_key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode(),
        ),
    )
    async with auth_client(service, paths) as client:
        result = await client.register(reg)
    cert = x509.load_pem_x509_certificate(result.tls_cert.encode())
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    ssh_cert = serialization.load_ssh_public_identity(result.ssh_cert.encode())
    assert isinstance(ssh_cert, serialization.SSHCertificate)
    ssh_cert.verify_cert_signature()


# --- idempotency and records -----------------------------------------------------------


async def test_the_same_idempotency_key_returns_the_stored_answer(
    service: AuthService, paths: AuthPaths
) -> None:
    reg = make_reg(new_keys())
    async with auth_client(service, paths) as client:
        first = await client.register(reg)
        again = await client.register(reg)
        burst = await asyncio.gather(*(client.register(reg) for _ in range(20)))
    assert again == first
    assert all(r == first for r in burst)
    assert [r.host_id for r in await service.records()] == [first.host_id]


async def test_a_reused_key_with_a_different_body_is_a_conflict(
    service: AuthService, paths: AuthPaths
) -> None:
    reg = make_reg(new_keys())
    other = replace(reg, client_address="198.51.100.1")
    async with auth_client(service, paths) as client:
        await client.register(reg)
        with pytest.raises(UpstreamFailed) as exc_info:
            await client.register(other)
    assert exc_info.value.code == Code.UPSTREAM_FAILED
    assert "idempotency_conflict" in (exc_info.value.detail or "")
    status, body = await post_raw(service, gateway_ctx(paths), json.dumps(other.to_json()).encode())
    assert status == 409
    assert body["error"]["code"] == "idempotency_conflict"
    assert len(await service.records()) == 1


async def test_distinct_keys_from_one_vm_get_one_host_id(
    service: AuthService, paths: AuthPaths
) -> None:
    async with auth_client(service, paths) as client:
        results = await asyncio.gather(
            *(client.register(make_reg(new_keys(), key=f"key-{i:04d}")) for i in range(10))
        )
    assert len({r.host_id for r in results}) == 1
    assert sorted(r.renewal for r in results) == [False] + [True] * 9
    assert len(await service.records()) == 10


async def test_records_are_kept_privately_and_reloaded_after_restart(paths: AuthPaths) -> None:
    reg = make_reg(new_keys())
    async with AuthService(data_dir=paths.data_dir) as svc:
        pin = svc.ca_pin()
        async with auth_client(svc, paths) as client:
            first = await client.register(reg)
        # While the service runs, the database and its WAL files are private.
        for name in ("registry.sqlite3", "registry.sqlite3-wal", "registry.sqlite3-shm"):
            assert stat.S_IMODE((paths.data_dir / name).stat().st_mode) == 0o600, name
    for key in (paths.host_ca_key, paths.ssh_ca_key, paths.client_ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    async with AuthService(data_dir=paths.data_dir) as svc:
        assert svc.ca_pin() == pin
        records = await svc.records()
        assert [r.host_id for r in records] == [first.host_id]
        assert records[0].registration == reg
        assert records[0].gateway == "join-gateway"
        async with auth_client(svc, paths) as client:
            assert await client.register(reg) == first
            with pytest.raises(UpstreamFailed):
                await client.register(replace(reg, token_name="other"))
        assert len(await svc.records()) == 1


async def test_an_unreadable_record_stops_the_service_from_starting(paths: AuthPaths) -> None:
    (paths.registrations_dir / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable registration record"):
        async with AuthService(data_dir=paths.data_dir):
            pass


# --- mTLS --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "who",
    ["no-cert", "rogue-cert"],
    ids=[
        "a client without a certificate is refused",
        "a client certificate from another CA is refused",
    ],
)
async def test_only_gateways_get_past_the_handshake(
    service: AuthService, paths: AuthPaths, tmp_path: Path, who: str
) -> None:
    if who == "no-cert":
        ctx = client_ssl_context(paths.internal_ca_cert)
    else:
        rogue = issue_cert(
            generate_ca("rogue"), common_name="join-gateway", server=False, client=True
        )
        cert, key = write_pem_files(rogue, tmp_path, "rogue")
        ctx = client_ssl_context(paths.internal_ca_cert, cert_file=cert, key_file=key)
    body = json.dumps(make_reg(new_keys()).to_json()).encode()
    with pytest.raises(aiohttp.ClientError):
        await post_raw(service, ctx, body)
    async with AuthClient(url=service.url, ssl_context=ctx, clock=SystemClock(), retries=1) as c:
        with pytest.raises(Overloaded) as exc_info:
            await c.register(make_reg(new_keys()))
    assert exc_info.value.code == Code.UPSTREAM_UNAVAILABLE
    assert await service.records() == []


async def test_healthz_answers_gateways(service: AuthService, paths: AuthPaths) -> None:
    status, body = await post_raw(service, gateway_ctx(paths), b"", method="GET", path="/healthz")
    assert (status, body) == (200, {"status": "ok"})


# --- validation -----------------------------------------------------------------------


def _body(**changes: Any) -> dict[str, Any]:
    """A valid body with dotted-path changes (``"host.role": "Proxy"``); None deletes."""
    body: dict[str, Any] = make_reg(new_keys()).to_json()
    for dotted, value in changes.items():
        parts = dotted.split("__")
        target = body
        for p in parts[:-1]:
            target = target[p]
        if value is _DELETE:
            del target[parts[-1]]
        else:
            target[parts[-1]] = value
    return body


_DELETE = object()


def _rsa1024_ssh() -> str:
    k = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - weak on purpose
    return (
        k.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _p192_pem() -> str:
    # cryptography cannot generate on SECP192R1 in every build: use secp256k1, also refused.
    k = ec.generate_private_key(ec.SECP256K1())
    return (
        k.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@dataclass(frozen=True)
class BadCase:
    raw: bytes
    status: int
    code: str
    content_type: str = "application/json"
    method: str = "POST"
    path: str = "/v1/register"


def _j(body: object) -> bytes:
    return json.dumps(body).encode()


BAD = [
    ("a body that is not JSON is malformed", BadCase(b"{nope", 400, "malformed_body")),
    ("a body that is not UTF-8 is malformed", BadCase(b'{"a":"\xff"}', 400, "malformed_body")),
    ("NaN is not JSON", BadCase(b'{"a": NaN}', 400, "malformed_body")),
    (
        "a duplicated key is malformed",
        BadCase(b'{"role":"Node","role":"Node"}', 400, "malformed_body"),
    ),
    ("a JSON array is an invalid request", BadCase(b"[]", 400, "invalid_request")),
    ("an unknown top-level field is refused", BadCase(_j(_body(extra=1)), 400, "invalid_request")),
    (
        "a missing idempotency key is refused",
        BadCase(_j(_body(idempotency_key=_DELETE)), 400, "invalid_request"),
    ),
    (
        "an idempotency key with spaces is refused",
        BadCase(_j(_body(idempotency_key="a b")), 400, "invalid_request"),
    ),
    ("a numeric token name is refused", BadCase(_j(_body(token_name=5)), 400, "invalid_request")),
    (
        "a client address that is not an IP is refused",
        BadCase(_j(_body(client_address="example.com")), 400, "invalid_request"),
    ),
    (
        "a join method other than azure is refused",
        BadCase(_j(_body(join__method="aws")), 400, "invalid_request"),
    ),
    (
        "a tenant that is not a GUID is refused",
        BadCase(_j(_body(join__tenant="not-a-guid")), 400, "invalid_request"),
    ),
    (
        "an unknown join field is refused",
        BadCase(_j(_body(join__region="eastus")), 400, "invalid_request"),
    ),
    (
        "a resource ID that is not an ARM ID is refused",
        BadCase(_j(_body(join__resource_id="vm-1")), 400, "invalid_request"),
    ),
    (
        "a host role that differs from the role is refused",
        BadCase(_j(_body(host__role="Proxy")), 400, "invalid_request"),
    ),
    (
        "a node name with a space is refused",
        BadCase(_j(_body(host__node_name="web 1")), 400, "invalid_request"),
    ),
    (
        "a node name ending in a newline is refused",
        BadCase(_j(_body(host__node_name="web-1\n")), 400, "invalid_request"),
    ),
    (
        "a vmId ending in a newline is refused",
        BadCase(
            _j(_body(join__vm_id="22222222-2222-2222-2222-222222222222\n")),
            400,
            "invalid_request",
        ),
    ),
    (
        "an idempotency key ending in a newline is refused",
        BadCase(_j(_body(idempotency_key="challenge-1\n")), 400, "invalid_request"),
    ),
    (
        "Bot is a token role, not a host role",
        BadCase(_j(_body(role="Bot", host__role="Bot")), 400, "invalid_request"),
    ),
    (
        "an SSH key that does not parse is refused",
        BadCase(_j(_body(host__public_ssh_key="ssh-ed25519 !!!")), 400, "invalid_request"),
    ),
    (
        "a 1024-bit RSA SSH key is refused",
        BadCase(_j(_body(host__public_ssh_key=_rsa1024_ssh())), 400, "invalid_request"),
    ),
    (
        "a TLS key that is not PEM is refused",
        BadCase(_j(_body(host__public_tls_key="MFkwEwYHKoZIzj0CAQ==")), 400, "invalid_request"),
    ),
    (
        "a TLS key on an unsupported curve is refused",
        BadCase(_j(_body(host__public_tls_key=_p192_pem())), 400, "invalid_request"),
    ),
    (
        "a DNS name with an underscore is refused",
        BadCase(_j(_body(host__dns_names=["bad_name.internal"])), 400, "invalid_request"),
    ),
    (
        "a principals list that is not a list is refused",
        BadCase(_j(_body(host__additional_principals="10.0.0.1")), 400, "invalid_request"),
    ),
    (
        "more than 64 principals are refused",
        BadCase(
            _j(_body(host__additional_principals=[f"p{i}" for i in range(65)])),
            400,
            "invalid_request",
        ),
    ),
    (
        "a form body is an unsupported media type",
        BadCase(_j(_body()), 415, "unsupported_media_type", content_type="text/plain"),
    ),
    (
        "a body over 64 KiB is too large",
        BadCase(b'{"pad":"' + b"x" * 70_000 + b'"}', 413, "body_too_large"),
    ),
    ("GET on register is not allowed", BadCase(b"", 405, "method_not_allowed", method="GET")),
    ("an unknown path is not found", BadCase(b"{}", 404, "not_found", path="/v1/other")),
]


@pytest.mark.parametrize("case", [c for _, c in BAD], ids=[i for i, _ in BAD])
async def test_malformed_requests_are_refused_with_a_code(
    service: AuthService, paths: AuthPaths, case: BadCase
) -> None:
    status, body = await post_raw(
        service,
        gateway_ctx(paths),
        case.raw,
        content_type=case.content_type,
        method=case.method,
        path=case.path,
    )
    assert status == case.status
    assert body["error"]["code"] == case.code
    assert isinstance(body["error"]["message"], str)
    assert await service.records() == []


async def test_a_valid_raw_body_is_accepted(service: AuthService, paths: AuthPaths) -> None:
    # The table above must fail for the stated reason, not because the base body is bad.
    status, body = await post_raw(service, gateway_ctx(paths), _j(_body()))
    assert status == 200
    assert set(body) == {"host_id", "certs", "renewal"}
    assert body["renewal"] is False
    assert set(body["certs"]) == {"ssh", "tls", "tls_ca_certs", "ssh_ca_keys"}


async def test_every_token_name_the_gateway_accepts_the_auth_service_accepts(
    service: AuthService, paths: AuthPaths
) -> None:
    # The gateway allows token names of 254 characters; the auth service once stopped at
    # 253 and answered a verified join with a 400 (both now use the protocol's rule).
    status, _ = await post_raw(service, gateway_ctx(paths), _j(_body(token_name="t" * 254)))
    assert status == 200


# --- CLI ---------------------------------------------------------------------------------


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="join-gateway auth")
    auth_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_auth_init_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "auth"
    assert auth_cli.run(_cli(["init", "--data-dir", str(d)])) == 0
    first = capsys.readouterr().out
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert auth_cli.run(_cli(["init", "--data-dir", str(d)])) == 0
    assert capsys.readouterr().out == first
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    assert re.search(r"CA pin:\s+sha256:[0-9a-f]{64}", first)


def test_status_reads_the_same_pin_the_service_reports(paths: AuthPaths) -> None:
    pin = HostAuthority.load(paths).ca_pin()
    assert ca_pin_for_data_dir(paths.data_dir) == pin
    assert paths.cluster_ca == paths.internal_ca_cert
    assert paths.gateway_client_ca == paths.client_ca_cert


def test_ca_pin_for_a_missing_data_dir_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ca_pin_for_data_dir(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_auth_serve_rejects_a_bad_listen_address(tmp_path: Path) -> None:
    assert auth_cli.run(_cli(["serve", "--data-dir", str(tmp_path), "--listen", "nope"])) == 2


@asynccontextmanager
async def auth_serve(*args: str) -> AsyncIterator[str]:
    """``join-gateway auth serve ARGS`` as a process; yields its URL. Leaving the block
    sends SIGTERM, which must exit 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "auth", "serve", *args,
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        url = line.strip().rsplit(" ", 1)[1]
        assert url.startswith("https://127.0.0.1:")
        yield url
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_auth_serve_runs_until_sigterm(paths: AuthPaths) -> None:
    async with auth_serve("--data-dir", str(paths.data_dir), "--listen", "127.0.0.1:0") as url:
        client = AuthClient(url=url, ssl_context=gateway_ctx(paths), clock=SystemClock())
        async with client:
            result = await client.register(make_reg(new_keys()))
        assert result.host_id


async def test_auth_serve_require_csr_refuses_a_registration_without_proofs(
    paths: AuthPaths,
) -> None:
    """``--require-csr`` through the command line (not only ``AuthSettings``)."""
    args = ("--data-dir", str(paths.data_dir), "--listen", "127.0.0.1:0", "--require-csr")
    async with (
        auth_serve(*args) as url,
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/register", json=make_reg(new_keys()).to_json(), ssl=gateway_ctx(paths)
        ) as resp,
    ):
        assert (resp.status, (await resp.json())["error"]["code"]) == (400, "csr_required")


# --- proof of possession: the auth service checks again what the gateway checked -------


def _with(reg: Registration, **host: Any) -> bytes:
    return json.dumps(replace(reg, host=replace(reg.host, **host)).to_json()).encode()


POSSESSION: list[tuple[str, Callable[[NodeKeys, Registration], bytes], int, str | None]] = [
    (
        "the node's own CSR and SSH proof are certified",
        lambda k, r: _with(
            r,
            csr=make_csr(k.tls_private),
            ssh_key_proof=sign_ssh_possession(k.ssh_private, r.idempotency_key),
        ),
        200,
        None,
    ),
    (
        "a CSR for another key is refused",
        lambda k, r: _with(
            r,
            csr=make_csr(ec.generate_private_key(ec.SECP256R1())),
            ssh_key_proof=sign_ssh_possession(k.ssh_private, r.idempotency_key),
        ),
        400,
        "csr_key_mismatch",
    ),
    (
        "an SSH proof over another idempotency key is refused",
        lambda k, r: _with(
            r,
            csr=make_csr(k.tls_private),
            ssh_key_proof=sign_ssh_possession(k.ssh_private, "x" * 32),
        ),
        400,
        "ssh_key_proof_invalid",
    ),
    ("no proof is refused with --require-csr", lambda k, r: _with(r), 400, "csr_required"),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [c[1:] for c in POSSESSION], ids=[c[0] for c in POSSESSION]
)
async def test_possession_is_checked_again_at_the_auth_service(
    paths: AuthPaths,
    body: Callable[[NodeKeys, Registration], bytes],
    status: int,
    code: str | None,
) -> None:
    keys = new_keys()
    async with AuthService(data_dir=paths.data_dir, settings=AuthSettings(require_csr=True)) as svc:
        got, data = await post_raw(svc, gateway_ctx(paths), body(keys, make_reg(keys)))
    assert (got, (data.get("error") or {}).get("code") if isinstance(data, dict) else None) == (
        status,
        code,
    )
