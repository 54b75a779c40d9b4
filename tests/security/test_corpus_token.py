"""Hostile access tokens: algorithm attacks, unknown keys, bad tenants, wrong issuer and
audience, lifetimes, resource IDs the gateway must not accept — each refused with its code
over HTTPS while the attested document is valid, and the gateway keeps serving.

Forged tokens start from a real emulator token and are re-signed with the tenant's own
Entra key (``tests.support.forge_tokens``), so only the edited claim can fail.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.security.harness import S3, Body, Builder, Harness
from tests.support.forge_tokens import b64url, hs256_with, replace_segments, resign, unsigned

pytestmark = pytest.mark.asyncio(loop_scope="module")

Claims = dict[str, Any]
TokenMaker = Callable[[Harness], str]


def tok(make: TokenMaker) -> Builder:
    async def build(h: Harness) -> Body:
        return h.body(await h.challenge(), token=make(h))

    return build


def _now(h: Harness) -> float:
    return h.stack.gateway.deps.clock.time()


def claims(edit: Callable[[Harness, Claims], object]) -> TokenMaker:
    """The VM's real token with ``edit`` applied to its claims, re-signed by the tenant."""

    def make(h: Harness) -> str:
        _, key = h.tenant_key()
        return resign(h.token(), key, claims=lambda c: edit(h, c))

    return make


def set_claim(name: str, value: object) -> TokenMaker:
    def edit(h: Harness, c: Claims) -> None:
        c[name] = value

    return claims(edit)


def drop_claim(name: str) -> TokenMaker:
    return claims(lambda h, c: c.pop(name))


def relative(name: str, offset: float) -> TokenMaker:
    """Claim ``name`` set to now + offset seconds."""

    def edit(h: Harness, c: Claims) -> None:
        c[name] = int(_now(h) + offset)

    return claims(edit)


def header(edit: Callable[[Claims], object]) -> TokenMaker:
    def make(h: Harness) -> str:
        _, key = h.tenant_key()
        return resign(h.token(), key, header=edit)

    return make


def rid(path: str) -> TokenMaker:
    """xms_az_rid set to ``path`` (``{S}`` is the VM's subscription, ``{RG}`` its group)."""

    def edit(h: Harness, c: Claims) -> None:
        c["xms_az_rid"] = path.format(S=h.vm.subscription, RG=h.vm.resource_group)

    return claims(edit)


def alg_none(h: Harness) -> str:
    return unsigned(h.token())


def alg_none_capitalised(h: Harness) -> str:
    return unsigned(h.token(), alg="None")


def hs256_public_pem(h: Harness) -> str:
    _, key = h.tenant_key()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hs256_with(h.token(), pem)


def hs256_public_der(h: Harness) -> str:
    _, key = h.tenant_key()
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hs256_with(h.token(), der)


def rs512(h: Harness) -> str:
    _, key = h.tenant_key()
    return resign(
        h.token(), key, header=lambda hd: hd.update(alg="RS512"), hash_alg=hashes.SHA512()
    )


def ps256_label(h: Harness) -> str:
    _, key = h.tenant_key()
    return resign(h.token(), key, header=lambda hd: hd.update(alg="PS256"))


def attacker_key(h: Harness) -> str:
    """Signed by a key the attacker made, claiming the tenant's current kid."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return resign(h.token(), key)


def attacker_key_new_kid(h: Harness) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return resign(h.token(), key, header=lambda hd: hd.update(kid="attacker", x5t="attacker"))


def other_tenants_key(h: Harness) -> str:
    """Signed by another tenant's real key; the claims keep the VM's tenant."""
    kid, key = h.tenant_key(h.other_tenant)
    return resign(h.token(), key, header=lambda hd: hd.update(kid=kid, x5t=kid))


def moved_to_other_tenant(h: Harness) -> str:
    """The VM's tenant key signed a token claiming the other tenant (its JWKS lacks the key)."""
    _, key = h.tenant_key()

    def edit(c: Claims) -> None:
        c["tid"] = h.other_tenant
        c["iss"] = f"https://sts.windows.net/{h.other_tenant}/"

    return resign(h.token(), key, claims=edit)


def signature_flipped(h: Harness) -> str:
    head, payload, sig = h.token().split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[-1] ^= 1
    return f"{head}.{payload}.{b64url(bytes(raw))}"


