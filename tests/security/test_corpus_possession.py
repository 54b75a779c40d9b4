"""Proof of possession over HTTPS: the gateway and the auth service check the node's CSR
(signed by the TLS key it asks to have certified) and its SSH key's signature over the
challenge; a CSR's own names never reach a certificate. Each case asserts the status, the
code, and that the gateway still serves; with ``--require-csr`` a node that sends no proof
is told ``csr_required``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from gateway.agent.keys import load_or_create_keys
from gateway.authservice.app import AuthSettings
from gateway.dev.devstack import DevStack, dev_stack
from gateway.dev.emulator import EmulatedVm
from gateway.protocol.possession import make_csr, sign_ssh_possession
from tests.support.joins import join_body
from tests.support.tokens import azure_token_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

SUB = "11111111-1111-1111-1111-111111111111"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    settings = AuthSettings(require_csr=True)
    async with dev_stack(
        tmp_path_factory.mktemp("pop"), tokens_yaml=azure_token_yaml(SUB), auth_settings=settings
    ) as st:
        yield st


@pytest.fixture(scope="module")
def vm(stack: DevStack) -> EmulatedVm:
    tenant = stack.emulator.add_tenant()
    return stack.emulator.add_vm(
        subscription=SUB, resource_group="rg", name="pop-vm", tenant=tenant, identity="system"
    )


def _csr_with_names(key: ec.EllipticCurvePrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auth.cluster.internal")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("vm-b"), x509.DNSName("localhost")]),
            critical=False,
        )
        # Extensions a node might ask for: a CA of its own, code signing.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _tampered(csr: str) -> str:
    der = x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER)
    broken = der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]
    return x509.load_der_x509_csr(broken).public_bytes(serialization.Encoding.PEM).decode()


Mutation = Callable[[dict[str, Any], Any], None]


def _proofs(host: dict[str, Any], keys: Any, challenge: str) -> None:
    host["csr"] = make_csr(keys.tls_key)
    host["ssh_key_proof"] = sign_ssh_possession(keys.ssh_key, challenge)


CASES: list[tuple[str, Callable[[dict[str, Any], Any, str], None], int, str | None]] = [
    ("the agent's own CSR and proof join", _proofs, 200, None),
    (
        "a CSR for another key is refused",
        lambda h, k, c: (
            _proofs(h, k, c),
            h.__setitem__("csr", make_csr(ec.generate_private_key(ec.SECP256R1()))),
        ),
        400,
        "csr_key_mismatch",
    ),
    (
        "a CSR whose signature does not verify is refused",
        lambda h, k, c: (_proofs(h, k, c), h.__setitem__("csr", _tampered(h["csr"]))),
        400,
        "csr_invalid",
    ),
    (
        "an SSH proof by another key is refused",
        lambda h, k, c: (
            _proofs(h, k, c),
            h.__setitem__(
                "ssh_key_proof", sign_ssh_possession(ed25519.Ed25519PrivateKey.generate(), c)
            ),
        ),
        400,
        "ssh_key_proof_invalid",
    ),
    (
        "an SSH proof for another challenge (a replay) is refused",
        lambda h, k, c: (
            _proofs(h, k, c),
            h.__setitem__("ssh_key_proof", sign_ssh_possession(k.ssh_key, "B" * 32)),
        ),
        400,
        "ssh_key_proof_invalid",
    ),
    (
        "no proof at all is refused where the auth service requires one",
        lambda h, k, c: None,
        400,
        "csr_required",
    ),
]


async def _post(stack: DevStack, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    ctx = ssl.create_default_context(cafile=str(stack.gateway_ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.post(stack.gateway_url + "/v1/join/azure", json=body, ssl=ctx) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("mutate", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_proof_of_possession(
    stack: DevStack,
    vm: EmulatedVm,
    tmp_path: Path,
    mutate: Callable[[dict[str, Any], Any, str], None],
    status: int,
    code: str | None,
) -> None:
    body = join_body(stack, vm, tmp_path, token="azure-token")
    mutate(body["host"], load_or_create_keys(tmp_path), body["challenge"])
    got, data = await _post(stack, body)
    assert (got, (data.get("error") or {}).get("code")) == (status, code)
    # The gateway still serves: a proper join right after.
    again = join_body(stack, vm, tmp_path, token="azure-token")
    _proofs(again["host"], load_or_create_keys(tmp_path), again["challenge"])
    assert (await _post(stack, again))[0] == 200


async def test_a_csrs_own_names_and_extensions_never_reach_the_certificate(
    stack: DevStack, vm: EmulatedVm, tmp_path: Path
) -> None:
    body = join_body(stack, vm, tmp_path, token="azure-token")
    keys = load_or_create_keys(tmp_path)
    _proofs(body["host"], keys, body["challenge"])
    body["host"]["csr"] = _csr_with_names(keys.tls_key)
    got, data = await _post(stack, body)
    assert got == 200
    cert = x509.load_pem_x509_certificate(data["certs"]["tls"].encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    assert not dns & {"vm-b", "localhost", "auth.cluster.internal"}
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == data["host_id"]
    assert_no_requested_extensions(cert)


def assert_no_requested_extensions(cert: x509.Certificate) -> None:
    """None of ``_csr_with_names``'s requested extensions is in ``cert``."""
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    assert ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.CODE_SIGNING not in eku
