"""atheris target: the strict DER reader against asn1crypto on arbitrary bytes.

    python tests/fuzz/der_reader.py [-atheris_runs=N] [libFuzzer flags] [corpus dirs]

Seeded with the real Azure documents (tests/data/azure-real/attested/) written into the
corpus directory when it is empty (a temporary one when none is given), so libFuzzer
mutates real structure rather than starting from nothing. For every input:

* the reader raises nothing but ``BadRequest(attested_malformed)``;
* when both the reader and asn1crypto parse it, they extract the same fields;
* when only the reader parses it, the verification steps that follow parsing must refuse
  it (the reader may be stricter than asn1crypto, never laxer).

A failed assertion or any other exception is a crash: libFuzzer prints the input and
exits non-zero. tests/security/test_der_differential.py runs this briefly.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

with atheris.instrument_imports():  # coverage feedback from our code, not the libraries'
    from gateway.azure.attested import (
        check_digest_algorithm,
        check_signature,
        check_single_signer,
        find_signer_certificate,
    )
    from gateway.azure.certs import fingerprint
    from gateway.azure.cms import SignedDataView, parse_signed_data
    from gateway.azure.cms_shape import read_signed_data
    from gateway.core.errors import BadRequest, Code, GatewayError

REAL_ATTESTED = ROOT / "tests" / "data" / "azure-real" / "attested"


def _fields(view: SignedDataView) -> tuple[object, ...]:
    return (
        view.content_type,
        view.content,
        tuple(fingerprint(c) for c in view.certificates),
        view.certificate_issuers,
        view.signer_infos,
    )


def one_input(data: bytes) -> None:
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
    raise AssertionError("the reader parsed a signed document asn1crypto refuses")


def _seed(corpus: Path) -> None:
    """Write the real documents' DER into an empty corpus directory."""
    if any(corpus.iterdir()):
        return
    for doc in sorted(REAL_ATTESTED.glob("*.json")):
        signature = json.loads(doc.read_text())["signature"]
        try:
            der = base64.b64decode(signature, validate=True)
        except ValueError:
            continue  # the armoured fixture: its body is one of the others anyway
        (corpus / doc.stem).write_bytes(der)


def main() -> None:
    args = list(sys.argv)
    corpora = [Path(a) for a in args[1:] if not a.startswith("-")]
    if not corpora:
        # No corpus given: a fresh one (left behind, so a long run can be resumed).
        corpora = [Path(tempfile.mkdtemp(prefix="der-reader-corpus-"))]
        args.append(str(corpora[0]))
    for corpus in corpora:
        corpus.mkdir(parents=True, exist_ok=True)
        _seed(corpus)
    if not any(a.startswith("-max_len=") for a in args):
        args.append("-max_len=16384")  # the real documents are ~3 KB; room to grow
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
