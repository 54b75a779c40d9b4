"""Experiment: CPU per redemption of the Redis replay store, this tree against another.

    python benchmarks/experiments/replay_batch.py --before DIR [--rounds 5] [SCENARIO ...]

Starts one ``redis-server`` (``benchmarks.stack.start_redis``: nothing persisted) and, each
round, a fresh child process per tree (``PYTHONPATH`` set to it; before and after take
turns) that redeems distinct challenges through that tree's
:class:`~gateway.join.replay.RedisReplayStore` on a ``redis_client`` (the production
client: blocking pool, socket timeouts, one retry) under uvloop. The scenarios:

* ``lone`` — one redemption at a time (nothing else in flight): a quiet gateway's join.
* ``burst`` — ``--burst`` redemptions asked at once (``asyncio.gather``), ten times.
* ``storm`` — a saturated event loop, as a gateway worker's in a storm: ``--joins``
  joins, ``--concurrency`` at a time (the next starts as one ends), each burns
  ``--join-cpu-us`` of CPU in six slices of random length, waits up to 5 ms between
  them (its I/O: the joins fall out of step) and redeems after the third. With 32 at
  once the loop never idles, so how redemptions share round trips depends on the
  store, not on the machine's load. The figure is the process CPU less the burnt CPU,
  less the same storm's with a :class:`~gateway.join.replay.MemoryReplayStore` (the
  harness's tasks): what the Redis store adds per join.

``--max-in-flight`` overrides the store's depth in both trees. Measured (2-core VM): in
``storm`` a batch holds the redemptions asked in one turn of the loop (about 3.3 here)
whatever the depth, 1 to 8: a sender starts in the next turn and its reply is read in a
later one, so a shallower pipeline batches no more; what pays is a cheaper round trip.

Figures per scenario, medians over the rounds: the client's CPU per redemption
(``time.process_time``: Python, redis-py, the socket syscalls and, on loopback, the
receiving side's kernel work done inline), redis-server's CPU per redemption (its
``/proc/PID/schedstat`` run time), redemptions per round trip (``round_trips``), and the
redemption's wall time (median and p99; for ``storm`` it includes the loop's queue).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[2]

SCENARIOS = ("lone", "burst", "storm")
_SLICES = 6  # CPU slices of a simulated join; it redeems after the third
_IO_WAIT = 0.005  # at most this long between two slices (seconds)


def _server_cpu(pid: int) -> float:
    """redis-server's CPU seconds so far (schedstat: nanoseconds, not clock ticks)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def _burn(seconds: float) -> float:
    """Spin for ``seconds`` of this thread's CPU; returns the CPU actually spent."""
    start = time.thread_time()
    end = start + seconds
    while (now := time.thread_time()) < end:
        pass
    return now - start


async def _lone(store: Any, n: int) -> tuple[int, list[float]]:
    tag = uuid.uuid4().hex
    walls = []
    for i in range(n):
        t0 = time.perf_counter()
        assert await store.redeem(f"{tag}-{i}", 30)
        walls.append(time.perf_counter() - t0)
    return n, walls


async def _burst(store: Any, size: int) -> tuple[int, list[float]]:
    walls: list[float] = []

    async def one(key: str) -> None:
        t0 = time.perf_counter()
        assert await store.redeem(key, 30)
        walls.append(time.perf_counter() - t0)

    for b in range(10):
        tag = uuid.uuid4().hex
        await asyncio.gather(*(one(f"{tag}-{b}-{i}") for i in range(size)))
    return 10 * size, walls


async def _storm(
    store: Any, joins: int, concurrency: int, join_cpu: float
) -> tuple[int, list[float], float]:
    """``joins`` joins, ``concurrency`` at a time (one starts as one ends); returns the
    redemptions, their wall times and the CPU burnt. A join burns ``join_cpu`` in slices
    of random length and waits a random while between them (its I/O), so the joins do not
    move in step; the same seed in every run and tree."""
    rng = random.Random(1)
    tag = uuid.uuid4().hex
    walls: list[float] = []
    burnt = 0.0
    started = 0

    async def join(i: int) -> None:
        nonlocal burnt
        cuts = sorted(rng.random() for _ in range(_SLICES - 1))
        pieces = [b - a for a, b in zip([0.0, *cuts], [*cuts, 1.0], strict=True)]
        for s, piece in enumerate(pieces):
            burnt += _burn(piece * join_cpu)
            if s == _SLICES // 2 - 1:
                t0 = time.perf_counter()
                assert await store.redeem(f"{tag}-{i}", 30)
                walls.append(time.perf_counter() - t0)
            else:
                await asyncio.sleep(rng.uniform(0, _IO_WAIT))

    async def lane() -> None:
        nonlocal started
        while started < joins:
            started += 1
            await join(started)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return joins, walls, burnt


