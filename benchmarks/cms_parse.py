"""CPU per attested document: the strict DER reader against the asn1crypto baseline.

    python benchmarks/cms_parse.py [--rounds 3] [--iterations 300] [--out benchmarks/results/cms]

For each genuine real Azure document (tests/data/azure-real/, verified at its own
createdOn with its CA material as trust), in the same run and the same process:

* ``parse``: the envelope read alone — ``gateway.azure.cms.parse_signed_data``
  (asn1crypto, the baseline) and ``gateway.azure.cms_shape.read_signed_data`` (the
  strict reader, the product's path);
* ``verify``: :meth:`AttestedVerifier.verify` end to end (base64, parse, signer, digest,
  RSA, signer name, cached chain, content, window, nonce), once as shipped and once with
  its parse step pointed back at asn1crypto — the only difference between the two.

Per-thread CPU time (``time.thread_time_ns``) around batches of ``--iterations`` calls,
``--rounds`` rounds alternating the two paths; the figure is the median round's mean per
document. Prints a table, writes DIR/results.json and DIR/cms_parse.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python benchmarks/cms_parse.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway.azure.attested as attested_module
from gateway.azure.attested import AttestedVerifier, decode_signature
from gateway.azure.certs import TrustStore
from gateway.azure.cms import parse_signed_data
from gateway.azure.cms_shape import read_signed_data
from gateway.core.cache import MemoryCache
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS

__all__ = ["main", "measure"]

REAL = Path(__file__).resolve().parent.parent / "tests" / "data" / "azure-real"
PATHS = ("asn1crypto", "strict")


@contextlib.contextmanager
def _parser(name: str) -> Iterator[None]:
    """Point the verifier's parse step at the baseline for the duration (benchmark only:
    the product never switches parsers)."""
    if name == "strict":
        yield
        return
    namespace = vars(attested_module)
    saved = namespace["read_signed_data"]
    namespace["read_signed_data"] = parse_signed_data
    try:
        yield
    finally:
        namespace["read_signed_data"] = saved


def _cpu_per_call(fn: Callable[[], object], iterations: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(iterations):
        fn()
    return (time.thread_time_ns() - t0) / iterations / 1000.0


async def _acpu_per_call(fn: Callable[[], Awaitable[object]], iterations: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(iterations):
        await fn()
    return (time.thread_time_ns() - t0) / iterations / 1000.0


def _genuine() -> list[dict[str, Any]]:
    index: list[dict[str, Any]] = json.loads((REAL / "index.json").read_text())
    return [e for e in index if e["expected_verdict"] == "accept"]


async def _measure_verify(
    entry: dict[str, Any], trust: TrustStore, rounds: int, iterations: int
) -> dict[str, float]:
    created = datetime.strptime(entry["createdOn"], "%m/%d/%y %H:%M:%S %z").astimezone(UTC)
    clock = FixedClock(created)
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=trust,
        aia=None,
        chain_cache=MemoryCache("chains", max_entries=16, clock=clock),
        clock=clock,
        require_subscription=entry["subscriptionId"] is not None,
    )
    signature = json.loads((REAL / "attested" / entry["file"]).read_text())["signature"]
    der = decode_signature(signature)
    nonce = entry["nonce"]

    async def verify() -> object:
        return await verifier.verify(signature, expected_nonce=nonce)

    out: dict[str, list[float]] = {f"{kind}_{p}": [] for kind in ("parse", "verify") for p in PATHS}
    for name in PATHS:  # warm-up: the chain cache, the certificate cache, lazy imports
        with _parser(name):
            await verify()
    for _ in range(rounds):
        for name in PATHS:
            parse = read_signed_data if name == "strict" else parse_signed_data
            out[f"parse_{name}"].append(_cpu_per_call(lambda p=parse: p(der), iterations))  # type: ignore[misc]
            with _parser(name):
                out[f"verify_{name}"].append(await _acpu_per_call(verify, iterations))
    return {key: statistics.median(values) for key, values in out.items()}


def measure(rounds: int, iterations: int) -> dict[str, Any]:
    trust = TrustStore.load(sorted((REAL / "ca").glob("*.pem")))
    per_doc: dict[str, dict[str, float]] = {}
    for entry in _genuine():
        per_doc[entry["file"]] = asyncio.run(_measure_verify(entry, trust, rounds, iterations))
    keys = next(iter(per_doc.values())).keys()
    mean = {key: statistics.fmean(doc[key] for doc in per_doc.values()) for key in keys}
    return {
        "unit": "microseconds of thread CPU per document",
        "rounds": rounds,
        "iterations": iterations,
        "documents": len(per_doc),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "mean": mean,
        "ratio_parse": mean["parse_asn1crypto"] / mean["parse_strict"],
        "ratio_verify": mean["verify_asn1crypto"] / mean["verify_strict"],
        "per_document": per_doc,
    }


def _plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = result["mean"]
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = ("parse", "verify")
    width = 0.38
    for i, name in enumerate(PATHS):
        xs = [g + (i - 0.5) * width for g in range(len(groups))]
        ys = [mean[f"{g}_{name}"] for g in groups]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.0f µs")
    ax.set_xticks(range(len(groups)), ["envelope parse", "parse + verify (cached chain)"])
    ax.set_ylabel("µs of CPU per document")
    ax.set_title(
        f"Real Azure documents ({result['documents']}): asn1crypto vs strict DER reader\n"
        f"parse {result['ratio_parse']:.1f}x, parse+verify {result['ratio_verify']:.1f}x"
    )
    ax.legend(loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cms"
    )
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.iterations)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _plot(args.out / "cms_parse.png", result)
    mean = result["mean"]
    print(f"{'µs CPU / document':<28}{'asn1crypto':>12}{'strict':>10}{'ratio':>8}")
    for kind, label in (("parse", "envelope parse"), ("verify", "parse + verify")):
        a, s = mean[f"{kind}_asn1crypto"], mean[f"{kind}_strict"]
        print(f"{label:<28}{a:>12.1f}{s:>10.1f}{a / s:>8.2f}")
    print(f"results: {args.out / 'results.json'}  plot: {args.out / 'cms_parse.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
