"""Throwaway experiment: server CPU per request, aiohttp against granian (RSGI and ASGI).

    python benchmarks/experiments/http_server_cpu.py --requests 3000 --rounds 3

The question it answers: how much of the gateway's CPU per join is the HTTP/TLS server
itself, and would replacing aiohttp buy it back? Each server answers one route, a JSON
POST the size of a join request (~3.7 KB) with a JSON reply the size of a join's answer,
over TLS with the gateway's own settings where the server lets us (an ECDSA P-256
certificate; ``gateway.core.tlsutil.server_ssl_context`` for aiohttp, rustls for
granian), one worker process each. Two modes: every request on a kept-alive connection,
and every request on a new connection (a full TLS handshake each, as a first join's
challenge is). The figure is the server process tree's CPU (utime + stime from /proc,
all threads and worker processes) over the requests, divided by their number; the load
generator runs in this process and is not counted. ``uvloop-raw`` is no framework at all
(a protocol answering the same bytes on uvloop with the same ``SSLContext``): what is left
per connection there is uvloop's TLS path and OpenSSL, not aiohttp.

Not part of the product: granian is installed into a virtualenv by hand for this
(``pip install granian``), it is not a dependency, and the gateway keeps aiohttp (the
PROXY protocol listener, the framing errors and the graceful drain are aiohttp-based).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages first
    sys.path.insert(0, str(ROOT))

from benchmarks.stack import free_port, process_cpu_seconds  # noqa: E402
from gateway.core.tlsutil import (  # noqa: E402
    client_ssl_context,
    generate_ca,
    issue_cert,
    server_ssl_context,
    write_pem_files,
)

PATH = "/v1/join/azure"


def request_body() -> bytes:
    """A join-shaped JSON body of about 3.7 KB (the sizes, not the content, matter)."""
    blob = base64.b64encode(os.urandom(1550)).decode()
    body = {
        "token_name": "azure-token",
        "challenge": "c" * 32,
        "attested_data": {"encoding": "pkcs7", "signature": blob},
        "access_token": "eyJ" + "a" * 1100,
        "host": {
            "node_name": "vm-1",
            "role": "Node",
            "public_ssh_key": "ssh-ed25519 " + "A" * 68,
            "public_tls_key": "-----BEGIN PUBLIC KEY-----\n" + "B" * 120 + "\n-----END",
            "additional_principals": ["10.0.0.4"],
            "dns_names": ["vm-1.internal"],
        },
    }
    return json.dumps(body).encode()


def reply_for(body: bytes) -> bytes:
    """What each server answers: the body decoded, and a certificate-sized JSON reply."""
    req = json.loads(body)
    return json.dumps(
        {
            "host_id": "5f1e0f5c-6d5b-4d0b-9b1e-000000000001",
            "node": req["host"]["node_name"],
            "certs": {"tls": "C" * 900, "ssh": "D" * 700, "tls_ca_certs": ["E" * 600]},
        }
    ).encode()


# --- the servers -----------------------------------------------------------------------


async def rsgi_app(scope: Any, proto: Any) -> None:
    """granian's RSGI interface."""
    body = await proto()
    proto.response_bytes(200, [("content-type", "application/json")], reply_for(body))


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """granian's ASGI interface."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": reply_for(body)})


def serve_aiohttp(port: int, cert: Path, key: Path) -> None:
    """aiohttp on uvloop, as the gateway runs it (without the gateway's own layers)."""
    import uvloop
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=reply_for(await request.read()), content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post(PATH, handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ssl_context(cert, key))
        await site.start()
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_aiohttp_lowlevel(port: int, cert: Path, key: Path) -> None:
    """aiohttp's protocol and request/response objects without the Application: its
    low-level ``web.Server`` with one handler (no router, no middlewares, no signals)."""
    import uvloop
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(body=reply_for(await request.read()), content_type="application/json")

    async def main() -> None:
        server = web.Server(handle, access_log=None)
        ctx = server_ssl_context(cert, key)
        await asyncio.get_running_loop().create_server(server, "127.0.0.1", port, ssl=ctx)
        await asyncio.Event().wait()

    uvloop.run(main())


class _RawHttp(asyncio.Protocol):
    """No HTTP framework at all: enough HTTP/1.1 for this client, to split what uvloop
    and OpenSSL cost per connection from what aiohttp adds."""

    def __init__(self) -> None:
        self._buf = b""
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # uvloop's TLS transport is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        head, sep, rest = self._buf.partition(b"\r\n\r\n")
        if not sep or self._transport is None:
            return
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(rest) < length:
            return
        self._buf = rest[length:]
        body = reply_for(rest[:length])
        close = b"connection: close" in head.lower()
        self._transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (len(body), b"Connection: close\r\n" if close else b"")
            + body
        )
        if close:
            self._transport.close()


