"""Per-join Python work, item by item: CPU µs per call of the pieces issue 13 names.

    python benchmarks/experiments/per_join_cpu.py --before DIR [--rounds 5] [ITEM ...]

``DIR`` is a checkout of the tree to compare with (``git archive <commit> | tar -x -C
DIR``); without ``--before`` only this tree is measured. Each round runs every item in a
fresh child process per tree (``PYTHONPATH`` set to that tree), before and after taking
turns, and the table shows each item's median over the rounds: CPU time
(``time.thread_time``) over many calls, divided by their number. The items use the
gateway's own functions on inputs shaped like the storm's (``gateway/dev/emulator``):

* ``steps`` — ``run_fail_fast`` over a table shaped like ``JOIN_STEPS`` (three steps, the
  document ∥ access-token group, seven steps) whose steps return at once, timed with
  ``JoinTrace.step`` as a join is: the runner's own cost per join.
* ``host_keys`` — a join body's ``host`` block decoded (``decode_host_params``: the SSH
  and TLS public keys checked) and its proofs verified (``verify_csr``,
  ``verify_ssh_possession``); an ECDSA P-256 TLS key and an Ed25519 SSH key, as the agent.
* ``host_block`` — ``decode_host_params`` of the host block a storm's agent sends (no
  proofs: the storm's agents send none), each call with another VM's keys (2,048 key
  pairs in turn), so the SSH and TLS checks load keys never seen and the kept-keys memo
  is full and turning over, as in a storm.
* ``arm_page`` — per VM of a resource group's listing page (100 emulator VM models, as
  JSON decodes them): the page read (``ArmClient._page``, its ``_get`` answering the
  decoded body) and merged into the group's map (``VmDirectory._merge``): what each VM
  listed costs, whether a join asks for it or not (decoding the JSON, ~6 µs a VM, is
  left out: it is the same either way).
* ``arm_lookup`` — per join answered by such a map (``VmDirectory.find`` of a VM listed
  and not looked up before): the lookup alone, the maps read before the clock starts.
* ``token_rid`` — the token's resource ID as a join uses it: parsed, its key, group key
  and shape read.
* ``labels`` — ``node_labels`` of an ARM-verified VM with two tags.
* ``azure_time`` — ``parse_azure_time`` of the document's two timestamps (the same two
  on every call, as documents fetched in the same second carry them: a memo hit).
* ``azure_time_fresh`` — the same for two stamps never parsed before on every call.
* ``token`` — ``TokenVerifier.verify`` of an RS256 access token, its tenant's keys warm.
* ``document`` — ``AttestedVerifier.verify`` of a forged attested document
  (``tests/support/cms_forge``), its chain cached: what a warm join's document step costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[2]
SUB = "0b5a7d1e-1111-4222-8333-944445555666"


def _steps() -> tuple[Callable[[], object], int]:
    from gateway.core.steps import Step, run_fail_fast
    from gateway.join.pipeline import JoinTrace

    async def ok(state: object) -> str:
        return "ok"

    def step(name: str) -> Step[object]:
        return Step(name, ok)

    table: Any = (
        step("challenge"),
        step("possession"),
        step("token"),
        (step("document"), step("access_token")),
        *(step(n) for n in ("identity", "binding", "rules", "arm", "rules_arm", "labels")),
        step("names"),
    )
    n = 20_000

    async def many() -> None:
        for _ in range(n):
            await run_fail_fast(table, None, timer=JoinTrace().step)

    return lambda: asyncio.run(many()), n


def _host_keys() -> tuple[Callable[[], object], int]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from gateway.protocol.possession import (
        make_csr,
        sign_ssh_possession,
        verify_csr,
        verify_ssh_possession,
    )
    from gateway.protocol.types import decode_host_params

    tls = ec.generate_private_key(ec.SECP256R1())
    ssh = ed25519.Ed25519PrivateKey.generate()
    tls_pem = (
        tls.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    ssh_line = (
        ssh.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    challenge = "c" * 64
    body = {
        "role": "Node",
        "public_ssh_key": ssh_line,
        "public_tls_key": tls_pem,
        "csr": make_csr(tls),
        "ssh_key_proof": sign_ssh_possession(ssh, challenge),
    }
    n = 2_000

    def many() -> None:
        for _ in range(n):
            host = decode_host_params(dict(body), "host", lists_required=False)
            assert host.csr is not None and host.ssh_key_proof is not None
            verify_csr(host.csr, host.public_tls_key)
            verify_ssh_possession(host.public_ssh_key, challenge, host.ssh_key_proof)

    return many, n


def _host_block() -> tuple[Callable[[], object], int]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from gateway.protocol.types import decode_host_params

    def block() -> dict[str, object]:
        tls = ec.generate_private_key(ec.SECP256R1()).public_key()
        ssh = ed25519.Ed25519PrivateKey.generate().public_key()
        return {
            "role": "Node",
            "public_ssh_key": ssh.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ).decode(),
            "public_tls_key": tls.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
            "additional_principals": [],
            "dns_names": [],
        }

    blocks = [block() for _ in range(2048)]
    n = 20_000

    def many() -> None:
        for i in range(n):
            decode_host_params(blocks[i % 2048], "host", lists_required=False)

    return many, n


def _page_items(count: int) -> list[dict[str, Any]]:
    from gateway.dev.emulator.arm import vm_json
    from gateway.dev.emulator.model import EmulatedVm, ManagedIdentity

    items = []
    for i in range(count):
        rid = (
            f"/subscriptions/{SUB}/resourceGroups/Kube-Prod/providers/"
            f"Microsoft.Compute/virtualMachines/node-{i}"
        )
        vm = EmulatedVm(
            name=f"node-{i}",
            vm_id=f"{i:08x}-1111-4222-8333-944445555666",
            resource_id=rid,
            subscription=SUB,
            resource_group="Kube-Prod",
            tenant=SUB,
            identity="system",  # type: ignore[arg-type]
            client_id=None,
            principal_oid=SUB,
            scale_set=None,
            instance_id=None,
            imds_url="http://127.0.0.1:1",
            tags={"env": "prod", "team": "infra"},
        )
        ident = ManagedIdentity("system", SUB, SUB, SUB, rid, SUB, "Kube-Prod")  # type: ignore[arg-type]
        items.append(json.loads(vm_json(vm, ident, time_created="2026-01-01T00:00:00Z")))
    return items


_GROUP = (
    f"/subscriptions/{SUB}/resourceGroups/Kube-Prod/providers/Microsoft.Compute/virtualMachines/x"
)


def _listing_page(count: int) -> dict[str, Any]:
    """A listing page of ``count`` emulator VMs, as JSON decodes ARM's body."""
    return {"value": _page_items(count)}


