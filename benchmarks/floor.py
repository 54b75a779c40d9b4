"""The floor: CPU per join of the work no implementation can skip.

Every join costs the gateway, at the very least, one TLS handshake as the server (with its
ECDSA P-256 certificate), one RSA-2048 PKCS#1 v1.5 / SHA-256 verify of the attested
document's signature, and one RS256 verify of the managed-identity token. Everything else
(parsing, HTTP, ARM, the auth-service call, bookkeeping) is overhead an implementation can
shrink. The gateway's CPU per join is reported as a multiple of this floor.

Measured in the benchmark process, single-threaded, while the storm is not running, with
per-thread CPU time (``time.thread_time``) around the server side's calls only. The
inputs are real: the gateway's own certificate and key and TLS settings
(``gateway.core.tlsutil.server_ssl_context``), a document and a token fresh from the emulator.
"""

from __future__ import annotations

import hashlib
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.azure.attested import decode_signature, find_signer_certificate
from gateway.azure.cms import parse_signed_data
from gateway.core.tlsutil import client_ssl_context, server_ssl_context

__all__ = [
    "Floor",
    "measure_floor",
    "rs256_verify_cost",
    "rsa_document_verify_cost",
    "tls_handshake_cost",
]


@dataclass(frozen=True)
class Floor:
    """Mean CPU seconds per operation, and their sum (the floor per join)."""

    tls_handshake_s: float
    rsa_verify_s: float
    rs256_verify_s: float
    samples: int

    @property
    def per_join_s(self) -> float:
        return self.tls_handshake_s + self.rsa_verify_s + self.rs256_verify_s

    def to_json(self) -> dict[str, float | int]:
        return {
            "tls_handshake_s": self.tls_handshake_s,
            "rsa2048_document_verify_s": self.rsa_verify_s,
            "rs256_token_verify_s": self.rs256_verify_s,
            "per_join_s": self.per_join_s,
            "samples": self.samples,
        }


def _timed(fn: Callable[[], None], samples: int) -> float:
    """Mean thread CPU time per call (the gateway's figure is a mean too)."""
    fn()  # warm-up: first-call costs (lazy key loading, imports) are not per-join work
    t0 = time.thread_time()
    for _ in range(samples):
        fn()
    return (time.thread_time() - t0) / samples


def tls_handshake_cost(cert_file: Path, key_file: Path, ca_file: Path, samples: int) -> float:
    """Server-side CPU of one full handshake (no resumption), over in-memory BIOs."""
    server_ctx = server_ssl_context(cert_file, key_file)
    client_ctx = client_ssl_context(ca_file=ca_file)

    def one() -> float:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        server_cpu = 0.0
        client_done = server_done = False
        for _ in range(20):
            if not client_done:
                try:
                    client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            if not server_done:
                t0 = time.thread_time()
                try:
                    server.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
                server_cpu += time.thread_time() - t0
            c_in.write(s_out.read())
            if client_done and server_done:
                return server_cpu
        raise RuntimeError("in-memory TLS handshake did not finish")

    one()
    return statistics.fmean(one() for _ in range(samples))


def rsa_document_verify_cost(attested: dict[str, Any], samples: int) -> float:
    """One RSA-2048 PKCS#1 v1.5 / SHA-256 verify of a real attested document's signature."""
    view = parse_signed_data(decode_signature(str(attested["signature"])))
    signer = view.signer_infos[0]
    cert = find_signer_certificate(view, signer)
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise RuntimeError("the emulator's document signer is not RSA")
    attrs = signer.signed_attrs
    digest = hashlib.sha256(attrs.der if attrs is not None else view.content).digest()
    signature = signer.signature
    key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))

    def one() -> None:
        key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))

    return _timed(one, samples)


def rs256_verify_cost(token: str, jwks: dict[str, Any], samples: int) -> float:
    """One RS256 verify of a real token with PyJWT (signature and claims, audience aside)."""
    kid = jwt.get_unverified_header(token).get("kid")
    jwk = next((k for k in jwks.get("keys", []) if k.get("kid") == kid), None)
    if jwk is None:
        raise RuntimeError("the token's signing key is not in the tenant's JWKS")
    key = jwt.PyJWK(jwk).key
    options = {"verify_aud": False}

    def one() -> None:
        jwt.decode(token, key, algorithms=["RS256"], options=options)  # type: ignore[arg-type]

    one()  # raises if it does not verify
    return _timed(one, samples)


def measure_floor(
    *,
    cert_file: Path,
    key_file: Path,
    ca_file: Path,
    attested: dict[str, Any],
    token: str,
    jwks: dict[str, Any],
    samples: int = 300,
) -> Floor:
    return Floor(
        tls_handshake_s=tls_handshake_cost(cert_file, key_file, ca_file, samples),
        rsa_verify_s=rsa_document_verify_cost(attested, samples),
        rs256_verify_s=rs256_verify_cost(token, jwks, samples),
        samples=samples,
    )
