"""One join over HTTPS against a dev stack, the way an agent sends it (for tests that
drive the gateway directly rather than through the agent's code)."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.agent.keys import load_or_create_keys
from gateway.dev.devstack import DevStack
from gateway.dev.emulator import EmulatedVm
from gateway.protocol.possession import make_csr, sign_ssh_possession

__all__ = ["JoinAnswer", "join", "join_body", "post_join", "post_join_body", "send_join"]


@dataclass(frozen=True)
class JoinAnswer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def join_body(
    stack: DevStack,
    vm: EmulatedVm,
    keys_dir: Path,
    *,
    token: str,
    host: Mapping[str, Any] | None = None,
    possession: bool = False,
) -> dict[str, Any]:
    """A fresh challenge, ``vm``'s attested document and token from the emulator, keys from
    ``keys_dir``, the emulator's intermediate, and no extra names. ``host`` changes the host
    block (a value None drops the field: ``{"node_name": None}`` asks for no name); with
    ``possession``, the CSR and the SSH key's proof over the challenge, as the agent sends
    them."""
    emu = stack.emulator
    challenge = stack.gateway.deps.challenges.issue().value
    keys = load_or_create_keys(keys_dir)
    pem = [ln for ln in emu.intermediate_pem.decode().splitlines() if not ln.startswith("-")]
    host_block: dict[str, Any] = {
        "node_name": vm.name,
        "role": "Node",
        "public_ssh_key": keys.public_ssh_key,
        "public_tls_key": keys.public_tls_key,
    }
    if possession:
        host_block["csr"] = make_csr(keys.tls_key)
        host_block["ssh_key_proof"] = sign_ssh_possession(keys.ssh_key, challenge)
    for key, value in (host or {}).items():
        if value is None:
            host_block.pop(key, None)
        else:
            host_block[key] = value
    return {
        "token_name": token,
        "challenge": challenge,
        "attested_data": emu.attested_document_for(vm, nonce=challenge),
        "intermediates": [base64.b64encode(base64.b64decode("".join(pem))).decode()],
        "access_token": emu.token_for(vm),
        "host": host_block,
    }


async def post_join(
    stack: DevStack,
    vm: EmulatedVm,
    keys_dir: Path,
    *,
    token: str,
    host: Mapping[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """``POST /v1/join/azure`` over HTTPS: (status, JSON body)."""
    answer = await join(stack, vm, keys_dir, token=token, host=host)
    return answer.status, answer.body


async def join(
    stack: DevStack,
    vm: EmulatedVm,
    keys_dir: Path,
    *,
    token: str,
    host: Mapping[str, Any] | None = None,
    possession: bool = False,
) -> JoinAnswer:
    """``POST /v1/join/azure`` over HTTPS: status, headers and JSON body."""
    body = join_body(stack, vm, keys_dir, token=token, host=host, possession=possession)
    return await send_join(stack, body)


async def post_join_body(stack: DevStack, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``POST /v1/join/azure`` of ``body`` as given (a test may have changed it)."""
    answer = await send_join(stack, body)
    return answer.status, answer.body


async def send_join(stack: DevStack, body: dict[str, Any]) -> JoinAnswer:
    ctx = ssl.create_default_context(cafile=str(stack.gateway_ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.post(stack.gateway_url + "/v1/join/azure", json=body, ssl=ctx) as resp,
    ):
        return JoinAnswer(resp.status, dict(resp.headers), await resp.json())
