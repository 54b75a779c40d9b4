"""One join over HTTPS against a dev stack, the way an agent sends it (for tests that
drive the gateway directly rather than through the agent's code)."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from gateway.agent.keys import load_or_create_keys
from gateway.dev.devstack import DevStack
from gateway.dev.emulator import EmulatedVm

__all__ = ["join_body", "post_join", "post_join_body"]


def join_body(
    stack: DevStack,
    vm: EmulatedVm,
    keys_dir: Path,
    *,
    token: str,
    host: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh challenge, ``vm``'s attested document and token from the emulator, keys from
    ``keys_dir``, the emulator's intermediate, and no extra names. ``host`` changes the host
    block (a value None drops the field: ``{"node_name": None}`` asks for no name)."""
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
    return await post_join_body(stack, join_body(stack, vm, keys_dir, token=token, host=host))


async def post_join_body(stack: DevStack, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``POST /v1/join/azure`` of ``body`` as given (a test may have changed it)."""
    ctx = ssl.create_default_context(cafile=str(stack.gateway_ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.post(stack.gateway_url + "/v1/join/azure", json=body, ssl=ctx) as resp,
    ):
        return resp.status, await resp.json()
