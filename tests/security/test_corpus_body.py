"""Hostile request bodies and HTTP framing: not JSON, wrong shapes, unknown fields, deep
nesting, huge arrays, oversize and compressed bodies, oversized headers, slow drips —
each refused with its code, and the gateway keeps serving.

Body cases start from a valid join body and change one thing, so a refusal proves the
schema check (DESIGN §3 step 1), not a later one.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.security.harness import Body, Builder, Harness, client_ssl

pytestmark = pytest.mark.asyncio(loop_scope="module")

Edit = Callable[[Body], object]


def edited(edit: Edit) -> Builder:
    """A valid body with ``edit`` applied in place (its return value is ignored)."""

    async def build(h: Harness) -> Body:
        body = h.body(await h.challenge())
        edit(body)
        return body

    return build


def put(path: str, value: object) -> Builder:
    def edit(body: Body) -> None:
        *parents, last = path.split(".")
        node = body
        for p in parents:
            node = node[p]
        node[last] = value

    return edited(edit)


def drop(path: str) -> Builder:
    def edit(body: Body) -> None:
        *parents, last = path.split(".")
        node = body
        for p in parents:
            node = node[p]
        del node[last]

    return edited(edit)


def raw(data: bytes) -> Builder:
    async def build(h: Harness) -> bytes:
        return data

    return build


def text_edit(edit: Callable[[str], str]) -> Builder:
    """The valid body's JSON text, edited as text (for what json.dumps cannot produce)."""

    async def build(h: Harness) -> bytes:
        return edit(json.dumps(h.body(await h.challenge()))).encode("utf-8", "surrogatepass")

    return build


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _weak_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused on purpose