async def _listed_map(directory: Any, body: dict[str, Any]) -> Any:
    """A complete map of the page's VMs (``_listing_page``; not changed) in ``directory``,
    as a listing makes it."""
    from gateway.azure.arm import ArmClient
    from gateway.azure.resource_id import parse_resource_id

    client = ArmClient.__new__(ArmClient)

    async def get(url: str, kind: str, subscription: str, bearer: str) -> Any:
        return body

    client._get = get  # type: ignore[method-assign]
    page = await client._page("", "list_vms", SUB, "")
    rid = parse_resource_id(_GROUP)
    listing = directory._start("group", rid.group_key, rid, refresh=False)
    directory._merge(listing, page)
    return listing


def _arm_page() -> tuple[Callable[[], object], int]:
    from gateway.azure.vm_directory import VmDirectory
    from gateway.core.clock import SystemClock

    count, pages = 100, 100
    body = _listing_page(count)

    async def many() -> None:
        directory = VmDirectory(None, clock=SystemClock())  # type: ignore[arg-type]
        for _ in range(pages):
            listing = await _listed_map(directory, body)
            assert len(listing.by_key) == count and listing.complete

    return lambda: asyncio.run(many()), pages * count


def _arm_lookup() -> tuple[Callable[[], object], int]:
    from gateway.azure.resource_id import parse_vm_resource_id
    from gateway.azure.vm_directory import VmDirectory
    from gateway.core.clock import SystemClock

    count, groups = 100, 50
    body = _listing_page(count)
    items = body["value"]
    # The tokens' IDs (lowercase, as tokens spell them) and vmIds of the page's VMs.
    joins = [
        (parse_vm_resource_id(item["id"].lower()), item["properties"]["vmId"]) for item in items
    ]

    async def maps() -> list[Any]:
        out = []
        for _ in range(groups):  # one directory per map: the same group listed anew
            directory = VmDirectory(None, clock=SystemClock())  # type: ignore[arg-type]
            await _listed_map(directory, body)
            out.append(directory)
        return out

    # One batch of maps per run (the harness runs twice: warm-up, then timed), made now so
    # that the timed run only looks up, each VM for the first time.
    loop = asyncio.new_event_loop()
    batches = [loop.run_until_complete(maps()) for _ in range(2)]

    async def lookups(directories: list[Any]) -> None:
        for directory in directories:
            for rid, vm_id in joins:
                record = await directory.find(rid, vm_id, "bearer")
                assert record.vm_id == vm_id

    return lambda: loop.run_until_complete(lookups(batches.pop())), groups * count


