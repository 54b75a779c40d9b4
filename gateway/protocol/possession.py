"""Proof that a node holds the private keys it asks to have certified.

* **TLS key: a PKCS#10 CSR**, signed by that key. The CSR is only a proof: its subject,
  its requested extensions and names are ignored — the names in a certificate come from
  the auth service, never from the CSR. Checked: it parses (PEM, one request, bounded
  size), its self-signature verifies, and its public key is the very key being certified.
* **SSH key: a signature over the challenge**, made with the SSH key, over a
  domain-separated message (``join-gateway ssh-key-possession v1``, a NUL, the challenge)
  so that the signature can be used for nothing else. The challenge is fresh and
  single-use, so a proof cannot be replayed into another join. Ed25519, ECDSA (P-256/384/
  521 with the SHA-2 of its size) and RSA (PKCS#1 v1.5 with SHA-256) — the SSH key types
  the protocol accepts.

Both ends use these functions: the agent to make the proofs, the gateway to refuse a bad
proof before any Azure call, the auth service to check again before it signs.
"""

from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from gateway.protocol.validators import checked_ssh_key, checked_tls_key

__all__ = [
    "MAX_CSR_BYTES",
    "MAX_SSH_KEY_PROOF",
    "PossessionError",
    "make_csr",
    "sign_ssh_possession",
    "ssh_possession_message",
    "verify_csr",
    "verify_ssh_possession",
]

MAX_CSR_BYTES = 16 * 1024
MAX_SSH_KEY_PROOF = 1024
_CONTEXT = b"join-gateway ssh-key-possession v1\x00"

SshPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
TlsPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PossessionError(ValueError):
    """A proof failed; ``code`` is the stable error code (see the codes table)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _spki(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        raise PossessionError("csr_invalid", "the CSR's key is of an unsupported type")
    data: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def verify_csr(csr_pem: str, public_tls_key_pem: str) -> None:
    """Raise :class:`PossessionError` unless ``csr_pem`` is a valid self-signed request for
    exactly ``public_tls_key_pem`` (which the caller has already validated)."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise PossessionError("csr_invalid", f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    if csr_pem.count("-----BEGIN CERTIFICATE REQUEST-----") != 1:
        raise PossessionError("csr_invalid", "expected exactly one PEM CERTIFICATE REQUEST")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        valid = csr.is_signature_valid
        csr_key = csr.public_key()
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise PossessionError("csr_invalid", "the CSR does not parse") from exc
    if not valid:
        raise PossessionError("csr_invalid", "the CSR's signature does not verify")
    try:
        pem = public_tls_key_pem.encode("ascii")
        wanted = checked_tls_key(pem) or serialization.load_pem_public_key(pem)
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise PossessionError("csr_key_mismatch", "the TLS key does not parse") from exc
    if not _same_key(csr_key, wanted):
        raise PossessionError("csr_key_mismatch", "the CSR is for another key than public_tls_key")


def _same_key(csr_key: object, wanted: object) -> bool:
    """The two keys' SubjectPublicKeyInfo DER are equal.

    ``==`` of two cryptography keys (OpenSSL's ``EVP_PKEY_eq``: same type, parameters and
    public value) answers in ~1 µs where serialising both keys takes ~11; when it says
    equal the two DER encodings are equal, since they are made from exactly those. When
    it does not, the DER is compared as before, so no pair that was refused is accepted,
    nor the reverse."""
    return csr_key == wanted or _spki(csr_key) == _spki(wanted)


def make_csr(private_key: TlsPrivateKey) -> str:
    """A minimal CSR (subject ``CN=join-gateway node``, no extensions) for the agent."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "join-gateway node")])
    )
    algorithm = None if isinstance(private_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(private_key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def ssh_possession_message(challenge: str) -> bytes:
    return _CONTEXT + challenge.encode("ascii")


def _ecdsa_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    # RFC 5656 §6.2.1: the hash follows the curve size.
    if curve.key_size <= 256:
        return hashes.SHA256()
    if curve.key_size <= 384:
        return hashes.SHA384()
    return hashes.SHA512()


def sign_ssh_possession(private_key: SshPrivateKey, challenge: str) -> str:
    """The agent's proof for ``challenge``: base64 (standard, padded) of the signature."""
    message = ssh_possession_message(challenge)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        sig = private_key.sign(message)
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        sig = private_key.sign(message, ec.ECDSA(_ecdsa_hash(private_key.curve)))
    else:
        sig = private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(sig).decode("ascii")


def verify_ssh_possession(public_ssh_key: str, challenge: str, proof: str) -> None:
    """Raise :class:`PossessionError` (``ssh_key_proof_invalid``) unless ``proof`` is a
    signature over ``challenge`` by ``public_ssh_key`` (an OpenSSH public key line)."""
    if not proof or len(proof) > MAX_SSH_KEY_PROOF:
        raise PossessionError("ssh_key_proof_invalid", "the SSH key proof is empty or too long")
    try:
        sig = base64.b64decode(proof.encode("ascii"), validate=True)
        line = public_ssh_key.encode("ascii")
        key = checked_ssh_key(line) or serialization.load_ssh_public_key(line)
    except (ValueError, binascii.Error, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise PossessionError("ssh_key_proof_invalid", "the SSH key proof does not decode") from exc
    message = ssh_possession_message(challenge)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, message, ec.ECDSA(_ecdsa_hash(key.curve)))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise PossessionError("ssh_key_proof_invalid", "unsupported SSH key type")
    except InvalidSignature as exc:
        raise PossessionError(
            "ssh_key_proof_invalid", "the SSH key proof does not verify with public_ssh_key"
        ) from exc
