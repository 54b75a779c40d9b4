"""The node config: the seed's file parses unchanged; mistakes in join_params name the line."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

from gateway.agent.cli import add_arguments, build_settings, run
from gateway.agent.errors import NodeConfigError
from gateway.agent.nodeconfig import (
    DEFAULT_AIA_PREFIXES,
    DEFAULT_DATA_DIR,
    DEFAULT_IMDS_URL,
    AgentSettings,
    parse_ca_pin,
    parse_node_config,
    parse_proxy_server,
)

# DESIGN §7, as operators write it.
SEED = """\
# node config on the VM
version: v3
teleport:
  join_params:
    token_name: azure-token
    method: azure
    azure:
      client_id: 11111111-1111-1111-1111-111111111111   # the user-assigned identity to use
  proxy_server: teleport.example.com:443
ssh_service:
  enabled: yes
"""

PIN = "sha256:" + "ab" * 32


def parse(text: str) -> AgentSettings:
    return parse_node_config(textwrap.dedent(text), source="node.yaml")


def test_the_seed_node_config_parses_unchanged() -> None:
    s = parse_node_config(SEED, source="node.yaml")
    assert s == AgentSettings(
        token_name="azure-token",
        client_id="11111111-1111-1111-1111-111111111111",
        gateway_url="https://teleport.example.com:443",
        imds_url=DEFAULT_IMDS_URL,
        data_dir=DEFAULT_DATA_DIR,
    )
    # No teleport.nodename: the agent asks for no name and the gateway names the node
    # after the VM's verified Azure name (not the hostname, which differs on a scale set).
    assert s.node_name == ""
    assert s.ca_pins == () and s.ca_file is None and s.local_addr is None
    assert s.role == "Node" and s.collect_intermediates
    assert s.aia_allowed_prefixes == DEFAULT_AIA_PREFIXES


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure}
           proxy_server: gw.example.com
         """,
            "client_id",
            None,
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure, azure: {}}
           proxy_server: gw.example.com
         """,
            "gateway_url",
            "https://gw.example.com:443",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure}
           proxy_server: gw.example.com:3080
           ca_pin: SHA256:"""
            + "AB" * 32
            + """
           data_dir: /srv/tp
           nodename: web-1
           auth_servers: [a:3025]
         auth_service: {enabled: false}
         proxy_service: {enabled: false}
         app_service: {enabled: false}
         """,
            "ca_pins",
            None,
        ),
    ],
    ids=[
        "a config without azure.client_id uses the system-assigned identity",
        "a proxy_server without a port means 443",
        "the sha256 pin accepts upper case (lower-cased) and other sections are ignored",
    ],
)
def test_optional_fields_default(text: str, field: str, expected: object) -> None:
    s = parse(text)
    if field == "ca_pins":
        assert s.ca_pins == ("sha256:" + "ab" * 32,)
        assert s.data_dir == Path("/srv/tp") and s.node_name == "web-1"
        assert s.gateway_url == "https://gw.example.com:3080"
    else:
        assert getattr(s, field) == expected


def test_a_list_of_pins_is_accepted() -> None:
    s = parse(f"""\
        version: v3
        teleport:
          join_params: {{token_name: t, method: azure}}
          proxy_server: gw:443
          ca_pin: ["{PIN}", "sha256:{"cd" * 32}"]
        """)
    assert s.ca_pins == (PIN, "sha256:" + "cd" * 32)


