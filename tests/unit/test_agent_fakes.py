"""Fakes for the agent's tests: an IMDS and a gateway on 127.0.0.1, doing real crypto.

The fake IMDS signs real CMS SignedData (cryptography's PKCS7 builder, no signed attributes,
leaf only, as Azure does) under a generated root → intermediate → leaf chain, and serves the
intermediate at the leaf's AIA URL. The fake gateway issues challenges and, for a join, real
X.509 and OpenSSH certificates for the public keys it was sent. Both record every request.
The few tests at the bottom check the fakes themselves, so a broken fake cannot make the
agent's tests pass vacuously.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from gateway.core.clock import Clock

__all__ = [
    "FakeGateway",
    "FakeImds",
    "Recorded",
    "SleepRecorder",
    "make_ca",
    "make_tls_server_cert",
    "serve",
    "ssh_ca_line",
]

NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(
    cn: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    aia_url: str | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate (self-signed, or issued by ``issuer``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if aia_url:
        builder = builder.add_extension(_aia(aia_url), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _aia(url: str) -> x509.AuthorityInformationAccess:
    return x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url)
            )
        ]
    )


def make_tls_server_cert(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1: server context and the CA file."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fake gateway"))
        .issuer_name(_name("fake gateway"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "gw.crt", tmp / "gw.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx, cert_path


@dataclass
class Recorded:
    """One request a fake saw."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    remote: str | None
    body: Any = None


@dataclass
class SleepRecorder:
    """An injected ``sleep`` that records the waits instead of waiting."""

    waits: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@asynccontextmanager
async def serve(
    app: web.Application, *, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Run ``app`` on ``host``:0; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if ssl_context else 'http'}://{host}:{port}"
    finally:
        await runner.cleanup()


def _record(request: web.Request, body: Any = None) -> Recorded:
    return Recorded(
        request.method,
        request.path,
        dict(request.query),
        dict(request.headers),
        request.remote,
        body,
    )


