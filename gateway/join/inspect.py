"""``join-gateway inspect``: verify a captured attested document and/or access token offline,
step by step, and say which check fails — what an operator needs when a join is refused.

It runs the very checks the gateway runs (``AttestedVerifier.inspect`` calls the same step
functions as ``verify``; the token goes through ``verify_access_token``) with the clock
pinned where the operator asks (``--at``, ``--at-created``), against the bundled trust plus
``--ca-bundle`` files. Offline unless ``--aia``: nothing is fetched by default.

Exit codes: 0 accepted, 1 rejected, 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from gateway.azure.aia import AiaFetcher
from gateway.azure.attested import (
    AttestedVerifier,
    CheckResult,
    Inspection,
    decode_signature,
    parse_content,
)
from gateway.azure.certs import TrustStore
from gateway.azure.cms import parse_signed_data
from gateway.azure.token import parse_jwks, verify_access_token
from gateway.core.clock import Clock, FixedClock, SystemClock
from gateway.core.cloud import CLOUDS, CloudProfile
from gateway.core.errors import GatewayError

__all__ = ["add_arguments", "run"]

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
    parser.add_argument("--nonce", help="expected nonce (the challenge); omitted: not checked")
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
        print(json.dumps(report, indent=2, sort_keys=True), file=out)
    else:
        _print_text(report, out)
    return EXIT_ACCEPTED if report["verdict"] == "accepted" else EXIT_REJECTED


# --------------------------------------------------------------------------- internals


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read {what} {path}: {exc}") from exc


def _signature_from_file(path: Path) -> str:
    text = _read(path, "attested document").strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise _UsageError(f"{path} is not JSON: {exc}") from exc
        sig = doc.get("signature") if isinstance(doc, dict) else None
        if not isinstance(sig, str):
            raise _UsageError(f"{path} has no string 'signature' field")
        encoding = doc.get("encoding", "pkcs7")
        if encoding != "pkcs7":
            raise _UsageError(f"{path}: encoding {encoding!r} is not pkcs7")
        return sig
    if not text:
        raise _UsageError(f"{path} is empty")
    return text


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


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    if args.attested is None and args.token is None:
        raise _UsageError("give --attested FILE and/or --token JWT_FILE --jwks JWKS_FILE")
    if (args.token is None) != (args.jwks is None):
        raise _UsageError("--token and --jwks go together")
    cloud = CLOUDS[args.cloud]
    signature = _signature_from_file(args.attested) if args.attested is not None else None
    clock, clock_source = _clock(args, signature)
    try:
        trust = TrustStore.load(tuple(args.ca_bundle))
    except (OSError, ValueError) as exc:
        raise _UsageError(f"trust material: {exc}") from exc
    token_input = None
    if args.token is not None and args.jwks is not None:
        jwt_text = _read(args.token, "token").strip()
        try:
            jwks_doc = json.loads(_read(args.jwks, "JWKS"))
        except ValueError as exc:
            raise _UsageError(f"{args.jwks} is not JSON: {exc}") from exc
        if not isinstance(jwks_doc, dict):
            raise _UsageError(f"{args.jwks} is not a JWKS object")
        try:
            token_input = (jwt_text, parse_jwks(jwks_doc))
        except ValueError as exc:
            raise _UsageError(f"{args.jwks}: {exc}") from exc

    report: dict[str, Any] = {
        "verdict": "accepted",
        "code": None,
        "at": clock.now().isoformat(),
        "clock": clock_source,
        "cloud": cloud.name,
        "vm_id": None,
        "subscription_id": None,
        "nonce": None,
        "created_on": None,
        "expires_on": None,
        "signer": None,
        "chain": [],
        "checks": [],
        "token": None,
    }
    checks: list[CheckResult] = []
    first_error: GatewayError | None = None
    if signature is not None:
        inspection = asyncio.run(
            _inspect_document(
                signature,
                cloud=cloud,
                trust=trust,
                clock=clock,
                nonce=args.nonce,
                aia=args.aia,
                require_subscription=not args.no_require_subscription,
            )
        )
        checks.extend(inspection.checks)
        first_error = inspection.error
        _fill_document(report, inspection)
    if token_input is not None:
        jwt_text, keys = token_input
        try:
            claims = verify_access_token(
                jwt_text,
                keys=keys,
                cloud=cloud,
                now=clock.time(),
                allowed_tenants=tuple(args.tenant),
            )
        except GatewayError as exc:
            checks.append(CheckResult("token", "failed", exc.detail, exc.code))
            first_error = first_error or exc
        else:
            checks.append(CheckResult("token", "ok", f"tenant {claims.tid}, issuer {claims.iss}"))
            report["token"] = {
                "tid": claims.tid,
                "oid": claims.oid,
                "iss": claims.iss,
                "aud": claims.aud,
                "xms_mirid": claims.xms_mirid,
                "xms_az_rid": claims.xms_az_rid,
                "exp": datetime.fromtimestamp(claims.exp, tz=UTC).isoformat(),
            }
    if first_error is not None:
        report["verdict"] = "rejected"
        report["code"] = str(first_error.code)
    report["checks"] = [
        {"name": c.name, "status": c.status, "detail": c.detail, "code": c.code and str(c.code)}
        for c in checks
    ]
    return report


async def _inspect_document(
    signature: str,
    *,
    cloud: CloudProfile,
    trust: TrustStore,
    clock: Clock,
    nonce: str | None,
    aia: bool,
    require_subscription: bool,
) -> Inspection:
    async def go(fetcher: AiaFetcher | None) -> Inspection:
        verifier = AttestedVerifier(
            cloud=cloud,
            trust=trust,
            aia=fetcher,
            chain_cache=None,
            clock=clock,
            require_subscription=require_subscription,
        )
        return await verifier.inspect(signature, expected_nonce=nonce)

    if not aia:
        return await go(None)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await go(AiaFetcher(session, clock=clock))


def _fill_document(report: dict[str, Any], inspection: Inspection) -> None:
    content = inspection.content
    if content is not None:
        report.update(
            vm_id=content.vm_id,
            subscription_id=content.subscription_id,
            nonce=content.nonce,
            created_on=content.created_on.isoformat(),
            expires_on=content.expires_on.isoformat(),
        )
    report["signer"] = inspection.signer_cn
    if inspection.chain is not None:
        report["chain"] = list(inspection.chain.subjects)


def _print_text(report: dict[str, Any], out: TextIO) -> None:
    print(f"inspect at {report['at']} ({report['clock']}), cloud {report['cloud']}", file=out)
    for check in report["checks"]:
        code = f" [{check['code']}]" if check["code"] else ""
        print(f"{_MARK[check['status']]} {check['name']}: {check['detail']}{code}", file=out)
    verdict = report["verdict"].upper()
    suffix = f": {report['code']}" if report["code"] else ""
    print(f"{verdict}{suffix}", file=out)