def _token_rid() -> tuple[Callable[[], object], int]:
    from gateway.azure.resource_id import parse_vm_resource_id

    raw = (
        f"/subscriptions/{SUB}/resourcegroups/kube-prod/providers/"
        "Microsoft.Compute/virtualMachines/node-7"
    )
    n = 50_000

    def many() -> None:
        for _ in range(n):
            rid = parse_vm_resource_id(raw)
            seen = (rid.key, rid.group_key, rid.is_vm, rid.is_scale_set, rid.scale_set)
            assert seen[0] == rid.key

    return many, n


def _labels() -> tuple[Callable[[], object], int]:
    from gateway.join.binding import VmIdentity
    from gateway.join.labels import node_labels

    fields: dict[str, Any] = {
        "resource_id": "/subscriptions/x/vm",
        "vm_id": SUB,
        "subscription_id": SUB,
        "resource_group": "Kube-Prod",
        "identity_kind": "system",
        "arm_verified": True,
        "location": "westeurope",
        "vm_name": "node-7",
        "scale_set": None,
        "instance_id": None,
        "tags": {"env": "prod", "team": "infra"},
    }
    import dataclasses

    names = {f.name for f in dataclasses.fields(VmIdentity)}
    identity = VmIdentity(**{k: v for k, v in fields.items() if k in names})
    n = 20_000

    def many() -> None:
        for _ in range(n):
            node_labels(tenant=SUB, vm_id=SUB, identity=identity, tags=("env", "team"))

    return many, n


def _azure_time() -> tuple[Callable[[], object], int]:
    from gateway.azure.attested import parse_azure_time

    n = 50_000

    def many() -> None:
        for _ in range(n):
            parse_azure_time("11/27/26 21:00:00 -0000")
            parse_azure_time("11/28/26 03:00:00 -0000")

    return many, n


def _azure_time_fresh() -> tuple[Callable[[], object], int]:
    from gateway.azure.attested import parse_azure_time

    # Two stamps never seen before on every call (a document fetched in a quiet second).
    stamps = [
        f"11/27/26 {h:02d}:{m:02d}:{s:02d} -0000"
        for h in range(24)
        for m in range(60)
        for s in range(0, 60, 7)
    ][:20_000]
    n = len(stamps) // 2

    def many() -> None:
        for i in range(n):
            parse_azure_time(stamps[2 * i])
            parse_azure_time(stamps[2 * i + 1])

    return many, n