class FakeImds:
    """IMDS for one VM, plus the AIA endpoint its leaf points at.

    ``aia_path`` is where the leaf's AIA URL points on this server (``/pkiops/certs/...`` is
    the allowed look-alike, ``/elsewhere/...`` is not). ``token_statuses``/``document_statuses``
    are errors to answer first, in order.
    """

    def __init__(self, *, aia_path: str = "/pkiops/certs/fake-intermediate.crt") -> None:
        self.requests: list[Recorded] = []
        self.token_statuses: list[int] = []
        self.document_statuses: list[int] = []
        self.token_body: dict[str, Any] | None = None
        self.aia_path = aia_path
        self.root = make_ca("Fake Azure Root")
        self.base_url = ""
        self._signer_key = ec.generate_private_key(ec.SECP256R1())
        self.access_token = jwt.encode(
            {"aud": "https://management.azure.com/", "tid": "t", "nonce": secrets.token_hex(16)},
            self._signer_key,
            algorithm="ES256",
        )
        self.intermediate: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        self.leaf: x509.Certificate | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metadata/attested/document", self._document)
        app.router.add_get("/metadata/identity/oauth2/token", self._token)
        app.router.add_get("/{tail:.*}", self._other)
        return app

    @asynccontextmanager
    async def running(self, host: str = "127.0.0.1") -> AsyncIterator[FakeImds]:
        async with serve(self.app(), host=host) as url:
            self.base_url = url
            self.intermediate = make_ca("Fake Azure Intermediate", issuer=self.root)
            inter_cert, inter_key = self.intermediate
            self.leaf = (
                x509.CertificateBuilder()
                .subject_name(_name("metadata.azure.com"))
                .issuer_name(inter_cert.subject)
                .public_key(self._signer_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=1))
                .not_valid_after(NOW + dt.timedelta(days=30))
                .add_extension(
                    x509.SubjectAlternativeName([x509.DNSName("metadata.azure.com")]),
                    critical=False,
                )
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
                )
                .add_extension(_aia(url + self.aia_path), critical=False)
                .sign(inter_key, hashes.SHA256())
            )
            yield self

    @property
    def intermediate_der(self) -> bytes:
        assert self.intermediate is not None
        return self.intermediate[0].public_bytes(serialization.Encoding.DER)

    def of(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def _check(self, request: web.Request, api_version: str) -> web.Response | None:
        if request.headers.get("Metadata") != "true":
            return web.json_response(
                {
                    "error": "bad_request",
                    "error_description": "Required metadata header not specified",
                },
                status=400,
            )
        if request.query.get("api-version") != api_version:
            return web.json_response({"error": "Bad request. api-version is invalid"}, status=400)
        return None

    async def _document(self, request: web.Request) -> web.Response:
        self.requests.append(_record(request))
        if (bad := self._check(request, "2021-02-01")) is not None:
            return bad
        if self.document_statuses:
            return web.json_response({"error": "busy"}, status=self.document_statuses.pop(0))
        nonce = request.query.get("nonce", "")
        if len(nonce) > 32:
            return web.json_response({"error": "nonce too long"}, status=400)
        content = json.dumps(
            {
                "nonce": nonce,
                "vmId": "0b9c1a0e-9f3c-4bd4-9a0f-4d7b3f7f6a11",
                "subscriptionId": "11111111-1111-1111-1111-111111111111",
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        assert self.leaf is not None
        der = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(content)
            .add_signer(self.leaf, self._signer_key, hashes.SHA256())
            .sign(
                serialization.Encoding.DER,
                [pkcs7.PKCS7Options.NoAttributes, pkcs7.PKCS7Options.Binary],
            )
        )
        return web.json_response({"encoding": "pkcs7", "signature": base64.b64encode(der).decode()})

    async def _token(self, request: web.Request) -> web.Response:
        self.requests.append(_record(request))
        if (bad := self._check(request, "2018-02-01")) is not None:
            return bad
        if self.token_statuses:
            return web.json_response({"error": "throttled"}, status=self.token_statuses.pop(0))
        if self.token_body is not None:
            return web.json_response(self.token_body)
        return web.json_response(
            {
                "access_token": self.access_token,
                "expires_in": "86399",
                "resource": "https://management.azure.com/",
                "token_type": "Bearer",
                "client_id": request.query.get("client_id", "system"),
            }
        )

    async def _other(self, request: web.Request) -> web.Response:
        self.requests.append(_record(request))
        if request.path == self.aia_path and self.intermediate is not None:
            return web.Response(body=self.intermediate_der, content_type="application/pkix-cert")
        return web.Response(status=404)


@dataclass
class Scripted:
    """A canned gateway answer: HTTP status, error code, optional Retry-After, raw body."""

    status: int
    code: str | None = None
    retry_after: str | None = None
    raw: str | None = None


class FakeGateway:
    """The gateway's two endpoints. ``script`` answers joins first, in order; then it issues.

    ``issue_mode``: ``ok``; ``rogue_ca`` (a CA that is not ``ca``, listed alone);
    ``rogue_leaf`` (lists the real CA but signs with another); ``other_key`` (certifies a key
    that is not the node's); ``extra_ca`` (signs with ``ca``, lists ``rogue`` beside it);
    ``rogue_ssh_ca`` (SSH certificate by ``rogue_ssh_ca``, listed alone); ``rogue_ssh_leaf``
    (lists the real SSH CA, signs with the rogue one); ``extra_ssh_ca`` (lists the rogue SSH
    CA beside the real one); ``forged_ssh_signature`` (names the real SSH CA as signer, the
    signature bytes are wrong); ``user_ssh_cert`` (a user certificate, not a host one).
    ``cert_ttl`` (default one day around a fixed time) makes certificates that start now.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: list[Scripted] = []
        self.challenge_script: list[Scripted] = []
        self.issued: list[str] = []
        self.redeemed: set[str] = set()
        self.issue_mode = "ok"
        self.ca = make_ca("Fake Cluster Host CA")
        self.rogue = make_ca("Rogue CA")
        self.ssh_ca = ed25519.Ed25519PrivateKey.generate()
        self.rogue_ssh_ca = ed25519.Ed25519PrivateKey.generate()
        self.cert_ttl: dt.timedelta | None = None
        self.clock: Clock | None = None  # with cert_ttl: what "now" is (default: real time)
        self.hang: Callable[[web.Request], Awaitable[None]] | None = None  # awaited per join
        self.base_url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/join/azure/challenge", self._challenge)
        app.router.add_post("/v1/join/azure", self._join)
        return app

    @asynccontextmanager
    async def running(
        self, *, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
    ) -> AsyncIterator[FakeGateway]:
        async with serve(self.app(), host=host, ssl_context=ssl_context) as url:
            self.base_url = url
            yield self

    @property
    def joins(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/v1/join/azure"]

    @property
    def ca_pin(self) -> str:
        import hashlib

        spki = (
            self.ca[0]
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return "sha256:" + hashlib.sha256(spki).hexdigest()

    @staticmethod
    def _answer(s: Scripted) -> web.Response:
        headers = {"Retry-After": s.retry_after} if s.retry_after is not None else {}
        if s.raw is not None:
            return web.Response(
                status=s.status, text=s.raw, content_type="text/html", headers=headers
            )
        return web.json_response(
            {"error": {"code": s.code, "message": "scripted"}}, status=s.status, headers=headers
        )

    async def _challenge(self, request: web.Request) -> web.Response:
        self.requests.append(_record(request, await request.json()))
        if self.challenge_script:
            return self._answer(self.challenge_script.pop(0))
        challenge = secrets.token_urlsafe(24)
        self.issued.append(challenge)
        return web.json_response(
            {"challenge": challenge, "expires_at": (NOW + dt.timedelta(minutes=1)).isoformat()}
        )

    async def _join(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(_record(request, body))
        if self.hang is not None:
            await self.hang(request)
        if self.script:
            return self._answer(self.script.pop(0))
        if body["challenge"] not in self.issued:
            return self._answer(Scripted(403, "challenge_invalid"))
        if body["challenge"] in self.redeemed:
            return self._answer(Scripted(403, "challenge_reused"))
        self.redeemed.add(body["challenge"])
        return web.json_response(self._certs(body["host"]))

    def _certs(self, host: dict[str, Any]) -> dict[str, Any]:
        # As the gateway does: a join that asks for no name is named after the VM.
        host = {"node_name": "vm-azure-name", **host}
        tls_pub = serialization.load_pem_public_key(host["public_tls_key"].encode())
        ssh_pub = serialization.load_ssh_public_key(host["public_ssh_key"].encode())
        if self.issue_mode == "other_key":
            tls_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
        ca_cert = self.ca[0]
        signer_cert, signer_key = (
            self.rogue if self.issue_mode in ("rogue_ca", "rogue_leaf") else self.ca
        )
        listed = [self.rogue[0]] if self.issue_mode == "rogue_ca" else [ca_cert]
        if self.issue_mode == "extra_ca":
            listed.append(self.rogue[0])
        start, end = NOW - dt.timedelta(minutes=1), NOW + dt.timedelta(days=1)
        if self.cert_ttl is not None:
            now = (self.clock.now() if self.clock else dt.datetime.now(dt.UTC)).replace(
                microsecond=0
            )
            start, end = now - dt.timedelta(minutes=5), now + self.cert_ttl
        assert isinstance(tls_pub, ec.EllipticCurvePublicKey)
        tls = (
            x509.CertificateBuilder()
            .subject_name(_name(host["node_name"]))
            .issuer_name(signer_cert.subject)
            .public_key(tls_pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .sign(signer_key, hashes.SHA256())
        )
        assert isinstance(ssh_pub, ed25519.Ed25519PublicKey)
        mode = self.issue_mode
        ssh_signer = (
            self.rogue_ssh_ca if mode in ("rogue_ssh_ca", "rogue_ssh_leaf") else self.ssh_ca
        )
        ssh_listed = [self.rogue_ssh_ca] if mode == "rogue_ssh_ca" else [self.ssh_ca]
        if mode == "extra_ssh_ca":
            ssh_listed.append(self.rogue_ssh_ca)
        kind = serialization.SSHCertificateType
        ssh_line = (
            serialization.SSHCertificateBuilder()
            .public_key(ssh_pub)
            .serial(secrets.randbits(64))
            .type(kind.USER if mode == "user_ssh_cert" else kind.HOST)
            .key_id(b"host")
            .valid_principals([host["node_name"].encode()])
            .valid_after(int(start.timestamp()))
            .valid_before(int(end.timestamp()))
            .sign(ssh_signer)
            .public_bytes()
            .decode()
        )
        if mode == "forged_ssh_signature":
            ssh_line = _flip_last_signature_byte(ssh_line)
        host_id = f"host-{len(self.redeemed)}-{secrets.token_hex(4)}"
        return {
            "host_id": host_id,
            "certs": {
                "ssh": ssh_line,
                "tls": tls.public_bytes(serialization.Encoding.PEM).decode(),
                "tls_ca_certs": [
                    c.public_bytes(serialization.Encoding.PEM).decode() for c in listed
                ],
                "ssh_ca_keys": [ssh_ca_line(k) for k in ssh_listed],
            },
            "join": {
                "method": "azure",
                "tenant": "44444444-4444-4444-4444-444444444444",
                "subscription": "11111111-1111-1111-1111-111111111111",
                "resource_group": "group1",
                "vm_id": "0b9c1a0e-9f3c-4bd4-9a0f-4d7b3f7f6a11",
                "resource_id": "/subscriptions/1111/resourceGroups/group1/providers/"
                "Microsoft.Compute/virtualMachines/web-1",
            },
        }


def ssh_ca_line(key: ed25519.Ed25519PrivateKey) -> str:
    """The ``ssh-ed25519 AAAA...`` line of an SSH CA key."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _flip_last_signature_byte(line: str) -> str:
    """The certificate with one bit of its CA signature flipped (the blob ends in it)."""
    kind, b64 = line.split()[:2]
    blob = bytearray(base64.b64decode(b64))
    blob[-1] ^= 0x01
    return f"{kind} {base64.b64encode(bytes(blob)).decode()}"


# -- the fakes' own checks -------------------------------------------------------------------


async def test_fake_imds_refuses_a_request_without_the_metadata_header() -> None:
    imds = FakeImds()
    async with imds.running(), aiohttp.ClientSession() as s:
        url = imds.base_url + "/metadata/identity/oauth2/token?api-version=2018-02-01"
        async with s.get(url) as resp:
            assert resp.status == 400
        async with s.get(url, headers={"Metadata": "true"}) as resp:
            assert resp.status == 200


async def test_fake_gateway_refuses_a_challenge_it_did_not_issue() -> None:
    gw = FakeGateway()
    async with (
        gw.running(),
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/v1/join/azure", json={"challenge": "x" * 32}) as resp,
    ):
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "challenge_invalid"