def _weak_ssh_key() -> str:
    return (
        _weak_rsa()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _weak_tls_key() -> str:
    return (
        _weak_rsa()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


_CERT_PEM_PREFIX = "-----BEGIN CERTIFICATE-----\nMIIB"

CASES = [
    pytest.param(edited(lambda b: None), 200, None, id="the unmodified valid body joins"),
    # --- not a JSON object ------------------------------------------------------------
    pytest.param(raw(b""), 400, "malformed_body", id="an empty body"),
    pytest.param(raw(b"null"), 400, "malformed_body", id="JSON null"),
    pytest.param(raw(b"[]"), 400, "malformed_body", id="a JSON array"),
    pytest.param(raw(b'"azure-token"'), 400, "malformed_body", id="a JSON string"),
    pytest.param(raw(b"1e999"), 400, "malformed_body", id="a JSON number"),
    pytest.param(raw(b"{'a': 1}"), 400, "malformed_body", id="single-quoted pseudo-JSON"),
    pytest.param(raw(b'{"a": 1,}'), 400, "malformed_body", id="a trailing comma"),
    pytest.param(raw(b"\xef\xbb\xbf{}"), 400, "malformed_body", id="a UTF-8 byte-order mark"),
    pytest.param(raw(b'{"token_name": "\xff"}'), 400, "malformed_body", id="invalid UTF-8"),
    pytest.param(raw('{"a":"x"}'.encode("utf-16")), 400, "malformed_body", id="a UTF-16 body"),
    pytest.param(
        raw(b'{"token_name": ' + b"1" * 5000 + b"}"),
        400,
        "malformed_body",
        id="a five-thousand-digit integer",
    ),
    pytest.param(raw(b"{" * 9), 400, "malformed_body", id="nine open braces"),
    pytest.param(raw(b"[" * 60000), 400, "malformed_body", id="sixty thousand open brackets"),
    pytest.param(
        raw(json.dumps(nested(9)).encode()), 400, "malformed_body", id="an array nested nine deep"
    ),
    pytest.param(
        put("host.additional_principals", nested(8)),
        400,
        "malformed_body",
        id="a field nested past the depth limit",
    ),
    # --- unknown and missing fields ---------------------------------------------------
    pytest.param(put("admin", True), 400, "invalid_request", id="an unknown top-level field"),
    pytest.param(
        put("host.principals", ["root"]), 400, "invalid_request", id="an unknown host field"
    ),
    pytest.param(
        put("attested_data.certificate", "x"),
        400,
        "invalid_request",
        id="an unknown attested_data field",
    ),
    pytest.param(
        put("join", {"subscription": "x"}),
        400,
        "invalid_request",
        id="a client-supplied join block",
    ),
    pytest.param(drop("token_name"), 400, "invalid_request", id="no token_name"),
    pytest.param(drop("challenge"), 400, "invalid_request", id="no challenge"),
    pytest.param(drop("attested_data"), 400, "invalid_request", id="no attested_data"),
    pytest.param(drop("access_token"), 400, "invalid_request", id="no access_token"),
    pytest.param(drop("host"), 400, "invalid_request", id="no host"),
    pytest.param(drop("host.role"), 400, "invalid_request", id="no host role"),
    pytest.param(drop("host.public_tls_key"), 400, "invalid_request", id="no public TLS key"),
    pytest.param(
        drop("attested_data.encoding"), 400, "invalid_request", id="no attested_data encoding"
    ),
    pytest.param(drop("intermediates"), 200, None, id="intermediates are optional"),
    # --- wrong types ------------------------------------------------------------------
    pytest.param(put("token_name", 123), 400, "invalid_request", id="a numeric token_name"),
    pytest.param(put("token_name", None), 400, "invalid_request", id="a null token_name"),
    pytest.param(put("token_name", float("nan")), 400, "invalid_request", id="a NaN token_name"),
    pytest.param(put("challenge", ["x"]), 400, "invalid_request", id="a challenge list"),
    pytest.param(put("access_token", {"jwt": "x"}), 400, "invalid_request", id="an object token"),
    pytest.param(put("attested_data", "pkcs7"), 400, "invalid_request", id="a string document"),
    pytest.param(put("attested_data.encoding", "pem"), 400, "invalid_request", id="a pem encoding"),
    pytest.param(
        put("attested_data.encoding", ["pkcs7"]), 400, "invalid_request", id="a list encoding"
    ),
    pytest.param(
        put("attested_data.signature", 7), 400, "invalid_request", id="a numeric signature"
    ),
    pytest.param(put("host", []), 400, "invalid_request", id="a host list"),
    pytest.param(put("host.role", ["Node"]), 400, "invalid_request", id="a role list"),
    pytest.param(put("intermediates", "MIIB"), 400, "invalid_request", id="a string intermediates"),
    pytest.param(put("intermediates", [1]), 400, "invalid_request", id="a numeric intermediate"),
    pytest.param(
        put("intermediates", ["not base64!"]),
        400,
        "invalid_request",
        id="an intermediate that is not base64",
    ),
    pytest.param(
        put("intermediates", ["AAAA"] * 8),
        200,
        None,
        id="eight junk intermediates are dropped and the join succeeds",
    ),
    pytest.param(
        put("host.additional_principals", "10.0.0.4"),
        400,
        "invalid_request",
        id="a string of principals",
    ),
    pytest.param(put("host.dns_names", [None]), 400, "invalid_request", id="a null DNS name"),
    # --- huge arrays and strings ------------------------------------------------------
    pytest.param(
        put("intermediates", ["AAAA"] * 9), 400, "invalid_request", id="nine intermediates"
    ),
    pytest.param(
        put("host.additional_principals", ["10.0.0.4"] * 33),
        400,
        "invalid_request",
        id="thirty-three principals",
    ),
    pytest.param(
        put("host.dns_names", ["a"] * 10000),
        400,
        "invalid_request",
        id="ten thousand DNS names",
    ),
    pytest.param(
        put("admin", [0] * 18000),
        400,
        "invalid_request",
        id="eighteen thousand numbers in an unknown field",
    ),
    pytest.param(
        put("host.node_name", "a" * 254), 400, "invalid_request", id="a 254-character node name"
    ),
    pytest.param(
        put("token_name", "a" * 255), 400, "invalid_request", id="a 255-character token name"
    ),
    pytest.param(
        put("host.public_ssh_key", "ssh-ed25519 " + "A" * 5000),
        400,
        "invalid_request",
        id="a 5000-character SSH key",
    ),
    # --- values -----------------------------------------------------------------------
    pytest.param(put("token_name", "nope"), 404, "unknown_token", id="an unknown token"),
    pytest.param(
        put("token_name", "static-token"),
        403,
        "token_wrong_method",
        id="a token of another join method",
    ),
    pytest.param(put("token_name", "expired-token"), 403, "token_expired", id="an expired token"),
    pytest.param(put("host.role", "Proxy"), 403, "role_not_allowed", id="a role the token denies"),
    pytest.param(
        put("host.role", "Admin"), 400, "invalid_request", id="a role that does not exist"
    ),
    pytest.param(
        put("token_name", "../tokens/azure-token"),
        400,
        "invalid_request",
        id="a token name with a path",
    ),
    pytest.param(
        put("token_name", "azure-token\n"),
        400,
        "invalid_request",
        id="a token name with a trailing newline",
    ),
    pytest.param(
        put("host.node_name", "vm-a\n"),
        400,
        "invalid_request",
        id="a node name with a trailing newline",
    ),
    pytest.param(
        put("host.node_name", "vm-a\nevil"),
        400,
        "invalid_request",
        id="a node name with an embedded newline",
    ),
    pytest.param(
        put("host.dns_names", ["vm-a.internal\n"]),
        400,
        "invalid_request",
        id="a DNS name with a trailing newline",
    ),
    pytest.param(
        put("host.additional_principals", ["10.0.0.4\n"]),
        400,
        "invalid_request",
        id="a principal with a trailing newline",
    ),
    pytest.param(
        put("host.additional_principals", ["10.0.0.4; rm -rf /"]),
        400,
        "invalid_request",
        id="a principal with shell syntax",
    ),
    pytest.param(
        put("host.dns_names", ["*.example.com"]), 400, "invalid_request", id="a wildcard DNS name"
    ),
    pytest.param(
        put("host.dns_names", ["a..b"]), 400, "invalid_request", id="a DNS name with an empty label"
    ),
    pytest.param(
        text_edit(lambda t: t.replace('"vm-a"', '"\\ud800"', 1)),
        400,
        "invalid_request",
        id="a node name that is a lone surrogate",
    ),
    pytest.param(
        text_edit(lambda t: t.replace('"vm-a"', '"vm\\u0000a"', 1)),
        400,
        "invalid_request",
        id="a node name with a NUL",
    ),
    pytest.param(
        edited(lambda b: b["host"].update(public_ssh_key=b["host"]["public_ssh_key"] + "\nx")),
        400,
        "invalid_request",
        id="an SSH key followed by a second line",
    ),
    pytest.param(
        put("host.public_ssh_key", _weak_ssh_key()),
        400,
        "invalid_request",
        id="a 1024-bit RSA SSH key",
    ),
    pytest.param(
        put("host.public_tls_key", _weak_tls_key()),
        400,
        "invalid_request",
        id="a 1024-bit RSA TLS key",
    ),
    pytest.param(
        put("host.public_ssh_key", "ssh-ed25519 AAAA"),
        400,
        "invalid_request",
        id="a truncated SSH key",
    ),
    pytest.param(
        put("host.public_ssh_key", "ssh-ed25519 \u00e9\u00e9\u00e9"),
        400,
        "invalid_request",
        id="a non-ASCII SSH key",
    ),
    pytest.param(
        put("host.public_tls_key", _CERT_PEM_PREFIX + "\n-----END CERTIFICATE-----\n"),
        400,
        "invalid_request",
        id="a certificate where the public TLS key goes",
    ),
    pytest.param(
        put(
            "host.public_tls_key",
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        ),
        400,
        "invalid_request",
        id="a private key where the public TLS key goes",
    ),
]


@pytest.mark.parametrize(("build", "status", "code"), CASES)
async def test_body_corpus(harness: Harness, build: Builder, status: int, code: str | None) -> None:
    assert (await harness.join(await build(harness))) == (status, code)
    await harness.assert_alive()


# ------------------------------------------------------------------------ HTTP framing


def _gzip_bomb() -> bytes:
    return gzip.compress(b" " * (8 * 1024 * 1024), compresslevel=9)


REQUESTS = [
    pytest.param(
        "POST",
        "/v1/join/azure",
        b"{}",
        {"Content-Type": "text/plain"},
        400,
        "unsupported_media_type",
        id="a text/plain join",
    ),
    pytest.param(
        "POST",
        "/v1/join/azure",
        b"token_name=azure-token",
        {"Content-Type": "application/x-www-form-urlencoded"},
        400,
        "unsupported_media_type",
        id="a form-encoded join",
    ),
    pytest.param(
        "POST",
        "/v1/join/azure",
        b" " * 70000,
        {},
        413,
        "body_too_large",
        id="a 70 kB body",
    ),
    pytest.param(
        "POST",
        "/v1/join/azure",
        b"{" + b" " * (10 * 1024 * 1024) + b"}",
        {},
        413,
        "body_too_large",
        id="a 10 MB body",
    ),
    pytest.param(
        "POST",
        "/v1/join/azure",
        _gzip_bomb(),
        {"Content-Encoding": "gzip"},
        413,
        "body_too_large",
        id="a gzip bomb that inflates to 8 MB",
    ),
    pytest.param("GET", "/v1/join/azure", b"", {}, 405, "method_not_allowed", id="GET on join"),
    pytest.param("PUT", "/v1/join/azure", b"{}", {}, 405, "method_not_allowed", id="PUT on join"),
    pytest.param(
        "DELETE",
        "/v1/join/azure/challenge",
        b"",
        {},
        405,
        "method_not_allowed",
        id="DELETE on challenge",
    ),
    pytest.param("POST", "/v1/join/aws", b"{}", {}, 404, "not_found", id="another join method"),
    pytest.param("POST", "/v1/join/azure/", b"{}", {}, 404, "not_found", id="a trailing slash"),
    pytest.param(
        "POST",
        "/v1/join/azure/../azure/challenge",
        b"{}",
        {},
        200,
        None,
        id="dot segments are normalised, not a bypass",
    ),
]


@pytest.mark.parametrize(("method", "path", "data", "headers", "status", "code"), REQUESTS)
async def test_request_corpus(
    harness: Harness,
    method: str,
    path: str,
    data: bytes,
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    hdrs = {"Content-Type": "application/json", **headers}
    async with harness.session.request(
        method, f"{harness.url}{path}", data=data, headers=hdrs, skip_auto_headers=()
    ) as resp:
        text = await resp.text()
    got = None if resp.status == 200 else json.loads(text)["error"]["code"]
    assert (resp.status, got) == (status, code)
    await harness.assert_alive()


async def test_chunked_body_over_the_cap_is_refused(harness: Harness) -> None:
    """No Content-Length: the cap is enforced on the bytes read."""

    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * 8192

    async with harness.session.post(
        f"{harness.url}/v1/join/azure",
        data=chunks(),
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "body_too_large"
    await harness.assert_alive()


# ------------------------------------------------------------------------ raw sockets


async def _raw(h: Harness, data: bytes, *, read_timeout: float = 10) -> tuple[int, bytes]:
    """Send ``data`` on a fresh TLS connection; return the status and the body."""
    port = h.stack.gateway.listeners[0].port
    ctx: ssl.SSLContext = client_ssl(h.stack.gateway_ca_file)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    try:
        writer.write(data)
        await writer.drain()
        raw_resp = await asyncio.wait_for(reader.read(1 << 20), read_timeout)
    finally:
        writer.close()
    head, _, body = raw_resp.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body


def _request(headers: str, body: bytes = b"{}") -> bytes:
    return (
        "POST /v1/join/azure/challenge HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}"
        "Connection: close\r\n\r\n"
    ).encode() + body


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"<not our error shape: {body[:60]!r}>"


_BAD_FRAMING = [
    pytest.param(
        _request("X-Big: " + "a" * 20000 + "\r\n"),
        id="a 20 kB header value",
    ),
    pytest.param(
        _request("".join(f"X-H{i}: v\r\n" for i in range(500))),
        id="five hundred headers",
    ),
    pytest.param(_request("X-" + "n" * 9000 + ": v\r\n"), id="a 9 kB header name"),
    pytest.param(
        b"POST /v1/join/azure/challenge?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        id="a 9 kB request line",
    ),
    pytest.param(
        b"POST /v1/join/azure/challenge HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\n{}",
        id="two conflicting Content-Length headers",
    ),
    pytest.param(
        b"POST /v1/join/azure/challenge HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        id="Content-Length and chunked together",
    ),
    pytest.param(
        b"POST /v1/join/azure/challenge HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n"
        b"Connection: close\r\n\r\n",
        id="a negative Content-Length",
    ),
    pytest.param(
        b"POST /v1/join/azure/challenge HTTP/1.1\r\nHost: x\r\nX-Bad\x00: v\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        id="a NUL in a header name",
    ),
]


async def test_a_well_formed_raw_request_is_served(harness: Harness) -> None:
    """The raw-socket helper itself works: the framing cases below can fail."""
    status, body = await _raw(harness, _request(""))
    assert status == 200
    assert len(json.loads(body)["challenge"]) == 32


@pytest.mark.parametrize("data", _BAD_FRAMING)
async def test_bad_framing_is_refused_and_survived(harness: Harness, data: bytes) -> None:
    """aiohttp's parser refuses these with 400 before any handler runs; the worker lives."""
    status, _ = await _raw(harness, data)
    assert status == 400
    await harness.assert_alive()


@pytest.mark.parametrize("data", _BAD_FRAMING)
async def test_bad_framing_gets_our_error_shape(harness: Harness, data: bytes) -> None:
    _, body = await _raw(harness, data)
    assert _code(body) == "malformed_body"


SLOW_DRIP_SECONDS = 6.0


async def test_slow_drip_body_is_cut_off(harness: Harness) -> None:
    """Headers, then one byte of a 2 kB body every 0.25 s. A gateway with a body read
    deadline (a few seconds: a real agent sends its few kB at once) answers or closes the
    connection within SLOW_DRIP_SECONDS; without one, a client holds a handler for as long
    as it likes, and a few thousand such clients hold them all."""
    port = harness.stack.gateway.listeners[0].port
    ctx = client_ssl(harness.stack.gateway_ca_file)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    start = time.monotonic()
    cut_off = False
    try:
        writer.write(
            b"POST /v1/join/azure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2048\r\n\r\n{"
        )
        await writer.drain()
        while not cut_off and time.monotonic() - start < SLOW_DRIP_SECONDS:
            try:
                writer.write(b" ")
                await writer.drain()
                await asyncio.wait_for(reader.read(4096), 0.25)
                cut_off = True  # the server answered (an error) or closed the connection
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                cut_off = True
    finally:
        writer.close()
    await harness.assert_alive()
    assert cut_off, f"the gateway still waits for a body dripped over {SLOW_DRIP_SECONDS} s"


async def test_slow_drip_headers_are_cut_off(harness: Harness) -> None:
    """The request line, then one header byte every 0.25 s for SLOW_DRIP_SECONDS."""
    port = harness.stack.gateway.listeners[0].port
    ctx = client_ssl(harness.stack.gateway_ca_file)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    start = time.monotonic()
    cut_off = False
    try:
        writer.write(b"POST /v1/join/azure HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        while not cut_off and time.monotonic() - start < SLOW_DRIP_SECONDS:
            try:
                writer.write(b"a")
                await writer.drain()
                await asyncio.wait_for(reader.read(4096), 0.25)
                cut_off = True
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                cut_off = True
    finally:
        writer.close()
    await harness.assert_alive()
    assert cut_off, f"the gateway still waits for headers dripped over {SLOW_DRIP_SECONDS} s"
