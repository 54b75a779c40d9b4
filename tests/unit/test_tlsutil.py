"""The dev PKI and the TLS policy: real certificates, real handshakes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import ssl
import stat
import subprocess
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.core.clock import FixedClock
from gateway.core.tlsutil import (
    CaMaterial,
    KeyType,
    client_ssl_context,
    generate_ca,
    issue_cert,
    load_ca,
    server_ssl_context,
    spki_pin,
    write_pem_files,
)


@pytest.mark.parametrize(
    ("key_type", "key_class"),
    [("ecdsa-p256", ec.EllipticCurvePrivateKey), ("rsa-2048", rsa.RSAPrivateKey)],
    ids=["an ECDSA CA has a P-256 key", "an RSA CA has a 2048-bit key"],
)
def test_generate_ca_is_a_self_signed_ca(key_type: KeyType, key_class: type) -> None:
    ca = generate_ca("test CA", key_type=key_type, days=30)
    assert isinstance(ca.key, key_class)
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    assert ca.cert.subject == ca.cert.issuer
    ca.cert.verify_directly_issued_by(ca.cert)
    cn = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "test CA"


def test_generate_ca_takes_validity_from_the_injected_clock() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    ca = generate_ca("c", days=10, clock=FixedClock(at))
    assert ca.cert.not_valid_before_utc < at < ca.cert.not_valid_after_utc
    assert (ca.cert.not_valid_after_utc - at).days == 10


def test_generate_ca_rejects_an_unknown_key_type() -> None:
    with pytest.raises(ValueError, match="key_type"):
        generate_ca("c", key_type="dsa-1024")  # type: ignore[arg-type]


@dataclass(frozen=True)
class LeafCase:
    server: bool
    client: bool
    ekus: frozenset[x509.ObjectIdentifier]


@pytest.mark.parametrize(
    "case",
    [
        LeafCase(True, False, frozenset({ExtendedKeyUsageOID.SERVER_AUTH})),
        LeafCase(False, True, frozenset({ExtendedKeyUsageOID.CLIENT_AUTH})),
        LeafCase(
            True,
            True,
            frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
        ),
    ],
    ids=[
        "a server certificate has only the serverAuth usage",
        "a client certificate has only the clientAuth usage",
        "a dual-use certificate has both usages",
    ],
)
def test_issue_cert_sets_usages_and_names(case: LeafCase) -> None:
    ca = generate_ca("ca")
    leaf = issue_cert(
        ca,
        common_name="svc",
        dns_names=["svc.local", "localhost"],
        ip_addresses=["127.0.0.1", "::1"],
        server=case.server,
        client=case.client,
    )
    leaf.cert.verify_directly_issued_by(ca.cert)
    eku = leaf.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert frozenset(eku) == case.ekus
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["svc.local", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    bc = leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False


def test_issue_cert_refuses_a_certificate_with_no_usage() -> None:
    with pytest.raises(ValueError, match="server=True or client=True"):
        issue_cert(generate_ca("ca"), common_name="x", server=False, client=False)


def test_openssl_accepts_an_issued_chain(tmp_path: Path) -> None:
    ca = generate_ca("ca", key_type="rsa-2048")
    leaf = issue_cert(ca, common_name="svc", dns_names=["svc.local"], key_type="rsa-2048")
    ca_file, _ = write_pem_files(ca, tmp_path, "ca")
    leaf_file, _ = write_pem_files(leaf, tmp_path, "leaf")
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), "-purpose", "sslserver", str(leaf_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")


def test_write_pem_files_keeps_the_key_private_and_round_trips(tmp_path: Path) -> None:
    ca = generate_ca("ca")
    cert_path, key_path = write_pem_files(ca, tmp_path / "sub", "my-ca")
    assert cert_path.name == "my-ca.pem"
    assert key_path.name == "my-ca-key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    loaded = load_ca(cert_path, key_path)
    assert loaded.cert == ca.cert
    assert spki_pin(loaded.cert) == spki_pin(ca.cert)
    # No temporary files are left behind.
    assert sorted(p.name for p in cert_path.parent.iterdir()) == ["my-ca-key.pem", "my-ca.pem"]


def test_write_pem_files_tightens_an_existing_world_readable_key(tmp_path: Path) -> None:
    key_path = tmp_path / "k-key.pem"
    key_path.write_text("old")
    key_path.chmod(0o644)
    write_pem_files(generate_ca("ca"), tmp_path, "k")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_load_ca_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    a = generate_ca("a")
    b = generate_ca("b")
    cert_path, _ = write_pem_files(a, tmp_path, "a")
    _, other_key = write_pem_files(b, tmp_path, "b")
    with pytest.raises(ValueError, match="does not match"):
        load_ca(cert_path, other_key)


def test_spki_pin_is_sha256_of_the_spki_as_openssl_computes_it(tmp_path: Path) -> None:
    ca = generate_ca("ca")
    cert_path, _ = write_pem_files(ca, tmp_path, "ca")
    pubkey = subprocess.run(
        ["openssl", "x509", "-in", str(cert_path), "-pubkey", "-noout"],
        capture_output=True,
        check=True,
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        input=pubkey,
        capture_output=True,
        check=True,
    ).stdout
    pin = spki_pin(ca.cert)
    assert pin == "sha256:" + hashlib.sha256(der).hexdigest()
    assert len(pin) == len("sha256:") + 64
    assert spki_pin(generate_ca("other").cert) != pin


def test_server_context_policy(tmp_path: Path) -> None:
    ca = generate_ca("ca")
    cert, key = write_pem_files(issue_cert(ca, common_name="s"), tmp_path, "s")
    ca_file, _ = write_pem_files(ca, tmp_path, "ca")
    plain = server_ssl_context(cert, key)
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2
    assert plain.options & ssl.OP_NO_TICKET
    assert plain.verify_mode == ssl.CERT_NONE
    ciphers = {c["name"] for c in plain.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert ciphers, "no TLS 1.2 suites left"
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers)
    mtls = server_ssl_context(cert, key, client_ca_file=ca_file, require_client_cert=True)
    assert mtls.verify_mode == ssl.CERT_REQUIRED
    optional = server_ssl_context(cert, key, client_ca_file=ca_file)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    with pytest.raises(ValueError, match="client_ca_file"):
        server_ssl_context(cert, key, require_client_cert=True)


def test_a_server_handshake_issues_no_session_ticket(tmp_path: Path) -> None:
    # TLS 1.3 with OP_NO_TICKET alone still sends two stateful tickets per handshake
    # (work and cache entries for sessions no client of ours resumes).
    ca = generate_ca("ca")
    cert, key = write_pem_files(
        issue_cert(ca, common_name="s", ip_addresses=["127.0.0.1"]), tmp_path, "s"
    )
    ca_file, _ = write_pem_files(ca, tmp_path, "ca")
    server_ctx = server_ssl_context(cert, key)
    assert server_ctx.num_tickets == 0
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ssl_context(ca_file).wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(4):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())
    server.write(b"ok")  # the client reads past any post-handshake message
    c_in.write(s_out.read())
    assert client.read() == b"ok"
    assert client.version() == "TLSv1.3"
    assert client.session is not None and client.session.has_ticket is False


def test_client_context_verifies_by_default(tmp_path: Path) -> None:
    ca_file, _ = write_pem_files(generate_ca("ca"), tmp_path, "ca")
    for ctx in (client_ssl_context(ca_file), client_ssl_context()):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is True
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError, match="go together"):
        client_ssl_context(ca_file, cert_file=ca_file)


# --- real handshakes on loopback -------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: CaMaterial
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    rsa_server_cert: Path
    rsa_server_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = generate_ca("ca")
    rogue = generate_ca("rogue")
    ca_file, _ = write_pem_files(ca, d, "ca")
    sc, sk = write_pem_files(
        issue_cert(ca, common_name="s", dns_names=["localhost"], ip_addresses=["127.0.0.1"]),
        d,
        "server",
    )
    rc, rk = write_pem_files(
        issue_cert(ca, common_name="r", dns_names=["localhost"], key_type="rsa-2048"),
        d,
        "rsa-server",
    )
    cc, ck = write_pem_files(
        issue_cert(ca, common_name="gw", server=False, client=True), d, "client"
    )
    xc, xk = write_pem_files(
        issue_cert(rogue, common_name="gw", server=False, client=True), d, "rogue"
    )
    return Pki(d, ca, ca_file, sc, sk, cc, ck, xc, xk, rc, rk)


async def _echo_ok(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bool:
    """True if a TLS connection carries one round trip (TLS 1.3 reports a refused client
    certificate only after the client's handshake has finished, hence the round trip)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(4)
            writer.write(data)
            await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"),
            5,
        )
        writer.write(b"ping")
        await writer.drain()
        got = await asyncio.wait_for(reader.read(4), 5)
        writer.close()
        return got == b"ping"
    except (ssl.SSLError, ConnectionError):
        return False
    finally:
        server.close()
        await server.wait_closed()


