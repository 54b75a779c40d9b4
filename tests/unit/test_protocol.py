"""The wire contract: one rule per field, applied the same way by every end.

The GUID table runs through every place that takes a GUID from outside (the attested
document, the registration body, the node config) so none of them can drift again; the
host-block table runs through both decoders (the gateway's join request and the auth
service's registration) and asserts they agree.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.agent.errors import NodeConfigError
from gateway.agent.nodeconfig import parse_node_config, parse_proxy_server
from gateway.authservice.wire import AuthServiceError
from gateway.authservice.wire import decode_registration as auth_decode_registration
from gateway.azure.attested import parse_azure_time, parse_content
from gateway.core.errors import BadRequest, GatewayError, PayloadTooLarge
from gateway.http.schema import decode_join_request as http_decode_join_request
from gateway.protocol import (
    CODES,
    HOST_ROLES,
    TOKEN_ROLES,
    ChallengeResponse,
    Code,
    ErrorBody,
    HostParams,
    JoinBlock,
    JoinResponse,
    RegisterCode,
    RegisterResult,
    Registration,
    WireError,
    build_join_body,
    canonical_role,
    decode_join_request,
    decode_registration,
    is_dns_name,
    is_guid,
    is_node_name,
    normalize_guid,
)
from tests.support.cms_forge import azure_content

GUID = "b1310a36-d400-46f6-82cb-6217df846586"
SUB = "8a205152-b25a-417f-a676-80465535a6c9"
TENANT = "44444444-4444-4444-4444-444444444444"

# (id, value, is a GUID)
GUIDS: list[tuple[str, Any, bool]] = [
    ("a lowercase GUID is one", GUID, True),
    ("an uppercase GUID is one", GUID.upper(), True),
    ("a GUID with a trailing newline is not one", GUID + "\n", False),
    ("a GUID with a leading newline is not one", "\n" + GUID, False),
    ("a GUID with a trailing CRLF is not one", GUID + "\r\n", False),
    ("a GUID with a trailing space is not one", GUID + " ", False),
    ("a braced GUID is not one", "{" + GUID + "}", False),
    ("a urn:uuid GUID is not one", "urn:uuid:" + GUID, False),
    ("32 hex digits without hyphens are not one", GUID.replace("-", ""), False),
    (
        "hyphens in the wrong places are not one",
        "b1310a36d-400-46f6-82cb-6217df846586",
        False,
    ),
    ("a non-hex letter is not one", "g" + GUID[1:], False),
    ("full-width digits are not one", "\uff11" + GUID[1:], False),
    ("a GUID with a NUL after it is not one", GUID + "\x00", False),
    ("an empty string is not one", "", False),
    ("a number is not one", 12345, False),
    ("None is not one", None, False),
]


@pytest.mark.parametrize(("value", "valid"), [c[1:] for c in GUIDS], ids=[c[0] for c in GUIDS])
def test_one_guid_rule(value: Any, valid: bool) -> None:
    assert is_guid(value) is valid
    assert normalize_guid(value) == (value.lower() if valid else None)


@pytest.mark.parametrize(("value", "valid"), [c[1:] for c in GUIDS], ids=[c[0] for c in GUIDS])
def test_the_attested_document_applies_the_guid_rule(value: Any, valid: bool) -> None:
    content = azure_content(vm_id=value)
    if valid:
        assert parse_content(content).vm_id == value
    else:
        with pytest.raises(GatewayError) as err:
            parse_content(content)
        assert err.value.code is Code.ATTESTED_CONTENT_INVALID


@pytest.mark.parametrize(("value", "valid"), [c[1:] for c in GUIDS], ids=[c[0] for c in GUIDS])
def test_the_registration_applies_the_guid_rule(value: Any, valid: bool) -> None:
    body = REG.to_json()
    body["join"]["vm_id"] = value
    raw = json.dumps(body).encode()
    if valid:
        assert decode_registration(raw).join.vm_id == value
    else:
        with pytest.raises(WireError) as err:
            decode_registration(raw)
        assert err.value.code is Code.INVALID_REQUEST


@pytest.mark.parametrize(
    ("value", "valid"),
    [c[1:] for c in GUIDS if isinstance(c[1], str) and c[1]],
    ids=[c[0] for c in GUIDS if isinstance(c[1], str) and c[1]],
)
def test_the_node_config_applies_the_guid_rule(value: str, valid: bool) -> None:
    # A YAML value is stripped of surrounding whitespace first (a config convenience);
    # what remains must pass the one GUID rule.
    valid = is_guid(value.strip())
    text = (
        "version: v3\nteleport:\n  join_params:\n    token_name: azure-token\n"
        f"    method: azure\n    azure:\n      client_id: {json.dumps(value)}\n"
        "  proxy_server: gw.example.com:443\n"
    )
    if valid:
        assert parse_node_config(text).client_id == value.strip()
    else:
        with pytest.raises(NodeConfigError) as err:
            parse_node_config(text)
        assert err.value.code == "config_invalid"


# --- the host block: both decoders, one rule -------------------------------------------------


def _ssh(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


_ED = ed25519.Ed25519PrivateKey.generate()
_P256 = ec.generate_private_key(ec.SECP256R1())
HOST = HostParams(
    node_name="web-1",
    role="Node",
    public_ssh_key=_ssh(_ED),
    public_tls_key=_pem(_P256),
    additional_principals=("10.1.2.3", "web-1.example.com"),
    dns_names=("web-1.internal",),
)
REG = Registration(
    idempotency_key="A" * 32,
    token_name="azure-token",
    role="Node",
    client_address="203.0.113.7",
    join=JoinBlock(
        method="azure",
        tenant=TENANT,
        subscription=SUB,
        resource_group="group1",
        vm_id=GUID,
        resource_id=f"/subscriptions/{SUB}/resourceGroups/group1/providers/"
        "Microsoft.Compute/virtualMachines/web-1",
    ),
    host=HOST,
)


def _join_raw(host: dict[str, Any]) -> bytes:
    body = build_join_body(
        token_name="azure-token",
        challenge="c" * 32,
        attested_data={"encoding": "pkcs7", "signature": "TUlJ"},
        access_token="a.b.c",
        host=HOST,
    )
    body["host"] = host
    return json.dumps(body).encode()


def _reg_raw(host: dict[str, Any]) -> bytes:
    body = REG.to_json()
    body["host"] = {"additional_principals": [], "dns_names": [], **host}
    body["role"] = host.get("role", "Node")
    return json.dumps(body).encode()


_WEAK_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
_K1 = ec.generate_private_key(ec.SECP256K1())

# (id, changes to the host block, accepted)
HOSTS: list[tuple[str, dict[str, Any], bool]] = [
    ("the reference host block is accepted", {}, True),
    ("a node name ending in a newline is refused", {"node_name": "web-1\n"}, False),
    ("a node name with a space is refused", {"node_name": "web 1"}, False),
    ("a node name starting with a dot is refused", {"node_name": ".web"}, False),
    ("a 253-character node name is accepted", {"node_name": "a" * 253}, True),
    ("a 254-character node name is refused", {"node_name": "a" * 254}, False),
    ("every host role is accepted: Okta", {"role": "Okta"}, True),
    ("every host role is accepted: WindowsDesktop", {"role": "WindowsDesktop"}, True),
    ("Bot is a token role but not a host role", {"role": "Bot"}, False),
    ("a role in the wrong case is refused on the wire", {"role": "node"}, False),
    ("a role that does not exist is refused", {"role": "Admin"}, False),
    ("a principal ending in a newline is refused", {"additional_principals": ["a\n"]}, False),
    ("a principal with a space is refused", {"additional_principals": ["a b"]}, False),
    ("an IPv6 principal is accepted", {"additional_principals": ["2001:db8::1"]}, True),
    ("33 principals are refused", {"additional_principals": ["p"] * 33}, False),
    ("a DNS name with an underscore is refused", {"dns_names": ["bad_name.internal"]}, False),
    ("a DNS name with a trailing dot is refused", {"dns_names": ["web.internal."]}, False),
    ("a wildcard DNS name is refused", {"dns_names": ["*.internal"]}, False),
    ("a DNS name ending in a newline is refused", {"dns_names": ["web.internal\n"]}, False),
    ("an RSA-1024 SSH key is refused", {"public_ssh_key": _ssh(_WEAK_RSA)}, False),
    ("a secp256k1 TLS key is refused", {"public_tls_key": _pem(_K1)}, False),
    ("an SSH key with a trailing newline is accepted", {"public_ssh_key": _ssh(_ED) + "\n"}, True),
    ("two SSH key lines are refused", {"public_ssh_key": _ssh(_ED) + "\n" + _ssh(_ED)}, False),
    ("an SSH key with a CR is refused", {"public_ssh_key": _ssh(_ED) + "\r"}, False),
    ("a TLS key that is not PEM is refused", {"public_tls_key": "MFkwEwYHKoZIzj0CAQ=="}, False),
    ("an oversized SSH key is refused", {"public_ssh_key": "ssh-ed25519 " + "A" * 5000}, False),
    ("an unknown host field is refused", {"labels": {}}, False),
    ("a node name that is a number is refused", {"node_name": 5}, False),
]


@pytest.mark.parametrize(("changes", "accepted"), [c[1:] for c in HOSTS], ids=[c[0] for c in HOSTS])
def test_the_gateway_and_the_auth_service_judge_a_host_block_alike(
    changes: dict[str, Any], accepted: bool
) -> None:
    host = {**HOST.to_json(), **changes}
    verdicts = []
    for decode, raw in (
        (lambda r: decode_join_request(r, client_address="203.0.113.7"), _join_raw(host)),
        (decode_registration, _reg_raw(host)),
    ):
        try:
            decode(raw)
            verdicts.append(None)
        except WireError as exc:
            verdicts.append(exc.code)
    expected = None if accepted else Code.INVALID_REQUEST
    assert verdicts == [expected, expected]


def test_host_roles_are_the_token_roles_but_bot() -> None:
    assert set(TOKEN_ROLES) - set(HOST_ROLES) == {"Bot"}
    assert all(canonical_role(r.lower()) == r for r in TOKEN_ROLES)
    assert canonical_role("Admin") is None


# --- the join API ----------------------------------------------------------------------------


def test_what_the_agent_builds_the_gateway_decodes_unchanged() -> None:
    body = build_join_body(
        token_name="azure-token",
        challenge="c" * 32,
        attested_data={"encoding": "pkcs7", "signature": "TUlJ"},
        access_token="a.b.c",
        host=HOST,
        intermediates=("AAEC",),
    )
    req = decode_join_request(json.dumps(body).encode(), client_address="192.0.2.1")
    assert req.host == HOST
    assert (req.token_name, req.challenge, req.attested_signature) == (
        "azure-token",
        "c" * 32,
        "TUlJ",
    )
    assert req.intermediates == (b"\x00\x01\x02",)
    assert "a.b.c" not in repr(req)


BODIES: list[tuple[str, bytes, Code]] = [
    ("a body that is not UTF-8 is malformed", b'{"a":"\xff"}', Code.MALFORMED_BODY),
    ("a JSON array is malformed", b"[]", Code.MALFORMED_BODY),
    ("JSON nested nine deep is malformed", b"[" * 9 + b"]" * 9, Code.MALFORMED_BODY),
    ("an empty object lacks fields", b"{}", Code.INVALID_REQUEST),
    ("a body over the cap is too large", b" " * 65537, Code.BODY_TOO_LARGE),
]


@pytest.mark.parametrize(("raw", "code"), [c[1:] for c in BODIES], ids=[c[0] for c in BODIES])
def test_the_http_layer_renders_wire_errors_with_the_same_code(raw: bytes, code: Code) -> None:
    with pytest.raises(WireError) as wire:
        decode_join_request(raw, client_address="192.0.2.1")
    assert wire.value.code is code
    with pytest.raises(GatewayError) as err:
        http_decode_join_request(raw, client_address="192.0.2.1")
    assert err.value.code is code
    assert err.value.status == CODES[code].status
    assert isinstance(err.value, PayloadTooLarge if code is Code.BODY_TOO_LARGE else BadRequest)


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"challenge": "A" * 32, "expires_at": "2026-11-27T00:00:00Z"}, True),
        ({"challenge": "A" * 33}, False),
        ({"challenge": "has spaces in it"}, False),
        ({"challenge": "A" * 31 + "\n"}, False),
        ({"challenge": 5}, False),
        ([], False),
    ],
    ids=[
        "a 32-character base64url challenge is one",
        "33 characters exceed the IMDS nonce limit",
        "spaces are not base64url",
        "a newline is not base64url",
        "a number is not a challenge",
        "a list is not a challenge response",
    ],
)
def test_the_challenge_response(body: object, valid: bool) -> None:
    if valid:
        assert ChallengeResponse.from_json(body).to_json() == body
    else:
        with pytest.raises(WireError):
            ChallengeResponse.from_json(body)


def test_the_join_response_carries_the_auth_service_answer_and_the_join_block() -> None:
    result = RegisterResult(
        host_id="h-1", ssh_cert="s", tls_cert="t", tls_ca_certs=("ca",), ssh_ca_keys=("k",)
    )
    body = JoinResponse(result, REG.join).to_json()
    assert body == {"host_id": "h-1", "certs": result.to_json(), "join": REG.join.to_json()}
    assert RegisterResult.from_json(result.body_json()) == result


# --- the registration API --------------------------------------------------------------------


def test_a_registration_round_trips_and_the_ssh_key_is_stripped() -> None:
    assert decode_registration(json.dumps(REG.to_json()).encode()) == REG
    padded = replace(REG, host=replace(HOST, public_ssh_key="  " + HOST.public_ssh_key + "\n"))
    assert decode_registration(json.dumps(padded.to_json()).encode()) == REG


REGS: list[tuple[str, dict[str, Any], str]] = [
    ("an idempotency key ending in a newline is refused", {"idempotency_key": "A\n"}, "invalid"),
    ("a 254-character token name is accepted", {"token_name": "t" * 254}, "ok"),
    ("a token name with a slash is refused", {"token_name": "a/b"}, "invalid"),
    ("a top-level role Bot is refused", {"role": "Bot"}, "invalid"),
    ("a client address that is a name is refused", {"client_address": "gw.local"}, "invalid"),
]


@pytest.mark.parametrize(("changes", "outcome"), [c[1:] for c in REGS], ids=[c[0] for c in REGS])
def test_registration_fields(changes: dict[str, Any], outcome: str) -> None:
    raw = json.dumps({**REG.to_json(), **changes}).encode()
    if outcome == "ok":
        assert decode_registration(raw).token_name == changes.get("token_name", REG.token_name)
        return
    with pytest.raises(AuthServiceError) as err:
        auth_decode_registration(raw)
    assert (err.value.status, err.value.code) == (400, RegisterCode.INVALID_REQUEST)


def test_node_names_and_dns_names() -> None:
    assert is_node_name("web-1.prod")
    assert not is_node_name("web-1.prod\n")
    assert is_dns_name("a" * 63 + ".example")
    assert not is_dns_name("a" * 64 + ".example")
    assert is_dns_name(("a" * 63 + ".") * 3 + "a" * 61)  # 253
    assert not is_dns_name(("a" * 63 + ".") * 3 + "a" * 62)  # 254


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": {"code": "not_allowed", "message": "No rule."}}, ("not_allowed", "No rule.")),
        ({"error": {"code": "overloaded"}}, ("overloaded", "")),
        ({"error": {"code": "x" * 300, "message": "m" * 900}}, ("x" * 100, "m" * 500)),
        ({"error": {"code": "", "message": "m"}}, None),
        ({"error": {"code": 5, "message": "m"}}, None),
        ({"error": "overloaded"}, None),
        ({"detail": "Bad Gateway"}, None),
        ("<html>502 Bad Gateway</html>", None),
    ],
    ids=[
        "a code and a message",
        "a code without a message",
        "long fields from the other end are cut",
        "an empty code is not an error body",
        "a numeric code is not an error body",
        "an error that is not an object is not an error body",
        "another JSON shape is not an error body",
        "a proxy's page is not an error body",
    ],
)
def test_error_bodies(body: object, expected: tuple[str, str] | None) -> None:
    err = ErrorBody.from_json(body)
    assert (None if err is None else (err.code, err.message)) == expected
    if err is not None:
        assert ErrorBody.from_json(err.to_json()) == err


@pytest.mark.parametrize(
    ("renewal", "valid"),
    [(None, True), (True, True), (False, True), ("yes", False)],
    ids=[
        "an auth service that does not say is understood",
        "a renewal round-trips",
        "a new host round-trips",
        "a renewal flag that is not a boolean is refused",
    ],
)
def test_the_register_result_carries_the_renewal_flag(renewal: object, valid: bool) -> None:
    result = RegisterResult(
        host_id="h-1", ssh_cert="s", tls_cert="t", tls_ca_certs=("ca",), ssh_ca_keys=("k",)
    )
    body = {**result.body_json(), "renewal": renewal} if renewal is not None else result.body_json()
    if valid:
        assert RegisterResult.from_json(body) == replace(result, renewal=renewal)
        assert RegisterResult.from_json(body).body_json() == body
    else:
        with pytest.raises(ValueError, match="renewal"):
            RegisterResult.from_json(body)


# --- the same newline bug in two other value checks ----------------------------------------


def test_an_attested_timestamp_ending_in_a_newline_is_refused() -> None:
    assert parse_azure_time("07/28/26 13:24:00 -0000").year == 2026
    with pytest.raises(GatewayError) as err:
        parse_azure_time("07/28/26 13:24:00 -0000\n")
    assert err.value.code is Code.ATTESTED_CONTENT_INVALID


def test_a_proxy_server_host_with_a_newline_is_refused() -> None:
    assert parse_proxy_server("gw.example.com:443") == "https://gw.example.com:443"
    with pytest.raises(NodeConfigError):
        parse_proxy_server("gw.example.com\n:443")


def test_node_name_is_optional_in_the_join_api_and_required_in_a_registration() -> None:
    # Absent in a join: the gateway decides (the VM's verified Azure name); a registration
    # always carries the name the gateway decided.
    host = HOST.to_json()
    del host["node_name"]
    req = decode_join_request(_join_raw(host), client_address="203.0.113.7")
    assert req.host.node_name == ""
    assert "node_name" not in req.host.to_json()  # an agent's body round-trips
    with pytest.raises(WireError):
        decode_registration(_reg_raw(host))
    with pytest.raises(WireError):
        decode_join_request(_join_raw({**host, "node_name": ""}), client_address="203.0.113.7")


def test_the_fields_check_refuses_exactly_what_require_fields_refuses() -> None:
    """``check_fields`` (key views against the sets) and ``require_fields`` (set
    differences) agree on every subset of known fields plus strangers, message included."""
    import itertools

    from gateway.protocol.types import check_fields
    from gateway.protocol.validators import require_fields

    allowed = frozenset({"a", "b", "c"})
    required = frozenset({"a", "b"})
    names = ["a", "b", "c", "x", "y"]
    checked = 0
    for n in range(len(names) + 1):
        for combo in itertools.combinations(names, n):
            obj = dict.fromkeys(combo, 1)
            try:
                require_fields(obj, allowed, required, "w")
                expected = None
            except WireError as exc:
                expected = (exc.code, exc.message)
            try:
                check_fields(obj, allowed, required, "w")
                got = None
            except WireError as exc:
                got = (exc.code, exc.message)
            assert got == expected, combo
            checked += expected is not None
    assert checked == 30  # of the 32 subsets only {a,b} and {a,b,c} pass


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{}",
        b"{" * 8,
        b"{" * 9,
        b"[" * 4 + b"{" * 4,
        b"[" * 4 + b"{" * 5,
        b'{"a": "[[[[[[[[[["}',
        b'{"a": [{"b": [{"c": {}}]}], "d": "x"}',
        b"x" * 5000 + b"[" * 9 + b"x" * 5000,
        b"{" + b"x" * 5000 + b"[" + b"x" * 5000 + b"{",
    ],
)
def test_the_opener_bound_is_the_opener_count(raw: bytes) -> None:
    from gateway.protocol.join import _openers_at_most

    assert _openers_at_most(raw, 8) == (raw.count(b"[") + raw.count(b"{") <= 8)
