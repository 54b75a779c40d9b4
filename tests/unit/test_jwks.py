"""The JWKS client against a fake Entra ID (aiohttp on 127.0.0.1, port 0, plain HTTP).

The fake records every request, so single flight, caching and the refresh rate limit are
asserted as fetch counts; keys are real RSA keys made at test time.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.azure.jwks import JwksClient, TokenVerifier
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS
from gateway.core.errors import Code, GatewayError, JoinRejected, Overloaded

CLOUD = CLOUDS["public"]
NOW = 1_800_000_000.0
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT = "44444444-4444-4444-4444-444444444444"
UNKNOWN_TENANT = "99999999-9999-9999-9999-999999999999"
SUB = "11111111-1111-1111-1111-111111111111"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "RSA",
        "use": "sig",
        "kid": kid,
        "x5t": kid,
        "n": b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": b64(numbers.e.to_bytes(3, "big")),
    }


@pytest.fixture(scope="module")
def rsa_keys() -> dict[str, rsa.RSAPrivateKey]:
    return {
        kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2")
    }


class FakeEntra:
    """OIDC discovery + JWKS per tenant, with switchable faults."""

    def __init__(self) -> None:
        self.base = ""
        self.jwks: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[str] = []
        self.fail: str | None = None  # "discovery-500", "jwks-503", "html", "slow"
        self.jwks_uri: str | None = None  # override what discovery advertises
        self.delay = 0.0

    async def discovery(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        tid = request.match_info["tid"]
        await asyncio.sleep(self.delay)
        if self.fail == "discovery-500":
            return web.Response(status=500, text="oops")
        if self.fail == "html":
            return web.Response(
                status=200, text="<html>maintenance</html>", content_type="text/html"
            )
        if self.fail == "slow":
            await asyncio.sleep(2)
        if tid not in self.jwks:
            return web.json_response({"error": "invalid_tenant"}, status=400)
        return web.json_response(
            {
                "issuer": f"https://sts.windows.net/{tid}/",
                "jwks_uri": self.jwks_uri or f"{self.base}/{tid}/discovery/keys",
            }
        )

    async def keys(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        await asyncio.sleep(self.delay)
        if self.fail == "jwks-503":
            return web.Response(status=503)
        return web.json_response({"keys": self.jwks[request.match_info["tid"]]})


@pytest.fixture
async def entra() -> AsyncIterator[FakeEntra]:
    fake = FakeEntra()
    app = web.Application()
    app.router.add_get("/{tid}/.well-known/openid-configuration", fake.discovery)
    app.router.add_get("/{tid}/discovery/keys", fake.keys)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base = f"http://{host}:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def make_client(
    session: aiohttp.ClientSession, entra: FakeEntra, clock: FixedClock, **kwargs: Any
) -> JwksClient:
    kwargs.setdefault("timeout", 0.5)
    return JwksClient(session, cloud=CLOUD, authority_host=entra.base, clock=clock, **kwargs)


async def test_twenty_concurrent_lookups_make_one_discovery_and_one_jwks_fetch(
    session: aiohttp.ClientSession, entra: FakeEntra, rsa_keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    entra.delay = 0.05
    client = make_client(session, entra, FixedClock(NOW))
    keys = await asyncio.gather(*(client.key_for(TENANT, "k1") for _ in range(20)))
    assert all(k.public_numbers() == rsa_keys["k1"].public_key().public_numbers() for k in keys)
    assert client.fetches == {"discovery": 1, "jwks": 1}
    assert entra.requests == [
        f"/{TENANT}/.well-known/openid-configuration",
        f"/{TENANT}/discovery/keys",
    ]


async def test_keys_are_cached_until_the_ttl_then_refetched(
    session: aiohttp.ClientSession, entra: FakeEntra, rsa_keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    clock = FixedClock(NOW)
    client = make_client(session, entra, clock, cache_ttl=3600)
    await client.key_for(TENANT, "k1")
    clock.advance(3599)
    await client.key_for(TENANT, "k1")
    assert client.fetches == {"discovery": 1, "jwks": 1}
    clock.advance(2)
    await client.key_for(TENANT, "k1")
    assert client.fetches == {"discovery": 2, "jwks": 2}


async def test_an_unknown_kid_refreshes_at_most_once_per_interval(
    session: aiohttp.ClientSession, entra: FakeEntra, rsa_keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    clock = FixedClock(NOW)
    client = make_client(session, entra, clock, min_refresh_interval=300)
    await client.key_for(TENANT, "k1")
    # Entra rotates in k2 just after our fetch.
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1"), rsa_jwk(rsa_keys["k2"], "k2")]
    for _ in range(5):
        with pytest.raises(JoinRejected) as info:
            await client.key_for(TENANT, "k2")
        assert info.value.code == Code.ACCESS_TOKEN_KEY_UNKNOWN
    assert client.fetches == {"discovery": 1, "jwks": 1}, "keys this young are not refetched"

    clock.advance(301)
    entra.delay = 0.05
    keys = await asyncio.gather(*(client.key_for(TENANT, "k2") for _ in range(20)))
    assert all(k.public_numbers() == rsa_keys["k2"].public_key().public_numbers() for k in keys)
    assert client.fetches == {"discovery": 2, "jwks": 2}, "20 concurrent misses, one refresh"

    with pytest.raises(JoinRejected) as info:
        await client.key_for(TENANT, "made-up")
    assert info.value.code == Code.ACCESS_TOKEN_KEY_UNKNOWN
    assert client.fetches == {"discovery": 2, "jwks": 2}, "a made-up kid right after is free"


async def test_non_rsa_keys_are_dropped(
    session: aiohttp.ClientSession, entra: FakeEntra, rsa_keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    entra.jwks[TENANT] = [
        {
            "kty": "EC",
            "use": "sig",
            "kid": "ec",
            "crv": "P-256",
            "x": b64(ec_key.x.to_bytes(32, "big")),
            "y": b64(ec_key.y.to_bytes(32, "big")),
        },
        {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
        rsa_jwk(rsa_keys["k1"], "k1"),
    ]
    client = make_client(session, entra, FixedClock(NOW))
    assert await client.key_for(TENANT, "k1")
    for kid in ("ec", "sym"):
        with pytest.raises(JoinRejected) as info:
            await client.key_for(TENANT, kid)
        assert info.value.code == Code.ACCESS_TOKEN_KEY_UNKNOWN


def break_entra(entra: FakeEntra, mode: str) -> None:
    if mode == "jwks_uri on another host":
        entra.jwks_uri = "https://keys.example.net/discovery/keys"
    elif mode == "jwks_uri on another port":
        host_port = entra.base.rsplit(":", 1)
        entra.jwks_uri = f"{host_port[0]}:{int(host_port[1]) + 1}/{TENANT}/discovery/keys"
    elif mode == "jwks_uri over another scheme":
        entra.jwks_uri = entra.base.replace("http://", "https://") + f"/{TENANT}/discovery/keys"
    elif mode == "jwks_uri with credentials":
        entra.jwks_uri = (
            entra.base.replace("http://", "http://user:pw@") + f"/{TENANT}/discovery/keys"
        )
    else:
        entra.fail = mode


FAILURES = [
    ("discovery answers 500", "discovery-500"),
    ("the JWKS answers 503", "jwks-503"),
    ("discovery answers an HTML page", "html"),
    ("discovery times out", "slow"),
    ("discovery points jwks_uri at another host", "jwks_uri on another host"),
    ("discovery points jwks_uri at another port", "jwks_uri on another port"),
    ("discovery points jwks_uri at another scheme", "jwks_uri over another scheme"),
    ("discovery puts credentials in jwks_uri", "jwks_uri with credentials"),
]


@pytest.mark.parametrize("mode", [f[1] for f in FAILURES], ids=[f[0] for f in FAILURES])
async def test_a_failed_fetch_serves_the_last_known_good_keys(
    session: aiohttp.ClientSession,
    entra: FakeEntra,
    rsa_keys: dict[str, rsa.RSAPrivateKey],
    mode: str,
) -> None:
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    clock = FixedClock(NOW)
    client = make_client(session, entra, clock, cache_ttl=600, timeout=0.3)
    await client.key_for(TENANT, "k1")
    break_entra(entra, mode)
    clock.advance(601)
    key = await client.key_for(TENANT, "k1")
    assert key.public_numbers() == rsa_keys["k1"].public_key().public_numbers()
    assert client.fetches["discovery"] == 2
    # The failure is remembered for a moment: the next lookups do not refetch.
    await client.key_for(TENANT, "k1")
    assert client.fetches["discovery"] == 2
    expected_jwks = 2 if mode == "jwks-503" else 1
    assert client.fetches["jwks"] == expected_jwks, "a refused jwks_uri is never fetched"


@pytest.mark.parametrize("mode", [f[1] for f in FAILURES], ids=[f[0] for f in FAILURES])
async def test_a_failed_fetch_with_no_keys_is_a_retryable_dependency_error(
    session: aiohttp.ClientSession,
    entra: FakeEntra,
    rsa_keys: dict[str, rsa.RSAPrivateKey],
    mode: str,
) -> None:
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    break_entra(entra, mode)
    client = make_client(session, entra, FixedClock(NOW), timeout=0.3)
    with pytest.raises(Overloaded) as info:
        await client.key_for(TENANT, "k1")
    assert info.value.code == Code.DEPENDENCY_UNAVAILABLE
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    assert client.fetches["jwks"] == 0 or mode == "jwks-503"


async def test_an_unreachable_authority_is_a_dependency_error(
    session: aiohttp.ClientSession,
) -> None:
    # Bind a port, then close it: nothing listens there.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = JwksClient(
        session, cloud=CLOUD, authority_host=f"http://127.0.0.1:{port}", clock=FixedClock(NOW)
    )
    with pytest.raises(Overloaded) as info:
        await client.key_for(TENANT, "k1")
    assert info.value.code == Code.DEPENDENCY_UNAVAILABLE


async def test_a_tenant_entra_does_not_know_is_an_unknown_key_and_is_remembered(
    session: aiohttp.ClientSession, entra: FakeEntra
) -> None:
    client = make_client(session, entra, FixedClock(NOW))
    for _ in range(3):
        with pytest.raises(JoinRejected) as info:
            await client.key_for(UNKNOWN_TENANT, "k1")
        assert info.value.code == Code.ACCESS_TOKEN_KEY_UNKNOWN
    assert client.fetches == {"discovery": 1}


@pytest.mark.parametrize(
    "tid",
    ["../../evil", "contoso.onmicrosoft.com", f"{TENANT}/x"],
    ids=["a path", "a domain", "a GUID with a suffix"],
)
async def test_a_tenant_that_is_not_a_guid_never_reaches_a_url(
    session: aiohttp.ClientSession, entra: FakeEntra, tid: str
) -> None:
    client = make_client(session, entra, FixedClock(NOW))
    with pytest.raises(JoinRejected) as info:
        await client.key_for(tid, "k1")
    assert info.value.code == Code.ACCESS_TOKEN_INVALID
    assert entra.requests == []


def token(key: rsa.RSAPrivateKey, *, kid: str = "k1", tid: str = TENANT, alg: str = "RS256") -> str:
    payload = {
        "aud": "https://management.azure.com/",
        "iss": f"https://sts.windows.net/{tid}/",
        "iat": int(NOW - 60),
        "nbf": int(NOW - 60),
        "exp": int(NOW + 3600),
        "tid": tid,
        "oid": "o",
        "sub": "s",
        "xms_mirid": f"/subscriptions/{SUB}/resourcegroups/g/providers/"
        "Microsoft.Compute/virtualMachines/v",
    }
    signing_key: Any = key if alg == "RS256" else "not-a-real-secret-but-long-enough-for-hs256"
    return jwt.encode(payload, signing_key, algorithm=alg, headers={"kid": kid})


VERIFIER_CASES: list[tuple[str, str, dict[str, Any], Code | None, int]] = [
    ("a valid token verifies after one key fetch", "valid", {}, None, 1),
    (
        "an unlisted tenant is refused before any fetch",
        "valid",
        {"allowed_tenants": [OTHER_TENANT]},
        Code.TENANT_NOT_ALLOWED,
        0,
    ),
    ("a listed tenant verifies", "valid", {"allowed_tenants": [TENANT.upper()]}, None, 1),
    ("an HS256 token is refused before any fetch", "hs256", {}, Code.ACCESS_TOKEN_INVALID, 0),
    (
        "a token signed by a key not in the set is refused",
        "other-key",
        {},
        Code.ACCESS_TOKEN_INVALID,
        1,
    ),
    ("a token with an unknown kid is refused", "unknown-kid", {}, Code.ACCESS_TOKEN_KEY_UNKNOWN, 1),
    ("a garbage token is malformed", "garbage", {}, Code.ACCESS_TOKEN_MALFORMED, 0),
]


@pytest.mark.parametrize(
    ("kind", "kwargs", "expected", "discoveries"),
    [c[1:] for c in VERIFIER_CASES],
    ids=[c[0] for c in VERIFIER_CASES],
)
async def test_token_verifier(
    session: aiohttp.ClientSession,
    entra: FakeEntra,
    rsa_keys: dict[str, rsa.RSAPrivateKey],
    kind: str,
    kwargs: dict[str, Any],
    expected: Code | None,
    discoveries: int,
) -> None:
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    clock = FixedClock(NOW)
    verifier = TokenVerifier(make_client(session, entra, clock), cloud=CLOUD, clock=clock, **kwargs)
    makers: dict[str, Callable[[], str]] = {
        "valid": lambda: token(rsa_keys["k1"]),
        "hs256": lambda: token(rsa_keys["k1"], alg="HS256"),
        "other-key": lambda: token(rsa_keys["k2"]),
        "unknown-kid": lambda: token(rsa_keys["k2"], kid="k2"),
        "garbage": lambda: "not.a.jwt",
    }
    jwt_text = makers[kind]()
    if expected is None:
        claims = await verifier.verify(jwt_text)
        assert claims.tid == TENANT
    else:
        with pytest.raises(GatewayError) as info:
            await verifier.verify(jwt_text)
        assert info.value.code == expected
    assert sum(1 for r in entra.requests if r.endswith("openid-configuration")) == discoveries


async def test_the_verifier_uses_the_injected_clock(
    session: aiohttp.ClientSession, entra: FakeEntra, rsa_keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    clock = FixedClock(NOW)
    verifier = TokenVerifier(make_client(session, entra, clock), cloud=CLOUD, clock=clock)
    jwt_text = token(rsa_keys["k1"])
    await verifier.verify(jwt_text)
    clock.advance(3600 + 61)
    with pytest.raises(JoinRejected) as info:
        await verifier.verify(jwt_text)
    assert info.value.code == Code.ACCESS_TOKEN_EXPIRED


async def test_tokens_never_reach_logs_or_errors(
    session: aiohttp.ClientSession,
    entra: FakeEntra,
    rsa_keys: dict[str, rsa.RSAPrivateKey],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    clock = FixedClock(NOW)
    verifier = TokenVerifier(make_client(session, entra, clock), cloud=CLOUD, clock=clock)
    good = token(rsa_keys["k1"])
    await verifier.verify(good)
    bad = [token(rsa_keys["k2"]), token(rsa_keys["k2"], kid="k2"), good]
    errors: list[GatewayError] = []
    clock.advance(7200)  # the good one is now expired
    for jwt_text in bad:
        with pytest.raises(GatewayError) as info:
            await verifier.verify(jwt_text)
        errors.append(info.value)
    assert caplog.records
    for jwt_text in [good, *bad]:
        signature = jwt_text.rsplit(".", 1)[1]
        for record in caplog.records:
            assert signature not in record.getMessage()
        for err in errors:
            assert signature not in str(err)


async def test_a_known_tenant_that_discovery_suddenly_denies_keeps_its_keys(
    session: aiohttp.ClientSession, entra: FakeEntra, rsa_keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    clock = FixedClock(NOW)
    client = make_client(session, entra, clock, cache_ttl=600)
    await client.key_for(TENANT, "k1")
    del entra.jwks[TENANT]  # discovery now answers 400
    clock.advance(601)
    key = await client.key_for(TENANT, "k1")
    assert key.public_numbers() == rsa_keys["k1"].public_key().public_numbers()
    assert client.fetches == {"discovery": 2, "jwks": 1}


async def test_the_verifier_decodes_a_token_once(
    session: aiohttp.ClientSession,
    entra: FakeEntra,
    rsa_keys: dict[str, rsa.RSAPrivateKey],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The header is read to find the key; the claims verified are those very ones, not a
    # second decoding of the token.
    from gateway.azure import token as token_module

    entra.jwks[TENANT] = [rsa_jwk(rsa_keys["k1"], "k1")]
    clock = FixedClock(NOW)
    verifier = TokenVerifier(make_client(session, entra, clock), cloud=CLOUD, clock=clock)
    await verifier.verify(token(rsa_keys["k1"]))  # the tenant's keys fetched
    splits: list[str] = []
    real = token_module._split

    def counting(text: str) -> Any:
        splits.append(text)
        return real(text)

    monkeypatch.setattr(token_module, "_split", counting)
    jwt_text = token(rsa_keys["k1"])
    claims = await verifier.verify(jwt_text)
    assert claims.tid == TENANT and splits == [jwt_text]
    # What was read names neither the token nor its claims when shown.
    read = token_module.read_token(jwt_text)
    assert "payload" not in repr(read) and jwt_text not in repr(read)
