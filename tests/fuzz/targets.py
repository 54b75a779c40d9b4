"""atheris fuzz targets for the parsers that read request bytes (issue 8).

Each target feeds libFuzzer's bytes to one parser and fails on any exception that is not
the module's own error: ``gateway.azure.cms`` (``BadRequest``), the certificate loader
(``CertificateUnreadable``; a certificate that loads must then survive every reader the
verifier applies to request intermediates), and the token parser (``GatewayError``).

Run one target: ``python -m tests.fuzz.targets cms -runs=5000 CORPUS_DIR`` (libFuzzer
flags after the target's name). ``make fuzz`` runs each for minutes;
``tests/fuzz/test_fuzz.py`` runs each for a fixed number of inputs inside ``make test``.
Seeds (:func:`write_seeds`) are real Azure documents, certificates and a signed token, so
mutations start inside the formats instead of at random bytes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["gateway.azure", "asn1crypto"]):
    from gateway.azure.certs import (
        CertificateUnreadable,
        ca_issuers_urls,
        common_name,
        fingerprint,
        is_self_signed,
        key_refusal,
        load_der_certificate,
    )
    from gateway.azure.cms import parse_signed_data
    from gateway.azure.token import peek_token, verify_access_token

from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.cloud import CLOUDS
from gateway.core.errors import BadRequest, GatewayError

__all__ = ["TARGETS", "write_seeds"]

_REPO = Path(__file__).resolve().parents[2]
_REAL = _REPO / "tests" / "data" / "azure-real"
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
_KID = "fuzz-kid"


def fuzz_cms(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        parse_signed_data(data)


def fuzz_certificate(data: bytes) -> None:
    try:
        cert = load_der_certificate(data)
    except CertificateUnreadable:
        return
    # What the verifier reads from a request intermediate that loaded: none may raise.
    common_name(cert.subject)
    key_refusal(cert)
    fingerprint(cert)
    is_self_signed(cert)
    ca_issuers_urls(cert)


def fuzz_token(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    for check in (
        lambda: peek_token(text),
        lambda: verify_access_token(
            text, keys={_KID: _KEY}, cloud=CLOUDS["public"], now=1_800_000_000.0
        ),
    ):
        with contextlib.suppress(GatewayError):
            check()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "cms": fuzz_cms,
    "certificate": fuzz_certificate,
    "token": fuzz_token,
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_seeds(target: str, directory: Path) -> None:
    """A few valid inputs for ``target`` in ``directory`` (libFuzzer's corpus)."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    if target == "cms":
        for doc in sorted((_REAL / "attested").glob("*.json"))[:4]:
            signature = json.loads(doc.read_text())["signature"]
            seeds.append(base64.b64decode(signature))
    elif target == "certificate":
        for pem in sorted((_REAL / "ca").glob("*.pem"))[:6]:
            body = "".join(ln for ln in pem.read_text().splitlines() if "-----" not in ln)
            seeds.append(base64.b64decode(body))
    else:
        header = {"alg": "RS256", "kid": _KID, "typ": "JWT"}
        payload = {
            "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47",
            "iss": "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
            "aud": "https://management.azure.com/",
            "exp": 1_800_003_600,
            "iat": 1_800_000_000,
            "nbf": 1_800_000_000,
            "oid": "o",
            "sub": "s",
        }
        token = ".".join(
            (
                _b64url(json.dumps(header).encode()),
                _b64url(json.dumps(payload).encode()),
                _b64url(b"\x00" * 256),
            )
        )
        seeds.append(token.encode())
    for i, seed in enumerate(seeds):
        (directory / f"seed-{i}").write_bytes(seed)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.targets {{{'|'.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