@dataclass(frozen=True)
class HandshakeCase:
    require_client_cert: bool
    client: str  # "none", "good", "rogue"
    rsa_server: bool
    client_tweak: str  # "", "tls11", "rsa-kex", "wrong-ca"
    ok: bool


HANDSHAKES = [
    (
        "a client trusting the CA completes a handshake",
        HandshakeCase(False, "none", False, "", True),
    ),
    (
        "mTLS with a client certificate from the CA succeeds",
        HandshakeCase(True, "good", False, "", True),
    ),
    ("mTLS refuses a client without a certificate", HandshakeCase(True, "none", False, "", False)),
    (
        "mTLS refuses a client certificate from another CA",
        HandshakeCase(True, "rogue", False, "", False),
    ),
    (
        "a client that trusts another CA refuses the server",
        HandshakeCase(False, "none", False, "wrong-ca", False),
    ),
    ("a TLS 1.1 client is refused", HandshakeCase(False, "none", False, "tls11", False)),
    (
        "an RSA-certificate server completes an ECDHE handshake",
        HandshakeCase(False, "none", True, "", True),
    ),
    ("static RSA key exchange is refused", HandshakeCase(False, "none", True, "rsa-kex", False)),
]


@pytest.mark.parametrize("case", [c for _, c in HANDSHAKES], ids=[i for i, _ in HANDSHAKES])
async def test_handshakes(pki: Pki, case: HandshakeCase, tmp_path: Path) -> None:
    cert, key = (
        (pki.rsa_server_cert, pki.rsa_server_key)
        if case.rsa_server
        else (pki.server_cert, pki.server_key)
    )
    server_ctx = server_ssl_context(
        cert,
        key,
        client_ca_file=pki.ca_file if case.require_client_cert else None,
        require_client_cert=case.require_client_cert,
    )
    ca_file = pki.ca_file
    if case.client_tweak == "wrong-ca":
        ca_file, _ = write_pem_files(generate_ca("elsewhere"), tmp_path, "elsewhere")
    pair = {
        "none": (None, None),
        "good": (pki.client_cert, pki.client_key),
        "rogue": (pki.rogue_client_cert, pki.rogue_client_key),
    }[case.client]
    client_ctx = client_ssl_context(ca_file, cert_file=pair[0], key_file=pair[1])
    if case.client_tweak == "tls11":
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: exactly what we test
            warnings.simplefilter("ignore", DeprecationWarning)
            client_ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            client_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        client_ctx.set_ciphers("ALL:@SECLEVEL=0")
    if case.client_tweak == "rsa-kex":
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        client_ctx.set_ciphers("AES128-GCM-SHA256:AES256-GCM-SHA384")
    assert await _echo_ok(server_ctx, client_ctx) is case.ok


def test_private_keys_are_pkcs8_pem(pki: Pki) -> None:
    pem = pki.server_key.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)


@pytest.mark.parametrize(
    "as_bytes",
    [False, True],
    ids=["PEM text as trust data is accepted", "PEM bytes as trust data are accepted"],
)
async def test_client_context_trusts_inline_pem(pki: Pki, as_bytes: bool) -> None:
    pem = pki.ca_file.read_bytes()
    client_ctx = client_ssl_context(cafile_data=pem if as_bytes else pem.decode())
    server_ctx = server_ssl_context(pki.server_cert, pki.server_key)
    assert await _echo_ok(server_ctx, client_ctx) is True
