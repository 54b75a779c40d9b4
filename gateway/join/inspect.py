"""``join-gateway inspect``: verify a captured attested document and/or access token offline,
step by step, and say which check fails — what an operator needs when a join is refused.

It runs the gateway's own step table (``gateway.join.pipeline.JOIN_STEPS``, recording every
step instead of stopping at the first failure) with the clock pinned where the operator
asks (``--at``, ``--at-created``), against the bundled trust plus ``--ca-bundle`` files and
the ``--jwks`` keys. With a token it also runs the offline binding (a supported resource
type, the document's subscription); the steps that need a join request, token files or
Resource Manager are reported skipped, with why. Offline unless ``--aia``.

Exit codes: 0 accepted; 1 rejected — any readable input that is wrong, with its code (a
``--jwks`` that holds no usable key refuses the token for an unknown key); 2 usage: bad
arguments, unreadable files, or a ``--ca-bundle`` without a certificate (trust the
operator configures, like a flag: it is not evidence).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TextIO

import aiohttp

from gateway.azure.aia import AiaFetcher
from gateway.azure.attested import AttestedVerifier, decode_signature, parse_content
from gateway.azure.certs import TrustStore
from gateway.azure.cms import parse_signed_data
from gateway.azure.jwks import StaticKeys, TokenVerifier
from gateway.azure.token import parse_jwks
from gateway.core.clock import Clock, FixedClock, SystemClock
from gateway.core.cloud import CLOUDS, CloudProfile
from gateway.core.errors import BadRequest, Code, GatewayError
from gateway.core.steps import StepResult
from gateway.join.pipeline import EvidenceReport, inspect_evidence

__all__ = ["InspectReport", "TokenFacts", "add_arguments", "run"]

logger = logging.getLogger(__name__)

EXIT_ACCEPTED = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2

_MARK = {"ok": "✓", "failed": "✗", "skipped": "-"}


class _UsageError(Exception):
    """Bad arguments or unreadable input: exit 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attested",
        metavar="FILE",
        type=Path,
        help='IMDS attested-data response ({"encoding":"pkcs7","signature":...}) or bare base64',
    )
    parser.add_argument(
        "--nonce",
        help="expected nonce (the challenge; write --nonce=VALUE, as a challenge may begin "
        "with '-'); omitted: not checked",
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--at", metavar="RFC3339", help="verify as of this time (default: now)")
    when.add_argument(
        "--at-created", action="store_true", help="verify as of the document's createdOn"
    )
    parser.add_argument(
        "--ca-bundle",
        metavar="PEMFILE",
        type=Path,
        action="append",
        default=[],
        help="extra trust (self-signed → roots, others → intermediates); repeatable",
    )
    parser.add_argument("--cloud", choices=sorted(CLOUDS), default="public")
    parser.add_argument("--token", metavar="JWT_FILE", type=Path, help="managed-identity token")
    parser.add_argument("--jwks", metavar="JWKS_FILE", type=Path, help="the tenant's JWKS")
    parser.add_argument(
        "--tenant", action="append", default=[], help="allowed tenant (repeatable; token only)"
    )
    parser.add_argument(
        "--no-require-subscription",
        action="store_true",
        help="accept documents without subscriptionId (old IMDS api-versions)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    aia = parser.add_mutually_exclusive_group()
    aia.add_argument(
        "--aia", dest="aia", action="store_true", help="fetch missing intermediates (network)"
    )
    aia.add_argument("--no-aia", dest="aia", action="store_false", help="offline (default)")
    parser.set_defaults(aia=False)


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the inspection described by ``args``; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        report = _inspect(args)
    except _UsageError as exc:
        print(f"inspect: {exc}", file=err)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True), file=out)
    else:
        _print_text(report, out)
    return EXIT_ACCEPTED if report.verdict == "accepted" else EXIT_REJECTED


@dataclass(frozen=True)
class TokenFacts:
    """The verified access token's claims an operator needs (never the token itself)."""

    tid: str
    oid: str
    iss: str
    aud: str
    xms_mirid: str | None
    xms_az_rid: str | None
    exp: str


