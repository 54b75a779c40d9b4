"""Differential: ``possession._same_key`` (``==`` first) against the comparison it
replaced, the two keys' SubjectPublicKeyInfo DER, over pairs of every supported type and
of types that must never compare equal (the same 32 bytes as Ed25519 and X25519, the
same point on two curves' encodings, a key from a CSR against the PEM it was made from)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519

from gateway.protocol.possession import _same_key, _spki, make_csr

_P256 = ec.generate_private_key(ec.SECP256R1())
_P384 = ec.generate_private_key(ec.SECP384R1())
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_RSA_E3 = rsa.generate_private_key(public_exponent=3, key_size=2048)
_ED = ed25519.Ed25519PrivateKey.generate()
_RAW = _ED.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _csr_key(
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> object:
    return x509.load_pem_x509_csr(make_csr(private).encode()).public_key()


def _pem_key(private: object) -> object:
    pem = private.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return serialization.load_pem_public_key(pem)


def _compressed(private: ec.EllipticCurvePrivateKey) -> object:
    point = private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    return ec.EllipticCurvePublicKey.from_encoded_point(private.curve, point)


PAIRS: list[tuple[str, Callable[[], tuple[object, object]]]] = [
    ("P-256 from its CSR and its PEM", lambda: (_csr_key(_P256), _pem_key(_P256))),
    ("P-256 from a compressed point", lambda: (_compressed(_P256), _pem_key(_P256))),
    (
        "two P-256 keys",
        lambda: (_csr_key(_P256), _pem_key(ec.generate_private_key(ec.SECP256R1()))),
    ),
    ("P-256 and P-384", lambda: (_csr_key(_P256), _pem_key(_P384))),
    ("P-384 from its CSR and its PEM", lambda: (_csr_key(_P384), _pem_key(_P384))),
    ("RSA from its CSR and its PEM", lambda: (_csr_key(_RSA), _pem_key(_RSA))),
    (
        "RSA, same modulus, other exponent",
        lambda: (
            _pem_key(_RSA),
            rsa.RSAPublicNumbers(3, _RSA.public_key().public_numbers().n).public_key(),
        ),
    ),
    ("two RSA keys", lambda: (_csr_key(_RSA), _pem_key(_RSA_E3))),
    ("Ed25519 from its CSR and its PEM", lambda: (_csr_key(_ED), _pem_key(_ED))),
    (
        "Ed25519 and X25519 of the same bytes",
        lambda: (_pem_key(_ED), x25519.X25519PublicKey.from_public_bytes(_RAW)),
    ),
    ("Ed25519 and Ed448", lambda: (_pem_key(_ED), _pem_key(ed448.Ed448PrivateKey.generate()))),
    ("Ed25519 and P-256", lambda: (_csr_key(_ED), _pem_key(_P256))),
    ("RSA and P-256", lambda: (_csr_key(_RSA), _pem_key(_P256))),
    ("P-256 and RSA", lambda: (_csr_key(_P256), _pem_key(_RSA))),
]


@pytest.mark.parametrize("make", [p[1] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_same_key_is_the_der_comparison(make: Callable[[], tuple[object, object]]) -> None:
    a, b = make()
    assert _same_key(a, b) == (_spki(a) == _spki(b))
    assert _same_key(b, a) == (_spki(a) == _spki(b))


def test_the_table_has_both_answers() -> None:
    answers = {_same_key(*make()) for _, make in PAIRS}
    assert answers == {True, False}