def _token() -> tuple[Callable[[], object], int]:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.azure.jwks import TokenVerifier
    from gateway.core.clock import SystemClock
    from gateway.core.cloud import CLOUDS

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    cloud = CLOUDS["public"]
    claims = {
        "aud": cloud.arm_audience,
        "iss": cloud.issuer_for(SUB),
        "tid": SUB,
        "oid": SUB,
        "sub": SUB,
        "appid": SUB,
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
        "xms_mirid": f"/subscriptions/{SUB}/resourcegroups/kube-prod/providers/"
        "Microsoft.Compute/virtualMachines/node-7",
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})

    class WarmKeys:
        async def key_for(self, tid: str, kid: str) -> Any:
            return key.public_key()

    verifier = TokenVerifier(WarmKeys(), cloud=cloud, clock=SystemClock())  # type: ignore[arg-type]
    n = 5_000

    async def many() -> None:
        for _ in range(n):
            await verifier.verify(token)

    return lambda: asyncio.run(many()), n


def _document() -> tuple[Callable[[], object], int]:
    from datetime import timedelta

    from gateway.azure.attested import AttestedVerifier
    from gateway.azure.certs import TrustStore
    from gateway.core.cache import MemoryCache
    from gateway.core.clock import FixedClock
    from gateway.core.cloud import CLOUDS
    from tests.support.cms_forge import INTERMEDIATE_CN, T0, azure_content, forge, make_pki

    pki = make_pki()
    clock = FixedClock(T0 + timedelta(hours=1))
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=TrustStore(roots=(pki.root.cert,), intermediates=()),
        aia=None,
        chain_cache=MemoryCache("chains", clock=clock),
        clock=clock,
        known_issuer_names=(INTERMEDIATE_CN,),
    )
    inter = pki.intermediate.der  # a property: re-encodes on every read
    nonces = [f"nonce-{i:010d}" for i in range(64)]
    docs = [forge(pki.leaf, azure_content(nonce=nonce)) for nonce in nonces]
    n = 2_000

    async def many() -> None:
        for i in range(n):
            await verifier.verify(
                docs[i % 64], intermediates=(inter,), expected_nonce=nonces[i % 64]
            )

    return lambda: asyncio.run(many()), n


ITEMS: dict[str, Callable[[], tuple[Callable[[], object], int]]] = {
    "steps": _steps,
    "host_keys": _host_keys,
    "host_block": _host_block,
    "arm_page": _arm_page,
    "arm_lookup": _arm_lookup,
    "token_rid": _token_rid,
    "labels": _labels,
    "azure_time": _azure_time,
    "azure_time_fresh": _azure_time_fresh,
    "token": _token,
    "document": _document,
}


def _child(names: list[str]) -> None:
    out = {}
    for name in names:
        run, calls = ITEMS[name]()
        run()  # warm: imports, caches of the interpreter
        start = time.thread_time()
        run()
        out[name] = (time.thread_time() - start) / calls * 1e6
    print(json.dumps(out))


def _measure(tree: Path, names: list[str]) -> dict[str, float]:
    if str(HERE) not in sys.path:  # run as a script: this repository's harness
        sys.path.insert(0, str(HERE))
    from benchmarks.experiments.trees import run_in_tree

    return run_in_tree(tree, [str(Path(__file__).resolve()), "--child", *names], cwd=tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="*", help=f"default: all of {', '.join(ITEMS)}")
    parser.add_argument("--before", type=Path, help="the tree to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.items or list(ITEMS)
    if args.child:
        _child(names)
        return
    trees = {"after": HERE} if args.before is None else {"before": args.before, "after": HERE}
    runs: dict[str, dict[str, list[float]]] = {t: {n: [] for n in names} for t in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            for name, us in _measure(tree, names).items():
                runs[label][name].append(us)
    print("| item | " + " | ".join(f"{t} (µs)" for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for name in names:
        cells = [f"{statistics.median(runs[t][name]):.2f}" for t in trees]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