@pytest.mark.parametrize(
    ("value", "pins"),
    [
        (None, ()),
        (f'"{PIN}"', (PIN,)),
        (f'["{PIN}", "SHA256:{"CD" * 32}"]', (PIN, "sha256:" + "cd" * 32)),
    ],
    ids=[
        "without teleport.ssh_ca_pin the SSH CA is not pinned",
        "one SSH CA pin is read",
        "a list of SSH CA pins is read and lower-cased",
    ],
)
def test_the_ssh_ca_pin_is_read(value: str | None, pins: tuple[str, ...]) -> None:
    line = f"\n          ssh_ca_pin: {value}" if value is not None else ""
    s = parse(f"""\
        version: v3
        teleport:
          join_params: {{token_name: t, method: azure}}
          proxy_server: gw:443{line}
        """)
    assert s.ssh_ca_pins == pins and s.ca_pins == ()


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            """\
         version: v3
         teleport:
           join_params:
             token_name: t
             method: azure
             client_id: 11111111-1111-1111-1111-111111111111
           proxy_server: gw:443
         """,
            6,
            "join_params.client_id",
        ),
        (
            """\
         version: v3
         teleport:
           join_params:
             token_name: t
             method: azure
             azure:
               client-id: 11111111-1111-1111-1111-111111111111
           proxy_server: gw:443
         """,
            7,
            "azure.client-id",
        ),
        (
            """\
         version: v3
         teleport:
           join_params:
             token_name: t
             method: token
           proxy_server: gw:443
         """,
            5,
            "must be azure",
        ),
        (
            """\
         version: v3
         teleport:
           join_params:
             method: azure
           proxy_server: gw:443
         """,
            3,
            "token_name",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure}
         """,
            2,
            "proxy_server",
        ),
        (
            """\
         version: v2
         teleport:
           join_params: {token_name: t, method: azure}
           proxy_server: gw:443
         """,
            1,
            "v3",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure}
           proxy_server: gw:443
           ca_pin: md5:abcd
         """,
            5,
            "ca_pin",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure}
           proxy_server: gw:443
           ssh_ca_pin: "SHA256:Q3Jvd3MgYXJlIG5vdCBhIGhleCBkaWdlc3Q"
         """,
            5,
            "teleport.ssh_ca_pin",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure, azure: {client_id: not-a-guid}}
           proxy_server: gw:443
         """,
            3,
            "GUID",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure}
           proxy_server: http://gw:80
         """,
            4,
            "HTTPS",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t, method: azure}
           proxy_server: gw:99999
         """,
            4,
            "port",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: [token_name]
           proxy_server: gw:443
         """,
            3,
            "mapping",
        ),
        (
            """\
         version: v3
         teleport:
           join_params: {token_name: t
         """,
            4,
            "YAML",
        ),
        (
            """\
         version: v3
         teleport:
           join_params:
             token_name: t
             method: azure
             token_name: u
           proxy_server: gw:443
         """,
            6,
            "duplicate",
        ),
    ],
    ids=[
        "client_id directly under join_params is an unknown key, with its line",
        "a misspelt key inside join_params.azure is an error with its line",
        "a method other than azure is refused",
        "a missing token_name is refused",
        "a missing proxy_server is refused",
        "a version other than v3 is refused",
        "a pin that is not sha256 hex is refused",
        "an SSH CA pin in ssh-keygen's base64 form is refused, naming ssh_ca_pin",
        "a client_id that is not a GUID is refused",
        "a plain-HTTP proxy_server is refused: the access token must not travel in clear",
        "a port out of range is refused",
        "join_params that is not a mapping is refused",
        "broken YAML is reported with a line",
        "a key repeated inside join_params is an error, not a silent override",
    ],
)
def test_config_errors_name_file_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(NodeConfigError) as err:
        parse(text)
    assert err.value.code == "config_invalid"
    assert err.value.line == line
    assert err.value.message.startswith(f"node.yaml:{line}: ")
    assert fragment in err.value.message


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("gw.example.com:443", "https://gw.example.com:443"),
        ("gw.example.com", "https://gw.example.com:443"),
        ("10.0.0.4:3080", "https://10.0.0.4:3080"),
        ("[::1]:8443", "https://[::1]:8443"),
        ("https://gw.example.com:8443/", "https://gw.example.com:8443"),
    ],
    ids=["host and port", "host only", "IPv4 and port", "bracketed IPv6", "an https URL"],
)
def test_proxy_server_forms(value: str, url: str) -> None:
    assert parse_proxy_server(value) == url


def test_a_pin_is_normalised_to_lower_case() -> None:
    assert parse_ca_pin("sha256:" + "AB" * 32) == PIN


def _args(tmp_path: Path, text: str, *extra: str) -> argparse.Namespace:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(text)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--config", str(cfg), *extra])


def test_command_line_flags_override_the_config(tmp_path: Path) -> None:
    args = _args(
        tmp_path,
        SEED,
        "--imds-url",
        "http://127.0.0.1:9",
        "--ca-file",
        "/x/ca.pem",
        "--data-dir",
        "/x/d",
        "--local-addr",
        "127.0.0.3",
        "--max-attempts",
        "4",
        "--node-name",
        "n1",
        "--aia-allow-prefix",
        "http://127.0.0.1:9/pkiops/certs/",
        "--principal",
        "10.0.0.1",
    )
    s = build_settings(args)
    assert (s.imds_url, s.ca_file, s.data_dir, s.local_addr, s.max_attempts, s.node_name) == (
        "http://127.0.0.1:9",
        Path("/x/ca.pem"),
        Path("/x/d"),
        "127.0.0.3",
        4,
        "n1",
    )
    assert s.aia_allowed_prefixes[-1] == "http://127.0.0.1:9/pkiops/certs/"
    assert s.additional_principals == ("10.0.0.1",)


def test_cli_exits_2_on_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(tmp_path, SEED.replace("method: azure", "method: iam"))
    assert run(args) == 2
    assert "must be azure" in capsys.readouterr().err


def test_cli_exits_1_and_prints_the_code_when_the_join_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1 on loopback refuses the connection: a transport failure, retried up to 1 attempt.
    text = SEED.replace("teleport.example.com:443", "127.0.0.1:1")
    args = _args(tmp_path, text, "--data-dir", str(tmp_path / "d"), "--max-attempts", "1")
    assert run(args) == 1
    assert "connection_failed" in capsys.readouterr().err


def test_settings_refuse_nonsense_limits() -> None:
    with pytest.raises(NodeConfigError) as err:
        AgentSettings(token_name="t", gateway_url="https://g:443", node_name="n", max_attempts=0)
    assert err.value.code == "config_invalid"


def test_cli_exits_2_when_the_ca_file_cannot_be_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(
        tmp_path, SEED, "--data-dir", str(tmp_path / "d"), "--ca-file", str(tmp_path / "none.pem")
    )
    assert run(args) == 2
    assert "none.pem" in capsys.readouterr().err