def payload_swapped(h: Harness) -> str:
    """The header and signature of one token over the payload of another VM's token."""
    head, _, sig = h.token().split(".")
    _, payload, _ = h.token(h.neighbour).split(".")
    return f"{head}.{payload}.{sig}"


def raw(text: str) -> TokenMaker:
    return lambda h: text


def segments(header_obj: object, payload_obj: object, sig: str = "c2ln") -> TokenMaker:
    def enc(obj: object) -> str:
        return b64url(json.dumps(obj).encode())

    return raw(f"{enc(header_obj)}.{enc(payload_obj)}.{sig}")


def other_vm_token(pick: Callable[[Harness], Any]) -> TokenMaker:
    return lambda h: h.token(pick(h))


def signature_of_length_4k_plus_1(h: Harness) -> str:
    """Issue 8: only the kid and tenant need to be real; the signature segment is valid
    base64url characters whose count no base64 can have (binascii.Error, once a 500)."""
    sig = h.token().split(".")[2]
    return replace_segments(h.token(), signature=sig[: (len(sig) - 1) // 4 * 4 + 1])


def nested(segment: str, opener: bytes, closer: bytes, depth: int = 2000) -> TokenMaker:
    """A header or payload that is JSON nested ``depth`` deep (RecursionError, once a 500)."""

    def make(h: Harness) -> str:
        deep = opener * depth + closer * depth
        return replace_segments(h.token(), **{segment: deep})

    return make


VM = "/subscriptions/{S}/resourcegroups/{RG}/providers/Microsoft.Compute/virtualMachines"

CASES = [
    pytest.param(tok(lambda h: h.token()), 200, None, id="the VM's own token joins"),
    pytest.param(tok(claims(lambda h, c: None)), 200, None, id="a token re-signed unchanged joins"),
    pytest.param(
        tok(relative("exp", -30)), 200, None, id="a token expired within the leeway joins"
    ),
    pytest.param(
        tok(header(lambda hd: hd.update(jku="https://attacker.example/keys"))),
        200,
        None,
        id="a jku header pointing at an attacker is ignored",
    ),
    # --- algorithms and keys ----------------------------------------------------------
    pytest.param(tok(alg_none), 403, "access_token_invalid", id="alg none"),
    pytest.param(tok(alg_none_capitalised), 403, "access_token_invalid", id="alg None"),
    pytest.param(
        tok(hs256_public_pem),
        403,
        "access_token_invalid",
        id="HS256 keyed with the RSA public key PEM",
    ),
    pytest.param(
        tok(hs256_public_der),
        403,
        "access_token_invalid",
        id="HS256 keyed with the RSA public key DER",
    ),
    pytest.param(tok(rs512), 403, "access_token_invalid", id="RS512 with the tenant's key"),
    pytest.param(tok(ps256_label), 403, "access_token_invalid", id="a PS256 label"),
    pytest.param(tok(header(lambda hd: hd.pop("kid"))), 403, "access_token_invalid", id="no kid"),
    pytest.param(
        tok(header(lambda hd: hd.update(kid=7))), 403, "access_token_invalid", id="a numeric kid"
    ),
    pytest.param(
        tok(header(lambda hd: hd.update(kid="x" * 300))),
        403,
        "access_token_invalid",
        id="a 300-character kid",
    ),
    pytest.param(
        tok(header(lambda hd: hd.update(kid="unknown-kid"))),
        403,
        "access_token_key_unknown",
        id="an unknown kid",
    ),
    pytest.param(
        tok(header(lambda hd: hd.update(kid="../../keys"))),
        403,
        "access_token_key_unknown",
        id="a kid that looks like a path",
    ),
    pytest.param(
        tok(attacker_key),
        403,
        "access_token_invalid",
        id="the tenant's kid but an attacker's key signed",
    ),
    pytest.param(
        tok(attacker_key_new_kid),
        403,
        "access_token_key_unknown",
        id="an attacker's key under its own kid",
    ),
    pytest.param(
        tok(other_tenants_key),
        403,
        "access_token_key_unknown",
        id="another tenant's real key for this tenant's token",
    ),
    pytest.param(
        tok(moved_to_other_tenant),
        403,
        "access_token_key_unknown",
        id="a token moved to another tenant under its old key",
    ),
    pytest.param(tok(signature_flipped), 403, "access_token_invalid", id="a flipped signature bit"),
    pytest.param(
        tok(payload_swapped),
        403,
        "access_token_invalid",
        id="another VM's payload under this token's signature",
    ),
    # --- tenant -----------------------------------------------------------------------
    pytest.param(
        tok(set_claim("tid", "not-a-guid")), 403, "access_token_invalid", id="tid not a GUID"
    ),
    pytest.param(
        tok(claims(lambda h, c: c.update(tid=c["tid"] + "/.."))),
        403,
        "access_token_invalid",
        id="tid ending in /..",
    ),
    pytest.param(
        tok(set_claim("tid", "../../common")),
        403,
        "access_token_invalid",
        id="tid that walks up a path",
    ),
    pytest.param(
        tok(claims(lambda h, c: c.update(tid=c["tid"] + "?x=1"))),
        403,
        "access_token_invalid",
        id="tid with a query string",
    ),
    pytest.param(tok(set_claim("tid", 5)), 403, "access_token_invalid", id="a numeric tid"),
    pytest.param(tok(drop_claim("tid")), 403, "access_token_invalid", id="no tid"),
    pytest.param(
        tok(set_claim("tid", "99999999-9999-4999-8999-999999999999")),
        403,
        "access_token_key_unknown",
        id="a tenant Entra does not know",
    ),
    # --- issuer and audience ----------------------------------------------------------
    pytest.param(
        tok(set_claim("iss", "https://attacker.example/")),
        403,
        "access_token_issuer_invalid",
        id="a foreign issuer",
    ),
    pytest.param(
        tok(
            claims(lambda h, c: c.update(iss=f"https://login.microsoftonline.com/{c['tid']}/v2.0"))
        ),
        403,
        "access_token_issuer_invalid",
        id="the v2 issuer for a v1 token",
    ),
    pytest.param(
        tok(claims(lambda h, c: c.update(iss=f"https://sts.windows.net/{h.other_tenant}/"))),
        403,
        "access_token_issuer_invalid",
        id="another tenant's issuer",
    ),
    pytest.param(tok(drop_claim("iss")), 403, "access_token_invalid", id="no issuer"),
    pytest.param(
        tok(set_claim("aud", "https://vault.azure.net")),
        403,
        "access_token_audience_invalid",
        id="a Key Vault audience",
    ),
    pytest.param(
        tok(set_claim("aud", "https://management.azure.com.attacker.example/")),
        403,
        "access_token_audience_invalid",
        id="an audience with the ARM host as a prefix",
    ),
    pytest.param(
        tok(set_claim("aud", ["https://vault.azure.net", "https://graph.microsoft.com"])),
        403,
        "access_token_audience_invalid",
        id="a list of other audiences",
    ),
    pytest.param(tok(drop_claim("aud")), 403, "access_token_invalid", id="no audience"),
    # --- lifetime ---------------------------------------------------------------------
    pytest.param(
        tok(relative("exp", -3600)), 403, "access_token_expired", id="expired an hour ago"
    ),
    pytest.param(
        tok(relative("nbf", 3600)), 403, "access_token_expired", id="nbf an hour in the future"
    ),
    pytest.param(
        tok(relative("iat", 3600)), 403, "access_token_expired", id="iat an hour in the future"
    ),
    pytest.param(tok(drop_claim("exp")), 403, "access_token_invalid", id="no exp"),
    pytest.param(tok(set_claim("exp", "tomorrow")), 403, "access_token_invalid", id="exp a string"),
    # --- resource IDs -----------------------------------------------------------------
    pytest.param(
        tok(rid(VM.replace("{S}", S3) + "/vm-x")),
        403,
        "subscription_mismatch",
        id="xms_az_rid in another subscription",
    ),
    pytest.param(
        tok(rid(VM + "/vm-b")),
        403,
        "vm_binding_failed",
        id="xms_az_rid naming the neighbour VM",
    ),
    pytest.param(
        tok(
            rid(
                "/subscriptions/{S}/resourcegroups/{RG}/providers/Microsoft.Storage/storageAccounts/st"
            )
        ),
        403,
        "identity_unsupported",
        id="xms_az_rid naming a storage account",
    ),
    pytest.param(
        tok(
            rid(
                "/subscriptions/{S}/resourcegroups/{RG}/providers/"
                "Microsoft.ManagedIdentity/userAssignedIdentities/id"
            )
        ),
        403,
        "identity_unsupported",
        id="xms_az_rid naming an identity",
    ),
    pytest.param(
        tok(rid("/subscriptions/{S}/resourcegroups/{RG}/providers/Microsoft.Web/sites/app")),
        403,
        "identity_unsupported",
        id="xms_az_rid naming an App Service site",
    ),
    pytest.param(
        tok(rid(VM + "/vm-a/../vm-b")),
        403,
        "identity_unsupported",
        id="xms_az_rid with a dot-dot segment",
    ),
    pytest.param(
        tok(rid(VM + "/vm-a/extensions/x")),
        403,
        "identity_unsupported",
        id="xms_az_rid naming a VM extension",
    ),
    pytest.param(
        tok(rid("/subscriptions/{S}")),
        403,
        "identity_unsupported",
        id="xms_az_rid of a subscription",
    ),
    pytest.param(
        tok(rid("https://attacker.example/x")),
        403,
        "identity_unsupported",
        id="xms_az_rid that is a URL",
    ),
    pytest.param(
        tok(set_claim("xms_az_rid", 12)),
        403,
        "access_token_invalid",
        id="xms_az_rid that is a number",
    ),
    pytest.param(
        tok(drop_claim("xms_az_rid")),
        403,
        "identity_unsupported",
        id="a user-assigned identity token without xms_az_rid",
    ),
    pytest.param(
        tok(claims(lambda h, c: (c.pop("xms_az_rid"), c.pop("xms_mirid")))),
        403,
        "identity_unsupported",
        id="a token naming no resource",
    ),
    pytest.param(
        tok(other_vm_token(lambda h: h.other_sub_vm)),
        403,
        "subscription_mismatch",
        id="a real token of a VM in another subscription",
    ),
    pytest.param(
        tok(other_vm_token(lambda h: h.system_vm)),
        403,
        "vm_binding_failed",
        id="a real system-assigned token of another VM",
    ),
    # --- not a JWT --------------------------------------------------------------------
    pytest.param(tok(raw("a.b")), 400, "access_token_malformed", id="two parts"),
    pytest.param(tok(raw("a.b.c.d")), 400, "access_token_malformed", id="four parts"),
    pytest.param(tok(raw("..")), 400, "access_token_malformed", id="three empty parts"),
    pytest.param(tok(raw("!!!.???.***")), 400, "access_token_malformed", id="not base64url"),
    pytest.param(
        tok(segments([1, 2], {"tid": "x"})),
        400,
        "access_token_malformed",
        id="a header that is a JSON array",
    ),
    pytest.param(
        tok(raw(b64url(b"\xff\xfe") + "." + b64url(b"{}") + ".c2ln")),
        400,
        "access_token_malformed",
        id="a header that is not UTF-8",
    ),
    pytest.param(
        tok(lambda h: h.token() + "!"),
        400,
        "access_token_malformed",
        id="a signature with a character outside base64url",
    ),
    pytest.param(
        tok(raw("e" * 16385)), 400, "invalid_request", id="a token longer than the schema allows"
    ),
    pytest.param(tok(raw("")), 400, "invalid_request", id="an empty token"),
    # Issue 8: three inputs that answered 500. Each is a class: every segment decodes in one
    # place, and every JSON decode of a segment catches RecursionError.
    pytest.param(
        tok(signature_of_length_4k_plus_1),
        400,
        "access_token_malformed",
        id="a signature segment of length 4k+1",
    ),
    pytest.param(
        tok(lambda h: replace_segments(h.token(), signature="A")),
        400,
        "access_token_malformed",
        id="a one-character signature segment",
    ),
    pytest.param(
        tok(nested("header", b"[", b"]")),
        400,
        "access_token_malformed",
        id="a header of 2,000 nested arrays",
    ),
    pytest.param(
        tok(nested("header", b'{"":', b"}")),
        400,
        "access_token_malformed",
        id="a header of 2,000 nested objects",
    ),
    pytest.param(
        tok(nested("payload", b"[", b"]")),
        400,
        "access_token_malformed",
        id="a payload of 2,000 nested arrays",
    ),
    pytest.param(
        tok(lambda h: replace_segments(h.token(), payload=b"A" * 5)),
        400,
        "access_token_malformed",
        id="a payload segment that decodes to no JSON",
    ),
]


@pytest.mark.parametrize(("build", "status", "code"), CASES)
async def test_token_corpus(
    harness: Harness, build: Builder, status: int, code: str | None
) -> None:
    assert (await harness.join(await build(harness))) == (status, code)
    await harness.assert_alive()
