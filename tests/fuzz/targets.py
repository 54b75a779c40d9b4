"""atheris fuzz targets for the parsers that read request bytes (issue 8).

Each target feeds libFuzzer's bytes to one parser and fails on any exception that is not
the module's own error: ``gateway.azure.cms`` (``BadRequest``), the strict DER reader
``gateway.azure.cms_shape`` against asn1crypto (``der``: differential), the certificate loader
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
    from gateway.azure.attested import (
        check_digest_algorithm,
        check_signature,
        check_single_signer,
        find_signer_certificate,
    )
    from gateway.azure.certs import (
        CertificateUnreadable,
        ca_issuers_urls,
        common_name,
        fingerprint,
        is_self_signed,
        key_refusal,
        load_der_certificate,
    )
    from gateway.azure.cms import SignedDataView, parse_signed_data
    from gateway.azure.cms_shape import read_signed_data
    from gateway.azure.token import peek_token, verify_access_token

from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.cloud import CLOUDS
from gateway.core.errors import BadRequest, Code, GatewayError

__all__ = ["TARGETS", "write_seeds"]

_REPO = Path(__file__).resolve().parents[2]
_REAL = _REPO / "tests" / "data" / "azure-real"
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
_KID = "fuzz-kid"


def fuzz_cms(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        parse_signed_data(data)


def _fields(view: SignedDataView) -> tuple[object, ...]:
    return (
        view.content_type,
        view.content,
        tuple(fingerprint(c) for c in view.certificates),
        view.certificate_issuers,
        view.signer_infos,
    )


def fuzz_der(data: bytes) -> None:
    """The strict DER reader (``cms_shape``) against asn1crypto: it raises only
    ``attested_malformed``; when both parse, they agree on every field; when only the
    reader parses, the verification steps must refuse the document (the reader may be
    stricter than asn1crypto, never laxer). tests/security/test_der_differential.py is
    the hypothesis side of the same property."""
    try:
        mine = read_signed_data(data)
    except BadRequest as exc:
        assert exc.code == Code.ATTESTED_MALFORMED, exc.code
        return
    try:
        oracle = parse_signed_data(data)
    except BadRequest:
        oracle = None
    if oracle is not None:
        assert _fields(mine) == _fields(oracle), "the readers disagree"
        return
    try:
        signer = check_single_signer(mine)
        cert = find_signer_certificate(mine, signer)
        check_digest_algorithm(signer)
        check_signature(mine, signer, cert)
    except GatewayError:
        return
    raise AssertionError("the strict reader parsed a signed document asn1crypto refuses")


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
    "der": fuzz_der,
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_seeds(target: str, directory: Path) -> None:
    """A few valid inputs for ``target`` in ``directory`` (libFuzzer's corpus)."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    if target in ("cms", "der"):
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
