"""TLS hygiene of the running gateway (DESIGN §6): TLS 1.2+ only, ECDHE+AEAD for 1.2, an
ECDSA P-256 certificate, no session tickets.

Each refusal has a control: the same client handshakes with a deliberately permissive
local server holding the gateway's own certificate, so the refusal provably comes from
the gateway's policy and not from this client's OpenSSL (security level, disabled
protocols) refusing to try.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.core.tlsutil import issue_cert, load_ca, server_ssl_context, write_pem_files
from tests.security.harness import Harness

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Handshake:
    version: str
    cipher: str
    peer_der: bytes
    has_ticket: bool


def _blocking_handshake(port: int, ctx: ssl.SSLContext) -> Handshake:
    # A blocking socket on a thread, not asyncio: asyncio's SSL transport reports a
    # server's alert as a bare ConnectionResetError, and the alert is what proves who
    # refused. (The gateway runs on the test's event loop, hence the thread.)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cipher = tls.cipher()
        session = tls.session  # TLS 1.2 tickets arrive within the handshake
        return Handshake(
            version=str(tls.version()),
            cipher=cipher[0] if cipher else "",
            peer_der=tls.getpeercert(binary_form=True) or b"",
            has_ticket=bool(session and session.has_ticket),
        )


async def _handshake(port: int, ctx: ssl.SSLContext) -> Handshake:
    return await asyncio.to_thread(_blocking_handshake, port, ctx)


def _client(
    h: Harness,
    *,
    minimum: ssl.TLSVersion = ssl.TLSVersion.MINIMUM_SUPPORTED,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A client that trusts the stack's CA and, at security level 0, is willing to offer
    old protocols and weak suites: whatever it is refused, the server refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(h.stack.gateway_ca_file))
    ctx.minimum_version = minimum
    ctx.maximum_version = maximum
    ctx.set_ciphers(ciphers or _EVERYTHING)
    return ctx


def _gateway_files(h: Harness) -> tuple[str, str]:
    tls = h.stack.config.tls
    return str(h.stack.config.path(tls.cert_file)), str(h.stack.config.path(tls.key_file))


_EVERYTHING = "ALL:eNULL:@SECLEVEL=0"


def _rsa_files(h: Harness, directory: Path) -> tuple[str, str]:
    """An RSA leaf from the stack's own CA (static-RSA suites need an RSA certificate)."""
    gw = Path(h.stack.gateway_ca_file).parent
    ca = load_ca(gw / "gateway-ca.pem", gw / "gateway-ca-key.pem")
    leaf = issue_cert(ca, common_name="127.0.0.1", ip_addresses=("127.0.0.1",), key_type="rsa-2048")
    cert, key = write_pem_files(leaf, directory, "control-rsa")
    return str(cert), str(key)


@asynccontextmanager
async def _permissive_server(
    h: Harness, *, tickets: bool = False, rsa_dir: Path | None = None
) -> AsyncIterator[int]:
    """The gateway's certificate (or an RSA one from the same CA, with ``rsa_dir``) behind
    a server that accepts anything OpenSSL can do."""
    cert, key = _rsa_files(h, rsa_dir) if rsa_dir else _gateway_files(h)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers(_EVERYTHING)
    if tickets:
        ctx = server_ssl_context(cert, key)
        ctx.options &= ~ssl.OP_NO_TICKET  # what tls.session_tickets: true does

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _gateway_port(h: Harness) -> int:
    return h.stack.gateway.listeners[0].port


REFUSED = [
    pytest.param(
        {"maximum": ssl.TLSVersion.TLSv1}, "TLSV1_ALERT_PROTOCOL_VERSION", id="a TLS 1.0 client"
    ),
    pytest.param(
        {"minimum": ssl.TLSVersion.TLSv1_1, "maximum": ssl.TLSVersion.TLSv1_1},
        "TLSV1_ALERT_PROTOCOL_VERSION",
        id="a TLS 1.1 client",
    ),
    pytest.param(
        {"maximum": ssl.TLSVersion.TLSv1_2, "ciphers": "AES128-SHA:@SECLEVEL=0"},
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        id="a TLS 1.2 client offering only static-RSA AES128-SHA",
    ),
    pytest.param(
        {"maximum": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"},
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        id="a TLS 1.2 client offering only ECDHE with CBC-SHA1",
    ),
    pytest.param(
        {"maximum": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-ECDSA-AES256-SHA384:@SECLEVEL=0"},
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        id="a TLS 1.2 client offering only ECDHE with CBC-SHA384",
    ),
    pytest.param(
        {"maximum": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-ECDSA-NULL-SHA:@SECLEVEL=0"},
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        id="a TLS 1.2 client offering only a NULL cipher",
    ),
]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(("client", "alert"), REFUSED)
async def test_refused_by_the_gateway(
    harness: Harness, client: dict[str, object], alert: str, tmp_path: Path
) -> None:
    ctx = _client(harness, **client)  # type: ignore[arg-type]
    # Control: this client can complete the handshake when the server allows it.
    static_rsa = str(client.get("ciphers", "")).startswith("AES128-SHA:")
    async with _permissive_server(harness, rsa_dir=tmp_path if static_rsa else None) as port:
        await _handshake(port, ctx)
    with pytest.raises(ssl.SSLError) as info:
        await _handshake(_gateway_port(harness), ctx)
    # The server refused: its alert, or (asyncio's server-side SSL drops the alert and just
    # closes) an EOF mid-handshake. A client-side refusal would be NO_PROTOCOLS_AVAILABLE
    # or NO_CIPHERS_AVAILABLE before any byte was sent, and the control above rules it out.
    assert info.value.reason in (alert, "UNEXPECTED_EOF_WHILE_READING")
    await harness.assert_alive()


ACCEPTED = [
    pytest.param(ssl.TLSVersion.TLSv1_2, "TLSv1.2", id="a TLS 1.2 client"),
    pytest.param(ssl.TLSVersion.TLSv1_3, "TLSv1.3", id="a TLS 1.3 client"),
]


@pytest.mark.parametrize(("version", "name"), ACCEPTED)
async def test_accepted_by_the_gateway(
    harness: Harness, version: ssl.TLSVersion, name: str
) -> None:
    ctx = _client(harness, minimum=version, maximum=version)
    hs = await _handshake(_gateway_port(harness), ctx)
    assert hs.version == name
    if version == ssl.TLSVersion.TLSv1_2:
        assert hs.cipher.startswith("ECDHE-") and ("GCM" in hs.cipher or "CHACHA" in hs.cipher)


async def test_the_certificate_is_ecdsa_p256(harness: Harness) -> None:
    hs = await _handshake(_gateway_port(harness), _client(harness))
    key = x509.load_der_x509_certificate(hs.peer_der).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)


async def test_no_session_ticket_after_a_tls12_handshake(harness: Harness) -> None:
    ctx = _client(harness, maximum=ssl.TLSVersion.TLSv1_2)
    # Control: with tickets on, the same client sees one.
    async with _permissive_server(harness, tickets=True) as port:
        assert (await _handshake(port, ctx)).has_ticket
    assert not (await _handshake(_gateway_port(harness), ctx)).has_ticket


async def test_clients_offering_strong_and_weak_suites_get_a_strong_one(
    harness: Harness,
) -> None:
    """Server preference: a client listing CBC first still gets AEAD."""
    ctx = _client(
        harness,
        maximum=ssl.TLSVersion.TLSv1_2,
        ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-GCM-SHA256:@SECLEVEL=0",
    )
    hs = await _handshake(_gateway_port(harness), ctx)
    assert hs.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"