async def _child_main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from gateway.core.clock import SystemClock
    from gateway.core.redis_tier import redis_client
    from gateway.join.replay import MemoryReplayStore, RedisReplayStore

    client = redis_client(args.url)
    kwargs = {} if args.max_in_flight is None else {"max_in_flight": args.max_in_flight}
    out: dict[str, dict[str, float]] = {}
    try:
        for name in args.scenarios:
            store = RedisReplayStore(client, **kwargs)
            await _lone(store, 50)  # warm: connections, imports
            base = 0.0
            if name == "storm":
                memory = MemoryReplayStore(clock=SystemClock())
                c0 = time.process_time()
                n, _, burnt = await _storm(
                    memory, args.joins, args.concurrency, args.join_cpu_us / 1e6
                )
                base = (time.process_time() - c0 - burnt) / n
            trips0, s0, c0 = store.round_trips, _server_cpu(args.server_pid), time.process_time()
            burnt = 0.0
            if name == "lone":
                n, walls = await _lone(store, args.lone)
            elif name == "burst":
                n, walls = await _burst(store, args.burst)
            else:
                n, walls, burnt = await _storm(
                    store, args.joins, args.concurrency, args.join_cpu_us / 1e6
                )
            cpu = (time.process_time() - c0 - burnt) / n - base
            server = (_server_cpu(args.server_pid) - s0) / n
            walls.sort()
            out[name] = {
                "client_us": cpu * 1e6,
                "server_us": server * 1e6,
                "per_trip": n / max(store.round_trips - trips0, 1),
                "wall_p50_us": walls[len(walls) // 2] * 1e6,
                "wall_p99_us": walls[int(len(walls) * 0.99)] * 1e6,
            }
            await store.aclose()
    finally:
        await client.aclose()
    return out


def _child(args: argparse.Namespace) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_child_main(args))))


def _measure(tree: Path, args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    cmd = [str(Path(__file__).resolve()), "--child", "--url", url]
    cmd += ["--server-pid", str(pid), "--lone", str(args.lone), "--burst", str(args.burst)]
    cmd += ["--joins", str(args.joins), "--concurrency", str(args.concurrency)]
    cmd += ["--join-cpu-us", str(args.join_cpu_us)]
    if args.max_in_flight is not None:
        cmd += ["--max-in-flight", str(args.max_in_flight)]
    from benchmarks.experiments.trees import run_in_tree  # main() put HERE on the path

    return run_in_tree(tree, [*cmd, *args.scenarios], cwd=tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"default: all of {', '.join(SCENARIOS)}")
    parser.add_argument("--before", type=Path, help="the tree to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lone", type=int, default=2000, help="lone redemptions")
    parser.add_argument("--burst", type=int, default=500, help="redemptions in a burst")
    parser.add_argument("--joins", type=int, default=1000, help="storm: joins")
    parser.add_argument("--concurrency", type=int, default=32, help="storm: joins at once")
    parser.add_argument("--join-cpu-us", type=float, default=1200.0, help="storm: CPU per join")
    parser.add_argument("--max-in-flight", type=int, help="default: each tree's own")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.scenarios = args.scenarios or list(SCENARIOS)
    if args.child:
        _child(args)
        return

    if str(HERE) not in sys.path:  # run as a script: this repository's harness (a child
        sys.path.insert(0, str(HERE))  # imports its tree's gateway from PYTHONPATH)
    from benchmarks.stack import start_redis

    trees = {"after": HERE} if args.before is None else {"before": args.before, "after": HERE}
    runs: dict[str, dict[str, dict[str, list[float]]]] = {t: {} for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_redis(Path(tmp), "redis")
        try:
            for r in range(args.rounds):
                order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
                for label, tree in order:
                    for scenario, figures in _measure(tree, args, url, server.pid).items():
                        for key, value in figures.items():
                            runs[label].setdefault(scenario, {}).setdefault(key, []).append(value)
        finally:
            server.stop()
    keys = ("client_us", "server_us", "per_trip", "wall_p50_us", "wall_p99_us")
    print("| scenario | tree | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for scenario in args.scenarios:
        for label in trees:
            cells = [f"{statistics.median(runs[label][scenario][k]):.1f}" for k in keys]
            print(f"| {scenario} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
