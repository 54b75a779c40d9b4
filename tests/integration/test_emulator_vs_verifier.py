"""The emulator's documents pass the same verifier as Azure's, with only its root added."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import pytest

from gateway.azure.aia import DEFAULT_AIA_PREFIXES, AiaFetcher
from gateway.azure.attested import AttestedVerifier
from gateway.azure.certs import TrustStore
from gateway.core.cache import MemoryCache
from gateway.core.clock import SystemClock
from gateway.core.cloud import CLOUDS
from gateway.core.errors import Code, JoinRejected
from gateway.dev.emulator import AzureEmulator, Latency
from gateway.dev.emulator.pki import INTERMEDIATE_CN

SUB = "11111111-1111-1111-1111-111111111111"


@pytest.mark.parametrize(
    ("add_root", "via", "code"),
    [
        (True, "aia", None),
        (True, "request", None),
        (False, "request", Code.ATTESTED_CHAIN_UNTRUSTED),
    ],
    ids=[
        "with the emulator's root pinned, the intermediate is found through AIA",
        "with the emulator's root pinned, the request's intermediate completes the chain",
        "with the bundled Azure roots only, an emulator document is untrusted",
    ],
)
async def test_emulator_documents_verify_like_real_ones(
    tmp_path: Path, add_root: bool, via: str, code: Code | None
) -> None:
    async with AzureEmulator(latency=Latency.none()) as emu, aiohttp.ClientSession() as session:
        tenant = emu.add_tenant()
        vm = emu.add_vm(
            subscription=SUB, resource_group="rg", name="vm", tenant=tenant, identity="user"
        )
        root = tmp_path / "root.pem"
        root.write_bytes(emu.attestation_root_pem)
        trust = TrustStore.load(extra_pem_files=[root] if add_root else [], include_bundled=True)
        clock = SystemClock()
        aia = AiaFetcher(
            session,
            allowed_prefixes=(*DEFAULT_AIA_PREFIXES, emu.aia_prefix),
            allow_private=True,
            cache=MemoryCache("aia", clock=clock),
            clock=clock,
        )
        verifier = AttestedVerifier(
            cloud=CLOUDS["public"],
            trust=trust,
            aia=aia if via == "aia" else None,
            chain_cache=MemoryCache("chains", clock=clock),
            clock=clock,
            known_issuer_names=(INTERMEDIATE_CN,),
        )
        nonce = "n" * 32
        doc = emu.attested_document_for(vm, nonce=nonce)
        pem_body = "".join(emu.intermediate_pem.decode().splitlines()[1:-1])
        intermediates = [base64.b64decode(pem_body)] if via == "request" else []
        if code is None:
            result = await verifier.verify(
                doc["signature"], intermediates=intermediates, expected_nonce=nonce
            )
            assert result.vm_id == vm.vm_id and result.subscription_id == SUB
            assert result.signer_cn == "metadata.azure.com"
            assert emu.counters.get("aia", 0) == (1 if via == "aia" else 0)
        else:
            with pytest.raises(JoinRejected) as err:
                await verifier.verify(
                    doc["signature"], intermediates=intermediates, expected_nonce=nonce
                )
            assert err.value.code == code
