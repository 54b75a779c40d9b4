"""Experiment: the gateway's HTTP path around the join pipeline, CPU per join, two trees.

    git archive <base-commit> | tar -x -C /tmp/http-before
    python benchmarks/experiments/http_path_cpu.py --before /tmp/http-before \\
        --joins 500 --rounds 21

Each round runs one child process per tree (``--before DIR`` and this repository),
alternating which goes first; a child imports ``gateway`` from its tree only and prints
thread CPU per join (µs) for each item, measured over ``--joins`` joins after a warm-up.
The table gives the median over the rounds of each tree and the median of the rounds'
differences (after minus before, each round's two children back to back: the machine's
load drifts between rounds, less within one). Many short rounds beat a few long ones on a
shared machine. Items:

* ``http path`` — the real app (``make_app``, ``handler_factory``, uvloop, plain TCP on
  127.0.0.1): per join a new connection, ``POST`` challenge, ``POST`` join with an
  agent-shaped body, close. The pipeline is a stub (``routes.admit_join`` replaced: it
  verifies the challenge, fills the trace as a join's 12 steps do and answers a
  certificate-sized result), so the figure is the HTTP path, the body decoding, metrics,
  audit and challenge — plus aiohttp and this process's raw client, the same in both
  trees. Process CPU (server and client share the thread).
* ``body decoding`` — ``gateway.http.schema.decode_join_request`` of the same body.
* ``audit`` — ``Auditor.record`` of a joined decision (12 steps, labels), logging to
  ``/dev/null`` through a ``StreamHandler`` with the CLI's format.
* ``metrics`` — a join's metric calls (started, queue depth twice, ended, circuit state,
  decided with 12 steps, a challenge issued), flush timer included.
* ``challenge`` — ``issue()``, ``expires_at_rfc3339()`` and ``verify()`` of one challenge.

Not the product and not a test: a figure for README's *The HTTP path*. Only APIs both
trees have are used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ITEMS = ("http path", "body decoding", "audit", "metrics", "challenge")
STEPS = (
    "challenge",
    "token",
    "document",
    "access_token",
    "identity",
    "binding",
    "rules",
    "arm",
    "rules_arm",
    "labels",
    "redeem",
    "upstream",
)


def _child(joins: int) -> dict[str, float]:
    import asyncio
    import base64
    import logging
    import secrets
    from types import SimpleNamespace

    import uvloop
    from aiohttp import web
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    import gateway.http.routes as routes_mod
    from gateway.core.audit import Auditor
    from gateway.core.clock import SystemClock
    from gateway.core.config import Config
    from gateway.core.metrics import Metrics
    from gateway.http.app import make_app
    from gateway.http.framing import handler_factory
    from gateway.http.schema import decode_join_request
    from gateway.join.challenge import ChallengeCodec

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=open(os.devnull, "w"),  # noqa: SIM115 - lives as long as the process
    )
    clock = SystemClock()
    codec = ChallengeCodec([secrets.token_bytes(32)], ttl=300.0, clock=clock)
    ssh_pub = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    tls_pub = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    signature = base64.b64encode(secrets.token_bytes(2400)).decode()  # an IMDS document
    token = "eyJ" + base64.urlsafe_b64encode(secrets.token_bytes(1200)).decode()

    def body(challenge: str) -> bytes:
        return json.dumps(
            {
                "token_name": "azure-token",
                "challenge": challenge,
                "attested_data": {"encoding": "pkcs7", "signature": signature},
                "access_token": token,
                "host": {
                    "role": "Node",
                    "public_ssh_key": ssh_pub,
                    "public_tls_key": tls_pub,
                    "additional_principals": [],
                    "dns_names": [],
                },
            }
        ).encode()

    facts = {
        "tenant": "44444444-4444-4444-4444-444444444444",
        "subscription": "11111111-1111-1111-1111-111111111111",
        "resource_group": "group1",
        "vm_id": "22222222-2222-2222-2222-222222222222",
        "resource_id": "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/"
        "group1/providers/Microsoft.Compute/virtualMachines/vm-1",
    }
    labels = {"azure/region": "westeurope", "azure/vm-size": "Standard_D2s_v5"}
    cert = base64.b64encode(secrets.token_bytes(900)).decode()
    answer = {
        "host_id": "0f4c6f2e-1111-4a4a-9b9b-000000000001",
        "certs": {"ssh": cert, "tls": cert, "tls_ca_certs": [cert], "ssh_ca_keys": [cert]},
        "join": {"method": "azure", **facts},
    }

    class _Result:
        host_id = answer["host_id"]

    class _Admitted:
        result = _Result()

        @staticmethod
        def to_json() -> dict[str, Any]:
            return answer

    async def fake_admit(req: Any, deps: Any, trace: Any) -> Any:
        deps.challenges.verify(req.challenge)
        for step in STEPS:
            trace.steps[step] = 0.002
        trace.facts.update(facts)
        trace.labels = labels
        return _Admitted()

    routes_mod.admit_join = fake_admit  # type: ignore[assignment]
    deps = SimpleNamespace(
        clock=clock,
        challenges=codec,
        auth=SimpleNamespace(breaker=SimpleNamespace(state=SimpleNamespace(value="closed"))),
    )
    out: dict[str, float] = {}

    async def http_path() -> float:
        app = make_app(Config(), deps)  # type: ignore[arg-type]
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        assert runner.server is not None
        factory = handler_factory(
            runner.server, access_log=None, header_timeout=10.0, keepalive_timeout=75.0
        )
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def request(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, data: bytes
        ) -> bytes:
            writer.write(
                (
                    f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode()
                + data
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            return await reader.readexactly(length)

        async def one_join() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            issued = json.loads(await request(reader, writer, "/v1/join/azure/challenge", b""))
            await request(reader, writer, "/v1/join/azure", body(issued["challenge"]))
            writer.close()
            await writer.wait_closed()

        for _ in range(200):
            await one_join()
        start = time.process_time()
        for _ in range(joins):
            await one_join()
        spent = time.process_time() - start
        server.close()
        await runner.cleanup()
        return spent

    out["http path"] = uvloop.run(http_path()) / joins * 1e6

    def timed(fn: Any, n: int) -> float:
        for _ in range(min(n, 500)):
            fn()
        start = time.thread_time()
        for _ in range(n):
            fn()
        return (time.thread_time() - start) / n * 1e6

    raw = body(codec.issue().value)
    out["body decoding"] = timed(
        lambda: decode_join_request(raw, client_address="10.0.0.1"), joins * 5
    )
    auditor = Auditor(clock=clock)
    steps = dict.fromkeys(STEPS, 0.002)
    out["audit"] = timed(
        lambda: auditor.record(
            request_id="0123456789abcdef0123456789abcdef",
            client_address="10.0.0.1",
            outcome="joined",
            code=None,
            detail=None,
            facts={"token_name": "azure-token", "node_name": "vm-1", **facts},
            steps=steps,
            duration=0.05,
            host_id="0f4c6f2e-1111-4a4a-9b9b-000000000001",
            labels=labels,
        ),
        joins * 5,
    )

    async def metrics_loop(n: int) -> float:
        metrics = Metrics()

        def one() -> None:
            metrics.challenge_issued()
            metrics.join_started()
            metrics.set_queue_depth(0)
            metrics.set_queue_depth(0)
            metrics.join_ended()
            metrics.set_circuit_state("closed")
            metrics.join_decided("joined", "", 0.05, steps)

        return timed(one, n)

    out["metrics"] = uvloop.run(metrics_loop(joins * 5))

    def challenge() -> None:
        issued = codec.issue()
        issued.expires_at_rfc3339()
        codec.verify(issued.value)

    out["challenge"] = timed(challenge, joins * 5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout to compare against")
    parser.add_argument("--joins", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.joins)))
        return
    if str(ROOT) not in sys.path:  # run as a script: this repository's harness
        sys.path.insert(0, str(ROOT))
    from benchmarks.experiments.trees import run_in_tree

    trees = {"after": ROOT}
    if args.before is not None:
        trees = {"before": args.before.resolve(), "after": ROOT}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for rnd in range(args.rounds):
        order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
        for name in order:
            tree = trees[name]
            argv = ["-c", _BOOT, str(tree), __file__, str(args.joins)]
            results[name].append(run_in_tree(tree, argv))
            print(f"round {rnd + 1} {name}: {results[name][-1]}", file=sys.stderr)
    med = {
        name: {item: statistics.median(r[item] for r in runs) for item in ITEMS}
        for name, runs in results.items()
    }
    cols = list(trees)
    print(f"median of {args.rounds} rounds, µs per join | " + " | ".join(cols), end="")
    print(" | difference (median of the rounds' differences)" if "before" in med else "")
    for item in ITEMS:
        row = " | ".join(f"{med[c][item]:.1f}" for c in cols)
        diff = ""
        if "before" in med:
            # Paired within each round (the two children ran back to back), so a change
            # of the machine's load between rounds does not count as a difference.
            pairs = zip(results["before"], results["after"], strict=True)
            d = statistics.median(a[item] - b[item] for b, a in pairs)
            diff = f" | {d:+.1f} ({d / med['before'][item] * 100:+.0f} %)"
        print(f"{item} | {row}{diff}")


# The child runs this file's _child from *its* tree's point of view: sys.path starts with
# the tree, so ``gateway`` is that tree's (the editable install comes after).
_BOOT = """
import runpy, sys
tree, script, joins = sys.argv[1:4]
sys.path.insert(0, tree)
mod = runpy.run_path(script, run_name="http_path_cpu_child")
import json
print(json.dumps(mod["_child"](int(joins))))
"""

if __name__ == "__main__":
    main()
