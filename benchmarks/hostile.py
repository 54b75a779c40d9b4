"""Hostile requests' CPU next to a normal join's (issue 8: bounded cost per request).

Runs the security corpus's dev stack in this process (emulator, auth service and gateway on
loopback, ``tests/security/harness.py``) and sends, over HTTPS, normal joins and each
hostile request class whose cost issue 8 bounded: its chain-building reproducer (self-issued
CAs sharing one name and one RSA-3072 key with a ~3,070-bit public exponent) under an Azure
name and under another name, a signer with such a key, the most candidates the path builder
can still get (four known-named intermediates), a leaf with 300 caIssuers URLs, and a
repeated hostile chain. Every hostile document is forged fresh per request (outside the
measurement), so no cache helps unless the case is about the cache.

CPU is ``time.process_time`` around one HTTPS exchange: every thread of this process, so it
includes the client's half of TLS (and, for the normal join, the emulator's ARM answers
and the auth service's certificate issuing): the same yardstick for every row, and an
upper bound of the gateway's own share. The reference row runs cryptography's path builder
as the gateway did before (no key, name or depth limits) on the reproducer, once.

Writes DIR/results.json and DIR/hostile.png (default benchmarks/results/hostile), prints a
table with each case's ratio to the normal join. Small and fast: a few seconds.

    python benchmarks/hostile.py [--samples 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gateway.azure.attested import MAX_SIGNATURE_CHECKS
from tests.security.harness import Body, Harness, open_harness
from tests.support.cms_forge import (
    AZURE_CA_NAME,
    Issued,
    forge,
    huge_exponent_key,
    issue_ca,
    issue_leaf,
    lookalike_cas,
)

__all__ = ["CASES", "main", "run"]

KNOWN_NAME = AZURE_CA_NAME
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "hostile"

Prepare = Callable[[Harness], Awaitable[Body]]


@dataclass(frozen=True)
class Case:
    name: str
    prepare: Prepare
    status: int


async def _signed(h: Harness, leaf: Issued, intermediates: Sequence[Issued] | None) -> Body:
    challenge = await h.challenge()
    body = h.body(challenge, signature=forge(leaf, h.content(challenge)))
    if intermediates is not None:
        body["intermediates"] = [base64.b64encode(c.der).decode() for c in intermediates]
    return body


_HUGE: list[Any] = []


def _huge() -> Any:
    if not _HUGE:
        _HUGE.append(huge_exponent_key())
    return _HUGE[0]


def _reproducer_cas(name: str) -> list[Issued]:
    return lookalike_cas(name, _huge())


async def normal_join(h: Harness) -> Body:
    return h.body(await h.challenge())


async def reproducer_known(h: Harness) -> Body:
    cas = _reproducer_cas(KNOWN_NAME)
    return await _signed(h, issue_leaf(cas[0]), cas)


async def reproducer_other_name(h: Harness) -> Body:
    cas = _reproducer_cas(f"Forged Issuing CA {secrets.token_hex(2)}")
    return await _signed(h, issue_leaf(cas[0]), cas)


async def huge_exponent_signer(h: Harness) -> Body:
    return await _signed(h, issue_leaf(h.intermediate, key=_huge()), None)


async def four_known_intermediates(h: Harness) -> Body:
    root = issue_ca("Microsoft RSA Root Certificate Authority 2017", key=h.intermediate.key)
    cas = [issue_ca(KNOWN_NAME, key=h.intermediate.key, issuer=root) for _ in range(4)]
    return await _signed(h, issue_leaf(cas[0]), cas)


async def many_ca_issuers(h: Harness) -> Body:
    tag = secrets.token_hex(3)
    urls = [f"{h.emulator.aia_prefix}{tag}{i:x}" for i in range(300)]
    return await _signed(h, issue_leaf(issue_ca("Forged Issuing CA 77"), aia_urls=urls), [])


_REPEATED: list[tuple[Issued, list[Issued]]] = []


async def repeated_hostile_chain(h: Harness) -> Body:
    if not _REPEATED:
        root = issue_ca("Microsoft RSA Root Certificate Authority 2017", key=h.intermediate.key)
        cas = [issue_ca(KNOWN_NAME, key=h.intermediate.key, issuer=root) for _ in range(4)]
        _REPEATED.append((issue_leaf(cas[0]), cas))
    leaf, cas = _REPEATED[0]
    return await _signed(h, leaf, cas)


CASES = [
    Case("normal join", normal_join, 200),
    Case("reproducer, Azure name (key refused)", reproducer_known, 403),
    Case("reproducer, other name (CAs dropped)", reproducer_other_name, 403),
    Case("signer with a huge exponent", huge_exponent_signer, 403),
    Case("4 known-named intermediates (max search)", four_known_intermediates, 403),
    Case("leaf with 300 caIssuers URLs", many_ca_issuers, 403),
    Case("repeated hostile chain (cached failure)", repeated_hostile_chain, 403),
]


@dataclass(frozen=True)
class Row:
    name: str
    cpu_ms: float  # median
    cpu_ms_max: float
    samples: int
    path_builder_calls: float  # per request
    untrusted_candidates: float
    aia_fetches: float


async def _measure(h: Harness, case: Case, samples: int) -> Row:
    verifier = h.stack.gateway.deps.attested
    cpu: list[float] = []
    before = (verifier.path_builder_calls, verifier.untrusted_candidates, verifier.aia_fetches)
    if case.prepare is repeated_hostile_chain:
        await h.join(await case.prepare(h))  # the first one builds; the rest are measured
        before = (verifier.path_builder_calls, verifier.untrusted_candidates, verifier.aia_fetches)
    for _ in range(samples):
        body = await case.prepare(h)
        data = json.dumps(body).encode()
        start = time.process_time()
        status, code = await h.post("/v1/join/azure", data)
        cpu.append((time.process_time() - start) * 1000)
        if status != case.status:
            raise SystemExit(f"{case.name}: expected {case.status}, got {status} {code}")
    after = (verifier.path_builder_calls, verifier.untrusted_candidates, verifier.aia_fetches)
    calls, cands, fetches = ((a - b) / samples for a, b in zip(after, before, strict=True))
    await h.assert_alive()
    return Row(
        case.name,
        round(statistics.median(cpu), 3),
        round(max(cpu), 3),
        samples,
        calls,
        cands,
        fetches,
    )


def unfiltered_reference_ms() -> float:
    """CPU of one path search over the reproducer as the gateway ran it before issue 8:
    cryptography's builder with its default depth and no key or name filter."""
    cas = _reproducer_cas(KNOWN_NAME)
    leaf = issue_leaf(cas[0])
    root = issue_ca("Forged Root Z1")
    verifier = (
        PolicyBuilder()
        .store(Store([root.cert]))
        .time(datetime.now(UTC))
        .build_server_verifier(x509.DNSName("metadata.azure.com"))
    )
    start = time.process_time()
    with contextlib.suppress(VerificationError):
        verifier.verify(leaf.cert, [c.cert for c in cas])
    return round((time.process_time() - start) * 1000, 1)


