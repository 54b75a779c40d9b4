"""The metrics listener: plain by default; with ``metrics.client_ca_file`` it is TLS and
only clients holding a certificate from that CA may scrape."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest

from gateway.core.config import MetricsConfig
from gateway.core.tlsutil import generate_ca, issue_cert, write_pem_files
from gateway.dev.devstack import dev_stack
from tests.support.gateway_proc import free_port
from tests.support.tokens import azure_token_yaml

TOKENS = azure_token_yaml()


async def test_metrics_listener_requires_a_client_certificate_when_configured(
    tmp_path: Path,
) -> None:
    scrapers = generate_ca("scrapers")
    scraper_ca, _ = write_pem_files(scrapers, tmp_path / "pki", "scrapers-ca")
    cert, key = write_pem_files(
        issue_cert(scrapers, common_name="prometheus", server=False, client=True),
        tmp_path / "pki",
        "prometheus",
    )
    outsider = generate_ca("outsider")
    bad_cert, bad_key = write_pem_files(
        issue_cert(outsider, common_name="intruder", server=False, client=True),
        tmp_path / "pki",
        "intruder",
    )
    port = free_port()
    metrics = MetricsConfig(listen=f"127.0.0.1:{port}", client_ca_file=str(scraper_ca))
    async with dev_stack(
        tmp_path / "stack", tokens_yaml=TOKENS, config_overrides={"metrics": metrics}
    ) as st:
        url = f"https://127.0.0.1:{port}/metrics"

        def client(cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(st.gateway_ca_file))
            if cert_file is not None and key_file is not None:
                ctx.load_cert_chain(str(cert_file), str(key_file))
            return ctx

        async with aiohttp.ClientSession() as session:
            async with session.get(url, ssl=client(cert, key)) as resp:
                assert resp.status == 200
                assert "join_gateway_build_info" in await resp.text()
            for cert_file, key_file in ((None, None), (bad_cert, bad_key)):
                with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                    async with session.get(url, ssl=client(cert_file, key_file)) as resp:
                        await resp.read()
