"""Where a gateway worker's CPU goes, by join stage: a CPU-time sampler (benchmark only).

    python -m benchmarks.stage_sampler --out DIR [--interval-ms 1] -m gateway.cli serve ...

Runs the module like ``python -m`` would, after arming a sampler in this process and in every
process it forks (the gateway's workers; ``os.register_at_fork``): ``ITIMER_PROF`` raises SIGPROF
each ``--interval-ms`` of the process's CPU time, and the handler files the Python stack
it interrupted under one stage. Each worker writes its counts to
``DIR/stages-<pid>.json`` twice a second. Each sample is weighted by the thread CPU time
since the previous one. :func:`read_counts` adds the files up and
:func:`breakdown` turns counts into each stage's share, scaled by the gateway's measured
CPU per join (so the stages add up to the measured figure, not to an estimate).

How a stack is filed: innermost frame first, the first frame whose file (and function)
matches a rule of ``RULES`` names the stage; library frames with no rule (json, logging,
re, ipaddress, asyncio ...) are charged to their caller, so ``json.loads`` inside the
document check is "document" and the logging inside the auditor is "audit". A stack
with no matching frame is "event loop": uvloop and asyncio themselves.

What sampling cannot split: Python runs a signal handler at the next bytecode, so CPU
spent in C code (OpenSSL, uvloop's socket calls, aiohttp's C parser) is charged to the
Python frame that called it or to the next one to run — the TLS handshake is seen
because ``ssl.SSLObject.do_handshake`` is a Python frame around OpenSSL's; socket I/O
done by uvloop outside any Python callback lands in "event loop" or the next callback.
The handler's own cost is counted, as "profiler".

The cyclic garbage collector is not sampled but timed: ``gc.callbacks`` read the thread's
CPU clock when each collection starts and stops, the time is filed as "garbage
collector", and the next sample's weight leaves it out (a collection runs inside whatever
allocation triggered it, which would otherwise be charged for it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import runpy
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

__all__ = [
    "FLUSH_S",
    "GARBAGE_COLLECTOR",
    "RULES",
    "STAGES",
    "breakdown",
    "classify",
    "main",
    "read_counts",
]

EVENT_LOOP = "event loop"
GARBAGE_COLLECTOR = "garbage collector"
_HANDSHAKE = "TLS handshake"
SERVER_HANDSHAKE = "TLS handshake (server)"
CLIENT_HANDSHAKE = "TLS handshake (client: upstream, ARM)"
FLUSH_S = 0.5  # how often each process rewrites its counts

# (file path fragment, function name or None for any, stage), tried in order per frame.
RULES: tuple[tuple[str, str | None, str], ...] = (
    ("/benchmarks/stage_sampler.py", None, "profiler"),
    ("/gateway/core/metrics.py", None, "metrics"),
    ("/prometheus_client/", None, "metrics"),
    ("/gateway/core/audit.py", None, "audit"),
    ("/gateway/azure/attested.py", None, "document"),
    ("/gateway/azure/cms.py", None, "document"),
    ("/gateway/azure/cms_shape.py", None, "document"),
    ("/gateway/azure/der.py", None, "document"),
    ("/gateway/azure/certs.py", None, "document"),
    ("/gateway/azure/aia.py", None, "document"),
    ("/asn1crypto/", None, "document"),
    ("/gateway/azure/token.py", None, "token"),
    ("/gateway/azure/jwks.py", None, "token"),
    ("/jwt/", None, "token"),
    ("/gateway/join/binding.py", None, "binding"),
    ("/gateway/azure/arm.py", None, "binding"),
    ("/gateway/azure/budget.py", None, "binding"),
    ("/gateway/azure/resource_id.py", None, "binding"),
    ("/gateway/join/rules.py", None, "rules"),
    ("/gateway/join/replay.py", None, "replay"),
    # With several workers the replay store and a shared cache tier are in Redis; redis-py
    # has no rule, so its frames are charged to whichever of the two awaited them.
    ("/gateway/core/redis_tier.py", None, "shared cache tier (Redis)"),
    ("/gateway/join/forward.py", None, "upstream"),
    ("/aiohttp/client", None, "upstream"),  # client.py, client_reqrep.py, client_proto.py
    ("/aiohttp/connector.py", None, "upstream"),
    ("/gateway/join/challenge.py", None, "challenge"),
    ("/gateway/http/schema.py", None, "body decoding"),
    ("/gateway/http/routes.py", "read_body", "HTTP parsing"),
    ("/ssl.py", "do_handshake", _HANDSHAKE),  # split server/client in classify()
    ("/ssl.py", None, "TLS records"),
    ("/aiohttp/web_response.py", None, "HTTP writing"),
    ("/aiohttp/http_writer.py", None, "HTTP writing"),
    ("/aiohttp/web_protocol.py", "finish_response", "HTTP writing"),
    ("/aiohttp/web_protocol.py", "data_received", "HTTP parsing"),
    ("/aiohttp/http_parser.py", None, "HTTP parsing"),
    ("/aiohttp/streams.py", None, "HTTP parsing"),
    ("/aiohttp/web_request.py", None, "HTTP parsing"),
    ("/gateway/http/", None, "HTTP handlers"),  # routes, middleware, admission, limits
    ("/gateway/join/pipeline.py", None, "pipeline"),
    ("/aiohttp/", None, "aiohttp server"),
    # The outermost frames of a worker (and all of the supervisor, mostly asleep): a
    # sample that finds nothing inside them was taken in uvloop's own C code.
    ("/gateway/server/", None, EVENT_LOOP),
)
STAGES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *(s for _, _, s in RULES if s != _HANDSHAKE),
            SERVER_HANDSHAKE,
            CLIENT_HANDSHAKE,
            GARBAGE_COLLECTOR,
            EVENT_LOOP,
        ]
    )
)

# Keyed by (file, function), not by the code object: code objects compare equal across
# files when their bytecode, name and line numbers are (a trivial ``__init__``, say).
_by_code: dict[tuple[str, str], str | None] = {}


def _code_stage(code: CodeType) -> str | None:
    key = (code.co_filename, code.co_name)
    stage = _by_code.get(key, "")
    if stage != "":
        return stage
    path = code.co_filename.replace(os.sep, "/")
    found: str | None = None
    for fragment, function, name in RULES:
        if fragment in path and (function is None or function == code.co_name):
            found = name
            break
    _by_code[key] = found
    return found


def classify(frame: FrameType | None) -> str:
    """The stage of the innermost frame that has one."""
    while frame is not None:
        stage = _code_stage(frame.f_code)
        if stage == _HANDSHAKE:
            # ssl.SSLObject.do_handshake: its ``self`` knows which side it is.
            side = getattr(frame.f_locals.get("self"), "server_side", None)
            return SERVER_HANDSHAKE if side else CLIENT_HANDSHAKE
        if stage is not None:
            return stage
        frame = frame.f_back
    return EVENT_LOOP


class _Sampler:
    def __init__(self, out_dir: Path, interval: float) -> None:
        self._out = out_dir / f"stages-{os.getpid()}.json"
        self._interval = interval
        self._counts: Counter[str] = Counter()  # stage → CPU nanoseconds
        self._last = time.thread_time_ns()
        self._thread = threading.get_ident()
        self._gc_started = 0
        self._gc_unsampled = 0  # GC CPU since the last sample, already filed as GC

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._on_sample)
        self._thread = threading.get_ident()
        self._last = time.thread_time_ns()
        gc.callbacks.append(self._on_gc)
        signal.setitimer(signal.ITIMER_PROF, self._interval, self._interval)
        threading.Thread(target=self._writer, name="stage-sampler", daemon=True).start()

    def _on_sample(self, signum: int, frame: FrameType | None) -> None:
        # Weighted by the thread's CPU time since the previous sample, not counted 1:
        # SIGPROFs raised during one long C call (an RSA verify, a handshake) collapse
        # into one Python handler call once it returns, which would undercount C work.
        now = time.thread_time_ns()
        # A collection runs inside whatever allocation triggered it: its CPU is timed
        # exactly by the gc callbacks and filed as its own stage, not as that caller's.
        self._counts[classify(frame)] += max(now - self._last - self._gc_unsampled, 0)
        self._gc_unsampled = 0
        self._last = now

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self._thread:
            return  # the writer thread's rare collections are not the gateway's work
        now = time.thread_time_ns()
        if phase == "start":
            self._gc_started = now
            return
        spent = now - self._gc_started
        self._counts[GARBAGE_COLLECTOR] += spent
        self._gc_unsampled += spent

    def _writer(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            counts = dict(self._counts)  # one C call: atomic with respect to the handler
            tmp = self._out.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"interval_s": self._interval, "cpu_ns": counts}), encoding="utf-8"
            )
            tmp.replace(self._out)


def read_counts(out_dir: Path) -> Counter[str]:
    """Every process's sampled CPU nanoseconds so far, added up by stage (the files are
    rewritten every ``FLUSH_S``: wait that long after the work before reading)."""
    total: Counter[str] = Counter()
    for path in sorted(out_dir.glob("stages-*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        total.update({str(k): int(v) for k, v in data["cpu_ns"].items()})
    return total


def breakdown(cpu_ns: Counter[str], cpu_s_per_join: float, joins: int) -> dict[str, Any]:
    """Each stage's share of the sampled CPU, scaled to the measured CPU per join: µs per
    join by stage, biggest first. ``sampled_s_per_join`` is the sampler's own total, a
    check on the measured figure (it misses the processes' other threads)."""
    n = sum(cpu_ns.values())
    # Every stage, sampled or not: a stage too cheap to be seen shows as 0.0.
    ranked = sorted(((s, cpu_ns.get(s, 0)) for s in STAGES), key=lambda item: -item[1])
    return {
        "method": "SIGPROF sampling of every gateway process, weighted by thread CPU time",
        "sampled_s_per_join": round(n / 1e9 / max(joins, 1), 6),
        "us_per_join": {
            s: round(ns / n * cpu_s_per_join * 1e6, 1) if n else 0.0 for s, ns in ranked
        },
        "share": {s: round(ns / n, 4) if n else 0.0 for s, ns in ranked},
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-m" not in argv:
        raise SystemExit("usage: stage_sampler --out DIR [--interval-ms N] -m MODULE ARGS...")
    split = argv.index("-m")
    parser = argparse.ArgumentParser(prog="stage_sampler")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval-ms", type=float, default=1.0)
    args = parser.parse_args(argv[:split])
    module, rest = argv[split + 1], argv[split + 2 :]
    args.out.mkdir(parents=True, exist_ok=True)
    interval = args.interval_ms / 1000.0
    # This process (a single-process gateway, or the supervisor: its CPU is in the
    # gateway's figure too), and every forked worker: interval timers are not inherited
    # across fork, so each child arms its own.
    _Sampler(args.out, interval).start()
    os.register_at_fork(after_in_child=lambda: _Sampler(args.out, interval).start())
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