@dataclass(frozen=True)
class InspectReport:
    """What ``inspect`` prints (``--json``: :meth:`to_json`). The document's fields are
    shown even when it did not verify, so an operator sees what a bad document claims."""

    verdict: Literal["accepted", "rejected"]
    code: Code | None
    at: str
    clock: str
    cloud: str
    checks: tuple[StepResult, ...]
    vm_id: str | None = None
    subscription_id: str | None = None
    nonce: str | None = None
    created_on: str | None = None
    expires_on: str | None = None
    signer: str | None = None
    chain: tuple[str, ...] = ()
    token: TokenFacts | None = None
    resource_id: str | None = None  # the VM or scale set the token names

    def to_json(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "code": None if self.code is None else str(self.code),
            "at": self.at,
            "clock": self.clock,
            "cloud": self.cloud,
            "vm_id": self.vm_id,
            "subscription_id": self.subscription_id,
            "nonce": self.nonce,
            "created_on": self.created_on,
            "expires_on": self.expires_on,
            "signer": self.signer,
            "chain": list(self.chain),
            "resource_id": self.resource_id,
            "token": None if self.token is None else dataclasses.asdict(self.token),
            "checks": [
                {
                    "name": c.name,
                    "status": c.status,
                    "detail": c.detail,
                    "code": None if c.code is None else str(c.code),
                }
                for c in self.checks
            ],
        }


# --------------------------------------------------------------------------- internals


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read {what} {path}: {exc}") from exc


def _malformed(path: Path, why: str) -> BadRequest:
    return BadRequest(Code.ATTESTED_MALFORMED, detail=f"{path}: {why}")


def _signature_from_file(path: Path) -> str | BadRequest:
    """The IMDS response's signature, or bare base64. A readable file that holds neither
    is evidence the gateway would refuse (``attested_malformed``), not a usage error."""
    text = _read(path, "attested document").strip()
    if not text:
        return _malformed(path, "the file is empty")
    if not text.startswith("{"):
        return text
    try:
        doc = json.loads(text)
    except ValueError as exc:
        return _malformed(path, f"not JSON: {exc}")
    sig = doc.get("signature") if isinstance(doc, dict) else None
    if not isinstance(sig, str):
        return _malformed(path, "no string 'signature' field")
    encoding = doc.get("encoding", "pkcs7")
    if encoding != "pkcs7":
        # IMDS answers {"encoding":"pkcs7",...}; the gateway takes nothing else either.
        return _malformed(path, f"encoding {str(encoding)[:40]!r} is not pkcs7")
    return sig


def _created_on(signature: str) -> datetime | None:
    """createdOn read without verifying anything: only to pin the clock (--at-created)."""
    try:
        view = parse_signed_data(decode_signature(signature))
        return parse_content(view.content, require_subscription=False).created_on
    except GatewayError:
        return None


def _clock(args: argparse.Namespace, signature: str | None) -> tuple[Clock, str]:
    if args.at:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError as exc:
            raise _UsageError(f"--at {args.at!r} is not RFC 3339") from exc
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return FixedClock(at), "--at"
    if args.at_created:
        created = _created_on(signature) if signature is not None else None
        if created is not None:
            return FixedClock(created), "document createdOn"
        return SystemClock(), "now (createdOn unreadable)"
    return SystemClock(), "now"


def _keys(args: argparse.Namespace) -> StaticKeys:
    """The ``--jwks`` keys. A readable file that holds no usable JWKS is not a usage
    error: the token is then refused as the gateway would refuse it, for an unknown key."""
    text = _read(args.jwks, "JWKS")
    try:
        return StaticKeys(parse_jwks(json.loads(text)))
    except (ValueError, RecursionError) as exc:
        return StaticKeys({}, problem=f"{args.jwks} is not a JWKS: {str(exc)[:200]}")


