"""Proof of possession (gateway/protocol/possession.py): one table per proof, real keys."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from gateway.protocol.possession import (
    PossessionError,
    make_csr,
    sign_ssh_possession,
    verify_csr,
    verify_ssh_possession,
)

CHALLENGE = "c" * 32


def _pub_pem(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey,
) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _ssh_pub(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey,
) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


NODE = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())


def _csr_with_names(key: ec.EllipticCurvePrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auth.cluster.internal")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("vm-b"), x509.DNSName("localhost"), x509.DNSName("*.internal")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _tampered_signature(key: ec.EllipticCurvePrivateKey) -> str:
    der = x509.load_pem_x509_csr(make_csr(key).encode()).public_bytes(serialization.Encoding.DER)
    broken = der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]
    csr = x509.load_der_x509_csr(broken)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


CSR_CASES: list[tuple[str, Callable[[], tuple[str, str]], str | None]] = [
    ("the agent's CSR for its own key is accepted", lambda: (make_csr(NODE), _pub_pem(NODE)), None),
    (
        "an Ed25519 key's CSR is accepted",
        lambda: (lambda k: (make_csr(k), _pub_pem(k)))(ed25519.Ed25519PrivateKey.generate()),
        None,
    ),
    (
        "an RSA key's CSR is accepted",
        lambda: (lambda k: (make_csr(k), _pub_pem(k)))(
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
        None,
    ),
    (
        "extra requested names and extensions are ignored, not refused",
        lambda: (_csr_with_names(NODE), _pub_pem(NODE)),
        None,
    ),
    (
        "a CSR for another key is refused",
        lambda: (make_csr(OTHER), _pub_pem(NODE)),
        "csr_key_mismatch",
    ),
    (
        "a CSR whose signature does not verify is refused",
        lambda: (_tampered_signature(NODE), _pub_pem(NODE)),
        "csr_invalid",
    ),
    ("garbage is refused", lambda: ("not a csr", _pub_pem(NODE)), "csr_invalid"),
    (
        "two CSRs in one field are refused",
        lambda: (make_csr(NODE) + make_csr(NODE), _pub_pem(NODE)),
        "csr_invalid",
    ),
    (
        "an oversized CSR is refused before parsing",
        lambda: (make_csr(NODE) + "A" * 20000, _pub_pem(NODE)),
        "csr_invalid",
    ),
    (
        "a certificate instead of a CSR is refused",
        lambda: (
            "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
            _pub_pem(NODE),
        ),
        "csr_invalid",
    ),
    (
        "non-ASCII is refused",
        lambda: ("-----BEGIN CERTIFICATE REQUEST-----é", _pub_pem(NODE)),
        "csr_invalid",
    ),
]


@pytest.mark.parametrize(
    ("make", "code"), [c[1:] for c in CSR_CASES], ids=[c[0] for c in CSR_CASES]
)
def test_csr(make: Callable[[], tuple[str, str]], code: str | None) -> None:
    csr, key = make()
    if code is None:
        verify_csr(csr, key)
        return
    with pytest.raises(PossessionError) as info:
        verify_csr(csr, key)
    assert info.value.code == code


SSH_KEYS = {
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
    "ecdsa p-256": ec.generate_private_key(ec.SECP256R1()),
    "ecdsa p-384": ec.generate_private_key(ec.SECP384R1()),
    "rsa 2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


@pytest.mark.parametrize("kind", sorted(SSH_KEYS), ids=lambda k: f"a {k} key proves itself")
def test_ssh_proof_round_trip(kind: str) -> None:
    key = SSH_KEYS[kind]
    verify_ssh_possession(_ssh_pub(key), CHALLENGE, sign_ssh_possession(key, CHALLENGE))


SSH_BAD: list[tuple[str, Callable[[], tuple[str, str, str]]]] = [
    (
        "a proof by another key",
        lambda: (
            _ssh_pub(SSH_KEYS["ed25519"]),
            CHALLENGE,
            sign_ssh_possession(ed25519.Ed25519PrivateKey.generate(), CHALLENGE),
        ),
    ),
    (
        "a proof for another challenge (a replay)",
        lambda: (
            _ssh_pub(SSH_KEYS["ed25519"]),
            CHALLENGE,
            sign_ssh_possession(SSH_KEYS["ed25519"], "d" * 32),
        ),
    ),
    ("an empty proof", lambda: (_ssh_pub(SSH_KEYS["ed25519"]), CHALLENGE, "")),
    ("a proof that is not base64", lambda: (_ssh_pub(SSH_KEYS["ed25519"]), CHALLENGE, "!!!")),
    ("an overlong proof", lambda: (_ssh_pub(SSH_KEYS["ed25519"]), CHALLENGE, "A" * 4096)),
    (
        "a raw signature over the bare challenge (no domain separation)",
        lambda: (
            _ssh_pub(SSH_KEYS["ed25519"]),
            CHALLENGE,
            __import__("base64").b64encode(SSH_KEYS["ed25519"].sign(CHALLENGE.encode())).decode(),
        ),
    ),
    ("a key that does not parse", lambda: ("ssh-ed25519 AAAA", CHALLENGE, "AAAA")),
]


@pytest.mark.parametrize("make", [c[1] for c in SSH_BAD], ids=[c[0] for c in SSH_BAD])
def test_ssh_proof_refused(make: Callable[[], tuple[str, str, str]]) -> None:
    key, challenge, proof = make()
    with pytest.raises(PossessionError) as info:
        verify_ssh_possession(key, challenge, proof)
    assert info.value.code == "ssh_key_proof_invalid"


def test_a_join_loads_each_public_key_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The body's keys are loaded when the body is decoded (validators); the proofs of the
    # same join use those keys instead of loading them a second time.
    from gateway.protocol import validators
    from gateway.protocol.types import decode_host_params

    loads: list[str] = []

    def counting(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def load(data: bytes, *args: object, **kw: object) -> object:
            loads.append(name)
            return real(data, *args, **kw)

        return load

    for module in (validators, serialization):
        for name in ("load_pem_public_key", "load_ssh_public_key"):
            monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    # The check loads an agent's Ed25519 line through its short cut (``load_ssh_key``).
    monkeypatch.setattr(
        validators, "load_ssh_key", counting("load_ssh_key", validators.load_ssh_key)
    )
    node, ssh = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    body = {
        "role": "Node",
        "public_ssh_key": _ssh_pub(ssh),
        "public_tls_key": _pub_pem(node),
        "csr": make_csr(node),
        "ssh_key_proof": sign_ssh_possession(ssh, CHALLENGE),
    }
    host = decode_host_params(body, "host", lists_required=False)
    assert host.csr is not None and host.ssh_key_proof is not None
    verify_csr(host.csr, host.public_tls_key)
    verify_ssh_possession(host.public_ssh_key, CHALLENGE, host.ssh_key_proof)
    assert sorted(loads) == ["load_pem_public_key", "load_ssh_key"]
    # Kept by the exact text loaded: a line with a trailing space (the check loads it
    # stripped, the proof's check as it came) is loaded again, as it always was.
    padded = _ssh_pub(ssh) + " "
    validators.check_ssh_public_key(padded, "host.public_ssh_key")
    loads.clear()
    verify_ssh_possession(padded, CHALLENGE, host.ssh_key_proof)
    assert loads == ["load_ssh_public_key"]
    # Bounded: the oldest go first.
    for _ in range(validators._MAX_KEPT_KEYS):
        validators.check_tls_public_key(_pub_pem(ed25519.Ed25519PrivateKey.generate()), "k")
    assert len(validators._tls_keys) == validators._MAX_KEPT_KEYS
    assert validators.checked_tls_key(host.public_tls_key.encode()) is None
