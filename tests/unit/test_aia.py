"""AiaFetcher against a local server: formats, cache, single flight, and the SSRF rules.

The server records every path it is asked for (``requested``), so "refused without a
request" and "one request for N callers" are checked where the requests land.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from gateway.azure.aia import DEFAULT_AIA_PREFIXES, AiaFetcher
from gateway.azure.attested import AttestedVerifier
from gateway.azure.certs import TrustStore
from gateway.core.cache import MemoryCache
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS
from gateway.core.errors import Code, JoinRejected, Overloaded
from tests.support.cms_forge import (
    T0,
    Pki,
    forge,
    issue_ca,
    issue_leaf,
    make_pki,
    with_x509_version,
)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@dataclass
class AiaServer:
    base: str
    port: int
    requested: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"{self.base}/pkiops/certs/"


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[AiaServer]:
    state = AiaServer(base="", port=0)
    inter = pki.intermediate

    async def handle(request: web.Request) -> web.StreamResponse:
        state.requested.append(request.path)
        name = request.match_info["name"]
        if name == "inter.crt":
            return web.Response(body=inter.der)
        if name == "inter.pem":
            return web.Response(body=inter.pem)
        if name == "inter.p7c":
            return web.Response(body=pkcs7.serialize_certificates([inter.cert], Encoding.DER))
        if name == "slow.crt":
            await asyncio.sleep(0.2)
            return web.Response(body=inter.der)
        if name == "hang.crt":
            await asyncio.sleep(2)
            return web.Response(body=inter.der)
        if name == "big.crt":
            return web.Response(body=b"\x30" * (200 * 1024))
        if name == "big-chunked.crt":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(20):
                await resp.write(b"\x30" * 8192)
            await resp.write_eof()
            return resp
        if name == "junk.crt":
            return web.Response(body=b"not a certificate")
        if name == "v5.crt":
            return web.Response(body=with_x509_version(inter.der, 4))
        if name == "redirect-off":
            raise web.HTTPFound(f"{state.base}/elsewhere/inter.crt")
        if name == "redirect-on":
            raise web.HTTPFound("/pkiops/certs/inter.crt")
        if name == "redirect-loop":
            raise web.HTTPFound("/pkiops/certs/redirect-loop")
        if name == "down.crt":
            return web.Response(status=503)
        return web.Response(status=404)

    async def elsewhere(request: web.Request) -> web.Response:
        state.requested.append(request.path)
        return web.Response(body=inter.der)

    app = web.Application()
    app.router.add_get("/pkiops/certs/{name}", handle)
    app.router.add_get("/elsewhere/{name}", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.port = port
    state.base = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _fetcher(session: aiohttp.ClientSession, server: AiaServer, **kw: object) -> AiaFetcher:
    opts: dict[str, object] = {"allowed_prefixes": [server.prefix], "allow_private": True}
    opts.update(kw)
    return AiaFetcher(session, clock=FixedClock(T0), **opts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["inter.crt", "inter.pem", "inter.p7c"],
    ids=["a DER certificate is read", "a PEM certificate is read", "PKCS#7 certs-only is read"],
)
async def test_formats(
    pki: Pki, server: AiaServer, session: aiohttp.ClientSession, name: str
) -> None:
    certs = await _fetcher(session, server).fetch(server.prefix + name)
    assert [c.serial_number for c in certs] == [pki.intermediate.cert.serial_number]
    assert server.requested == [f"/pkiops/certs/{name}"]


async def test_cache_hit_makes_no_second_request(
    server: AiaServer, session: aiohttp.ClientSession
) -> None:
    fetcher = _fetcher(session, server)
    first = await fetcher.fetch(server.prefix + "inter.crt")
    second = await fetcher.fetch(server.prefix + "inter.crt")
    assert first == second and len(first) == 1
    assert server.requested == ["/pkiops/certs/inter.crt"]


async def test_concurrent_misses_make_one_request(
    server: AiaServer, session: aiohttp.ClientSession
) -> None:
    fetcher = _fetcher(session, server)
    results = await asyncio.gather(*(fetcher.fetch(server.prefix + "slow.crt") for _ in range(20)))
    assert all(len(r) == 1 for r in results)
    assert server.requested == ["/pkiops/certs/slow.crt"]


REFUSED_BY_RESPONSE = [
    ("an oversized body (Content-Length) is refused", "big.crt", ["/pkiops/certs/big.crt"]),
    (
        "an oversized streamed body is refused",
        "big-chunked.crt",
        ["/pkiops/certs/big-chunked.crt"],
    ),
    ("a body that is not a certificate is refused", "junk.crt", ["/pkiops/certs/junk.crt"]),
    ("a 404 is refused", "missing.crt", ["/pkiops/certs/missing.crt"]),
    (
        "a redirect off the allowed prefixes is not followed",
        "redirect-off",
        ["/pkiops/certs/redirect-off"],
    ),
    (
        "redirects are followed at most twice",
        "redirect-loop",
        ["/pkiops/certs/redirect-loop"] * 3,
    ),
]


@pytest.mark.parametrize(
    ("name", "requested"),
    [(n, r) for _, n, r in REFUSED_BY_RESPONSE],
    ids=[i for i, _, _ in REFUSED_BY_RESPONSE],
)
async def test_refused_responses_yield_nothing(
    server: AiaServer, session: aiohttp.ClientSession, name: str, requested: list[str]
) -> None:
    fetcher = _fetcher(session, server, max_bytes=64 * 1024)
    assert await fetcher.fetch(server.prefix + name) == []
    assert server.requested == requested
    # negative-cached: asking again costs nothing
    assert await fetcher.fetch(server.prefix + name) == []
    assert server.requested == requested


async def test_refusals_cannot_evict_the_certificates_real_leaves_need(
    server: AiaServer, session: aiohttp.ClientSession
) -> None:
    """Issue 8: each hostile request may name a new URL under an allowed prefix. Refusals
    live in their own bounded cache: a flood of them leaves the good entry in place."""
    fetcher = _fetcher(session, server, cache=MemoryCache("aia", max_entries=4))
    assert len(await fetcher.fetch(server.prefix + "inter.crt")) == 1
    for i in range(40):
        assert await fetcher.fetch(server.prefix + f"missing-{i}.crt") == []
    assert len(await fetcher.fetch(server.prefix + "inter.crt")) == 1
    assert server.requested.count("/pkiops/certs/inter.crt") == 1
    assert len(server.requested) == 41


async def test_a_redirect_within_the_prefixes_is_followed(
    server: AiaServer, session: aiohttp.ClientSession
) -> None:
    certs = await _fetcher(session, server).fetch(server.prefix + "redirect-on")
    assert len(certs) == 1
    assert server.requested == ["/pkiops/certs/redirect-on", "/pkiops/certs/inter.crt"]


def _off_list(server: AiaServer) -> list[tuple[str, str]]:
    b = server.base
    return [
        ("a path outside the prefix", f"{b}/elsewhere/inter.crt"),
        ("userinfo in the URL", f"http://user:pw@127.0.0.1:{server.port}/pkiops/certs/inter.crt"),
        ("another port", f"http://127.0.0.1:{server.port + 1}/pkiops/certs/inter.crt"),
        ("dot-dot segments", f"{b}/pkiops/certs/../../elsewhere/inter.crt"),
        ("encoded dot-dot segments", f"{b}/pkiops/certs/%2e%2e/%2e%2e/elsewhere/inter.crt"),
        ("a query string", f"{b}/pkiops/certs/inter.crt?x=1"),
        ("another scheme", f"https://127.0.0.1:{server.port}/pkiops/certs/inter.crt"),
        ("another host spelling", f"http://localhost:{server.port}/pkiops/certs/inter.crt"),
    ]


OFF_LIST_IDS = [
    "a path outside the prefix is refused without a request",
    "userinfo is refused without a request",
    "another port is refused without a request",
    "dot-dot segments are refused without a request",
    "encoded dot-dot segments are refused without a request",
    "a query string is refused without a request",
    "another scheme is refused without a request",
    "another host spelling is refused without a request",
]


@pytest.mark.parametrize("index", range(len(OFF_LIST_IDS)), ids=OFF_LIST_IDS)
async def test_off_list_urls_make_no_request(
    server: AiaServer, session: aiohttp.ClientSession, index: int
) -> None:
    _, url = _off_list(server)[index]
    assert await _fetcher(session, server).fetch(url) == []
    assert server.requested == []


async def test_loopback_destination_refused_unless_private_allowed(
    server: AiaServer, session: aiohttp.ClientSession
) -> None:
    fetcher = _fetcher(session, server, allow_private=False)
    assert await fetcher.fetch(server.prefix + "inter.crt") == []
    assert server.requested == []


@pytest.mark.parametrize(
    "prefix",
    [
        "http://169.254.169.254/pkiops/certs/",
        "http://[::ffff:127.0.0.1]:9/pkiops/certs/",
        "http://10.0.0.1/pkiops/certs/",
        "http://[::1]:9/pkiops/certs/",
    ],
    ids=[
        "the link-local IMDS address is refused",
        "an IPv4-mapped loopback address is refused",
        "a private RFC 1918 address is refused",
        "IPv6 loopback is refused",
    ],
)
async def test_non_public_destinations_are_refused(
    session: aiohttp.ClientSession, prefix: str
) -> None:
    # Even when an operator's prefix names them: the destination rule is separate.
    fetcher = AiaFetcher(session, allowed_prefixes=[prefix], clock=FixedClock(T0), timeout=0.5)
    assert fetcher.allowed(prefix + "x.crt")
    assert await fetcher.fetch(prefix + "x.crt") == []


async def test_server_errors_are_a_retryable_dependency_failure(
    server: AiaServer, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(Overloaded) as info:
        await _fetcher(session, server).fetch(server.prefix + "down.crt")
    assert info.value.code == Code.DEPENDENCY_UNAVAILABLE


async def test_a_hanging_server_hits_the_timeout(
    server: AiaServer, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(Overloaded) as info:
        await _fetcher(session, server, timeout=0.2).fetch(server.prefix + "hang.crt")
    assert info.value.code == Code.DEPENDENCY_UNAVAILABLE


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        (
            "http://www.microsoft.com/pkiops/certs/Microsoft%20Azure%20RSA%20TLS%20Issuing%20CA%2007%20-%20xsign.crt",
            True,
        ),
        ("https://caissuers.microsoft.com/pkiops/certs/Microsoft%20TLS%20G2.crt", True),
        ("http://cacerts.digicert.com/DigiCertGlobalRootG2.crt", True),
        ("http://www.microsoft.com/pki/mscorp/Microsoft%20IT%20TLS%20CA%204.crt", False),
        ("http://www.microsoft.com.evil.example/pkiops/certs/x.crt", False),
        ("http://www.microsoft.com:8080/pkiops/certs/x.crt", False),
        ("http://evil@www.microsoft.com/pkiops/certs/x.crt", False),
        ("http://www.microsoft.com/pkiops/certsx/x.crt", False),
        ("file:///etc/passwd", False),
        ("http://169.254.169.254/metadata/instance", False),
    ],
    ids=[
        "Azure's current AIA URL is allowed",
        "caissuers.microsoft.com over https is allowed",
        "DigiCert's AIA host is allowed",
        "the old mscorp path is not under the prefixes",
        "a look-alike host is refused",
        "an odd port is refused",
        "userinfo is refused",
        "a path that only shares the prefix's text is refused",
        "a file URL is refused",
        "IMDS itself is refused",
    ],
)
def test_default_prefix_policy(session_free_fetcher: AiaFetcher, url: str, ok: bool) -> None:
    assert session_free_fetcher.allowed(url) is ok


@pytest.fixture
async def session_free_fetcher(session: aiohttp.ClientSession) -> AiaFetcher:
    return AiaFetcher(session, allowed_prefixes=DEFAULT_AIA_PREFIXES, clock=FixedClock(T0))


async def test_verifier_fetches_a_missing_intermediate_over_aia(
    pki: Pki, server: AiaServer, session: aiohttp.ClientSession
) -> None:
    leaf = issue_leaf(pki.intermediate, aia_urls=[server.prefix + "inter.crt"])
    clock = FixedClock(T0 + timedelta(hours=1))
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=TrustStore.from_certificates([pki.root.cert]),  # intermediate unknown
        aia=_fetcher(session, server),
        chain_cache=MemoryCache("chains", clock=clock),
        clock=clock,
    )
    sig = forge(leaf)
    doc = await verifier.verify(sig, expected_nonce="nonce-0123456789")
    assert len(doc.chain_subjects) == 3
    await verifier.verify(sig, expected_nonce="nonce-0123456789")
    assert server.requested == ["/pkiops/certs/inter.crt"]
    assert verifier.chain_builds == 1


async def test_verifier_fails_closed_when_aia_is_refused(
    pki: Pki, server: AiaServer, session: aiohttp.ClientSession
) -> None:
    leaf = issue_leaf(pki.intermediate, aia_urls=[f"{server.base}/elsewhere/inter.crt"])
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=TrustStore.from_certificates([pki.root.cert]),
        aia=_fetcher(session, server),
        chain_cache=None,
        clock=FixedClock(T0 + timedelta(hours=1)),
    )
    with pytest.raises(JoinRejected) as info:
        await verifier.verify(forge(leaf), expected_nonce="nonce-0123456789")
    assert info.value.code == Code.ATTESTED_CHAIN_UNTRUSTED
    assert server.requested == []


def _offline_verifier(
    pki: Pki, trust: list[x509.Certificate], aia: AiaFetcher, **kw: object
) -> AttestedVerifier:
    return AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=TrustStore.from_certificates(trust),
        aia=aia,
        chain_cache=None,
        clock=FixedClock(T0 + timedelta(hours=1)),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("urls", "fetched"),
    [
        ([f"missing-{i}.crt" for i in range(300)], ["missing-0.crt"]),
        (["/elsewhere/a.crt", *(f"missing-{i}.crt" for i in range(299))], ["missing-0.crt"]),
        (["inter.crt", "inter.pem", "inter.p7c"], ["inter.crt"]),
    ],
    ids=[
        "a leaf with 300 caIssuers URLs costs one fetch",
        "the first *allowed* URL is the one fetched, and only it",
        "Azure's two URLs for one file cost one fetch",
    ],
)
async def test_one_aia_fetch_per_request(
    pki: Pki,
    server: AiaServer,
    session: aiohttp.ClientSession,
    urls: list[str],
    fetched: list[str],
) -> None:
    full = [u if u.startswith("/") else server.prefix + u for u in urls]
    full = [server.base + u if u.startswith("/") else u for u in full]
    leaf = issue_leaf(pki.intermediate, aia_urls=full)
    verifier = _offline_verifier(pki, [pki.root.cert], _fetcher(session, server))
    try:
        await verifier.verify(forge(leaf), expected_nonce="nonce-0123456789")
    except JoinRejected as exc:
        assert exc.code == Code.ATTESTED_CHAIN_UNTRUSTED
    assert server.requested == ["/pkiops/certs/" + f for f in fetched]
    assert verifier.aia_fetches == 1
    assert verifier.path_builder_calls <= 2


async def test_no_aia_fetch_when_the_leafs_issuer_is_already_known(
    pki: Pki, server: AiaServer, session: aiohttp.ClientSession
) -> None:
    """The issuer is in the trust store, yet the chain fails (the leaf expired): fetching
    the issuer again could not help, so nothing is fetched."""
    leaf = issue_leaf(
        pki.intermediate,
        aia_urls=[server.prefix + "inter.crt"],
        not_before=T0 - timedelta(days=400),
        days=30,
    )
    verifier = _offline_verifier(
        pki, [pki.root.cert, pki.intermediate.cert], _fetcher(session, server)
    )
    with pytest.raises(JoinRejected) as info:
        await verifier.verify(forge(leaf), expected_nonce="nonce-0123456789")
    assert info.value.code == Code.ATTESTED_CHAIN_UNTRUSTED
    assert (server.requested, verifier.aia_fetches, verifier.path_builder_calls) == ([], 0, 1)


@pytest.mark.parametrize(
    "name",
    ["v5.crt", "junk.crt"],
    ids=["an AIA answer claiming X.509 v5 is no certificate", "junk is no certificate"],
)
async def test_unreadable_aia_answers_fail_closed(
    pki: Pki, server: AiaServer, session: aiohttp.ClientSession, name: str
) -> None:
    assert await _fetcher(session, server).fetch(server.prefix + name) == []


async def test_an_aia_answer_that_is_not_the_leafs_issuer_is_not_a_candidate(
    pki: Pki, server: AiaServer, session: aiohttp.ClientSession
) -> None:
    """The URL serves a real CA certificate, but not one named as the leaf's issuer."""
    other = issue_ca("Microsoft Azure RSA TLS Issuing CA 08", issuer=pki.root)
    leaf = issue_leaf(other, aia_urls=[server.prefix + "inter.crt"])
    verifier = _offline_verifier(pki, [pki.root.cert], _fetcher(session, server))
    with pytest.raises(JoinRejected):
        await verifier.verify(forge(leaf), expected_nonce="nonce-0123456789")
    assert (verifier.aia_fetches, verifier.path_builder_calls) == (1, 1)