def _inspect(args: argparse.Namespace) -> InspectReport:
    if args.attested is None and args.token is None:
        raise _UsageError("give --attested FILE and/or --token JWT_FILE --jwks JWKS_FILE")
    if (args.token is None) != (args.jwks is None):
        raise _UsageError("--token and --jwks go together")
    cloud = CLOUDS[args.cloud]
    document = _signature_from_file(args.attested) if args.attested is not None else None
    signature = document if isinstance(document, str) else None
    clock, clock_source = _clock(args, signature)
    try:
        trust = TrustStore.load(tuple(args.ca_bundle))
    except (OSError, ValueError) as exc:
        raise _UsageError(f"trust material: {exc}") from exc
    access_token = None
    verifier = None
    if args.token is not None:
        access_token = _read(args.token, "token").strip()
        verifier = TokenVerifier(
            _keys(args), cloud=cloud, clock=clock, allowed_tenants=tuple(args.tenant)
        )
    evidence = asyncio.run(
        _evidence(
            args,
            cloud=cloud,
            trust=trust,
            clock=clock,
            signature=signature,
            document_error=document if isinstance(document, BadRequest) else None,
            access_tokens=verifier,
            access_token=access_token,
        )
    )
    return _report(evidence, at=clock.now(), clock=clock_source, cloud=cloud)


async def _evidence(
    args: argparse.Namespace,
    *,
    cloud: CloudProfile,
    trust: TrustStore,
    clock: Clock,
    signature: str | None,
    document_error: GatewayError | None,
    access_tokens: TokenVerifier | None,
    access_token: str | None,
) -> EvidenceReport:
    async def go(fetcher: AiaFetcher | None) -> EvidenceReport:
        attested = AttestedVerifier(
            cloud=cloud,
            trust=trust,
            aia=fetcher,
            chain_cache=None,
            clock=clock,
            require_subscription=not args.no_require_subscription,
        )
        try:
            return await inspect_evidence(
                clock=clock,
                attested=attested,
                access_tokens=access_tokens,
                signature=signature,
                document_error=document_error,
                expected_nonce=args.nonce,
                access_token=access_token,
            )
        finally:
            attested.close()  # its chain-building threads

    if not args.aia:
        return await go(None)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await go(AiaFetcher(session, clock=clock))


def _report(
    evidence: EvidenceReport, *, at: datetime, clock: str, cloud: CloudProfile
) -> InspectReport:
    code = evidence.code
    doc = evidence.document
    content = doc.content if doc is not None else None
    claims = evidence.claims
    return InspectReport(
        verdict="accepted" if code is None else "rejected",
        code=code,
        at=at.isoformat(),
        clock=clock,
        cloud=cloud.name,
        checks=evidence.checks,
        vm_id=content.vm_id if content else None,
        subscription_id=content.subscription_id if content else None,
        nonce=content.nonce if content else None,
        created_on=content.created_on.isoformat() if content else None,
        expires_on=content.expires_on.isoformat() if content else None,
        signer=doc.signer_cn if doc is not None else None,
        chain=doc.chain.subjects if doc is not None and doc.chain is not None else (),
        token=None
        if claims is None
        else TokenFacts(
            tid=claims.tid,
            oid=claims.oid,
            iss=claims.iss,
            aud=claims.aud,
            xms_mirid=claims.xms_mirid,
            xms_az_rid=claims.xms_az_rid,
            exp=datetime.fromtimestamp(claims.exp, tz=UTC).isoformat(),
        ),
        resource_id=evidence.resource.raw if evidence.resource is not None else None,
    )


def _print_text(report: InspectReport, out: TextIO) -> None:
    print(f"inspect at {report.at} ({report.clock}), cloud {report.cloud}", file=out)
    for check in report.checks:
        code = f" [{check.code}]" if check.code else ""
        print(f"{_MARK[check.status]} {check.name}: {check.detail}{code}", file=out)
    suffix = f": {report.code}" if report.code else ""
    print(f"{report.verdict.upper()}{suffix}", file=out)