async def run(samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hostile-bench-") as tmp:
        async with open_harness(Path(tmp)) as h:
            # Warm up: the first join loads JWKS, the VM map and the chain.
            for _ in range(3):
                await h.join(await normal_join(h))
            rows = [await _measure(h, case, samples) for case in CASES]
    reference = unfiltered_reference_ms()
    normal = rows[0].cpu_ms
    hostile = rows[1:]
    worst = max(hostile, key=lambda r: r.cpu_ms)
    return {
        "description": "CPU per HTTPS request (time.process_time of the whole in-process "
        "stack: client, gateway, emulator, auth service), median of N samples",
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "samples": samples,
        "max_signature_checks_per_request": MAX_SIGNATURE_CHECKS,
        "rows": [r.__dict__ for r in rows],
        "normal_join_cpu_ms": normal,
        "worst_hostile": {"case": worst.name, "cpu_ms": worst.cpu_ms},
        "ratios_to_normal_join": {r.name: round(r.cpu_ms / normal, 2) for r in hostile},
        "worst_hostile_over_normal": round(worst.cpu_ms / normal, 2),
        "unfiltered_reproducer_search_ms": reference,
        "unfiltered_over_normal": round(reference / normal, 1),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in result["rows"]] + ["before issue 8: one reproducer search"]
    values = [r["cpu_ms"] for r in result["rows"]] + [result["unfiltered_reproducer_search_ms"]]
    colours = ["tab:green"] + ["tab:blue"] * (len(result["rows"]) - 1) + ["tab:red"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(names[::-1], values[::-1], color=colours[::-1])
    ax.set_xscale("log")
    ax.set_xlabel("CPU per request, ms (log scale)")
    ax.set_title("Hostile requests vs a normal join (median)")
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:g}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.samples))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(result, args.out / "hostile.png")
    head = ("case", "CPU ms", "max", "x normal", "builds", "cands", "AIA")
    print("{:<44} {:>8} {:>8} {:>9} {:>7} {:>6} {:>4}".format(*head))
    normal = result["normal_join_cpu_ms"]
    for r in result["rows"]:
        print(
            f"{r['name']:<44} {r['cpu_ms']:>8.2f} {r['cpu_ms_max']:>8.2f} "
            f"{r['cpu_ms'] / normal:>9.2f} {r['path_builder_calls']:>7.1f} "
            f"{r['untrusted_candidates']:>6.1f} {r['aia_fetches']:>4.1f}"
        )
    print(
        f"worst hostile: {result['worst_hostile']['case']} "
        f"{result['worst_hostile']['cpu_ms']} ms = {result['worst_hostile_over_normal']}x "
        f"a normal join ({normal} ms)"
    )
    print(
        f"before issue 8, one search over the reproducer: "
        f"{result['unfiltered_reproducer_search_ms']} ms = {result['unfiltered_over_normal']}x"
    )
    print(f"results: {args.out / 'results.json'}  plot: {args.out / 'hostile.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