def serve_raw(port: int, cert: Path, key: Path) -> None:
    import uvloop

    async def main() -> None:
        ctx = server_ssl_context(cert, key)
        await asyncio.get_running_loop().create_server(_RawHttp, "127.0.0.1", port, ssl=ctx)
        await asyncio.Event().wait()

    uvloop.run(main())


def start_server(kind: str, port: int, cert: Path, key: Path, log: Path) -> subprocess.Popen[bytes]:
    if kind in ("aiohttp", "aiohttp-lowlevel", "uvloop-raw"):
        cmd = [sys.executable, __file__, f"--serve-{kind}", str(port), str(cert), str(key)]
    else:
        granian = shutil.which("granian", path=str(Path(sys.executable).parent))
        if granian is None:
            raise SystemExit("granian is not installed in this virtualenv (pip install granian)")
        interface = "rsgi" if kind == "granian-rsgi" else "asgi"
        cmd = [
            granian,
            "--interface",
            interface,
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--http",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ssl-certificate",
            str(cert),
            "--ssl-keyfile",
            str(key),
            "--log-level",
            "warning",
            f"benchmarks.experiments.http_server_cpu:{interface}_app",
        ]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


# --- the load --------------------------------------------------------------------------


async def load(
    url: str, ctx: ssl.SSLContext, body: bytes, requests: int, connections: int, new_each: bool
) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections, ssl=ctx, force_close=new_each)
    async with aiohttp.ClientSession(connector=connector) as session:
        left = requests

        async def one_worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"status {resp.status}")

        await asyncio.gather(*(one_worker() for _ in range(connections)))


async def wait_ready(
    url: str, ctx: ssl.SSLContext, body: bytes, proc: subprocess.Popen[bytes]
) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            await load(url, ctx, body, 1, 1, True)
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not come up")


def measure(
    kind: str, pki: dict[str, Path], body: bytes, requests: int, connections: int, tmp: Path
) -> dict[str, float]:
    import uvloop

    port = free_port()
    proc = start_server(kind, port, pki["cert"], pki["key"], tmp / f"{kind}.log")
    ctx = client_ssl_context(ca_file=pki["ca"])
    url = f"https://127.0.0.1:{port}{PATH}"
    out: dict[str, float] = {}
    try:
        uvloop.run(wait_ready(url, ctx, body, proc))
        uvloop.run(load(url, ctx, body, 200, connections, False))  # warm-up
        for mode, new_each in (("keep-alive", False), ("new connection", True)):
            before = process_cpu_seconds(proc.pid)
            uvloop.run(load(url, ctx, body, requests, connections, new_each))
            out[mode] = (process_cpu_seconds(proc.pid) - before) / requests
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def make_pki(directory: Path) -> dict[str, Path]:
    ca = generate_ca("experiment CA", days=2)
    leaf = issue_cert(ca, common_name="127.0.0.1", ip_addresses=["127.0.0.1"], days=1)
    cert, key = write_pem_files(leaf, directory, "server")
    ca_file, _ = write_pem_files(ca, directory, "ca")
    return {"cert": cert, "key": key, "ca": ca_file}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000, help="requests per mode and round")
    p.add_argument("--connections", type=int, default=32, help="requests in flight")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--servers", default="aiohttp,uvloop-raw,granian-rsgi,granian-asgi", help="comma-separated"
    )
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    for kind in ("aiohttp", "aiohttp-lowlevel", "uvloop-raw"):
        p.add_argument(
            f"--serve-{kind}", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS
        )
    args = p.parse_args(argv)
    servers = (
        (args.serve_aiohttp, serve_aiohttp),
        (args.serve_aiohttp_lowlevel, serve_aiohttp_lowlevel),
        (args.serve_uvloop_raw, serve_raw),
    )
    for given, serve in servers:
        if given:
            port, cert, key = given
            serve(int(port), Path(cert), Path(key))
            return 0

    body = request_body()
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    results: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pki = make_pki(tmp)
        for rnd in range(args.rounds):
            for kind in kinds:  # alternating, so a busy moment hurts each server alike
                started = time.monotonic()
                figures = measure(kind, pki, body, args.requests, args.connections, tmp)
                for mode, per_request in figures.items():
                    results[kind].setdefault(mode, []).append(per_request)
                print(
                    f"round {rnd + 1} {kind:13s} "
                    + "  ".join(f"{m} {v * 1e6:7.1f} µs" for m, v in figures.items())
                    + f"  ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    print(f"\nserver CPU per request, median of {args.rounds} rounds (µs); body {len(body)} B")
    base = {m: statistics.median(v) for m, v in results.get("aiohttp", {}).items()}
    for kind, modes in results.items():
        cells = []
        for mode, values in modes.items():
            med = statistics.median(values)
            ratio = f" ({base[mode] / med:.1f}x less)" if kind != "aiohttp" and mode in base else ""
            cells.append(f"{mode} {med * 1e6:7.1f}{ratio}")
        print(f"  {kind:13s} " + "   ".join(cells))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"body_bytes": len(body), "per_request_s": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