def test_a_der_certificate_ending_in_a_whitespace_byte_is_parsed_whole() -> None:
    """DER is binary: a signature whose last byte is 0x0a/0x20/... must not be stripped
    (this once refused about 1 in 40 intermediates as 'not a certificate')."""
    import datetime as _dt

    from cryptography import x509 as _x509
    from cryptography.hazmat.primitives import hashes as _hashes
    from cryptography.hazmat.primitives.asymmetric import ec as _ec
    from cryptography.hazmat.primitives.serialization import Encoding as _Encoding

    from gateway.azure.aia import _parse_certificates

    key = _ec.generate_private_key(_ec.SECP256R1())
    name = _x509.Name([_x509.NameAttribute(_x509.NameOID.COMMON_NAME, "ws")])
    now = _dt.datetime.now(_dt.UTC)
    for serial in range(1, 2000):
        cert = (
            _x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now)
            .not_valid_after(now + _dt.timedelta(days=1))
            .sign(key, _hashes.SHA256())
        )
        der = cert.public_bytes(_Encoding.DER)
        if der[-1:] in (b"\n", b" ", b"\t", b"\r", b"\x0b", b"\x0c"):
            break
    else:
        raise AssertionError("no certificate ending in a whitespace byte was generated")
    assert _parse_certificates(der) == (cert,)
