"""The node config the operator writes on the VM, turned into frozen :class:`AgentSettings`.

The file is the seed's Teleport node config, accepted unchanged: the agent reads
``teleport.join_params`` (token name, ``method: azure``, ``azure.client_id``),
``teleport.proxy_server`` (the gateway), and optionally ``teleport.ca_pin``,
``teleport.ssh_ca_pin``, ``teleport.data_dir`` and ``teleport.nodename``. Everything else
in the file (``ssh_service``, ``auth_service``, other ``teleport`` keys ...) belongs to other
programs and is ignored. ``join_params`` is ours alone, so an unknown key there is a typo and
an error that names the file and line: a silently ignored ``client-id`` would join with the
wrong identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.agent.errors import NodeConfigError
from gateway.protocol import is_guid

__all__ = [
    "DEFAULT_AIA_PREFIXES",
    "DEFAULT_DATA_DIR",
    "DEFAULT_IMDS_URL",
    "AgentSettings",
    "load_node_config",
    "parse_ca_pin",
    "parse_node_config",
    "parse_proxy_server",
]

DEFAULT_IMDS_URL = "http://169.254.169.254"
DEFAULT_DATA_DIR = Path("/var/lib/teleport")
# Where Azure's metadata signer certificates point their AIA caIssuers URLs (see
# tests/data/azure-real/README.md); anything else is not fetched.
DEFAULT_AIA_PREFIXES: tuple[str, ...] = (
    "http://www.microsoft.com/pkiops/certs/",
    "http://caissuers.microsoft.com/pkiops/certs/",
    "http://cacerts.digicert.com/",
)

_JOIN_PARAMS_KEYS = frozenset({"token_name", "method", "azure"})
_AZURE_KEYS = frozenset({"client_id"})
_PIN_RE = re.compile(r"^sha256:([0-9a-f]{64})$", re.IGNORECASE)
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class AgentSettings:
    """Everything one join needs. Built from the node config; tests and the demo build it directly.

    Parameters:
        token_name: the provision token to join with (not a secret).
        client_id: the user-assigned managed identity; ``None`` = system-assigned.
        gateway_url: ``https://host:port`` of the gateway (the node config's proxy_server).
        imds_url: base URL of IMDS.
        data_dir: where keys and certificates go (0700; files 0600).
        ca_pins: ``sha256:<hex>`` SPKI pins of the cluster CA; empty = no pinning.
        ssh_ca_pins: ``sha256:<hex>`` pins of the SSH host CA's public key (the SSH wire
            blob); empty = no pinning.
        ca_file: extra trust anchors for the gateway's TLS certificate (added to the system store).
        local_addr: source IP for outgoing connections (tests give each emulated VM its own).
    """

    token_name: str
    gateway_url: str
    client_id: str | None = None
    imds_url: str = DEFAULT_IMDS_URL
    data_dir: Path = DEFAULT_DATA_DIR
    ca_pins: tuple[str, ...] = ()
    ssh_ca_pins: tuple[str, ...] = ()
    ca_file: Path | None = None
    node_name: str = ""
    role: str = "Node"
    additional_principals: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    collect_intermediates: bool = True
    aia_allowed_prefixes: tuple[str, ...] = DEFAULT_AIA_PREFIXES
    max_attempts: int = 10
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    total_timeout: float = 600.0
    local_addr: str | None = None
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise NodeConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_base < 0 or self.backoff_cap < 0 or self.total_timeout <= 0:
            raise NodeConfigError("backoff_base/backoff_cap must be >= 0 and total_timeout > 0")


def parse_ca_pin(
    value: object, *, source: str = "", line: int | None = None, key: str = "teleport.ca_pin"
) -> str:
    """``sha256:<64 hex>`` → normalised lower-case pin, or :class:`NodeConfigError` naming
    ``key``."""
    if not isinstance(value, str) or not (m := _PIN_RE.match(value.strip())):
        raise NodeConfigError(f"{key} must be 'sha256:<64 hex digits>'", source=source, line=line)
    return "sha256:" + m.group(1).lower()


def parse_proxy_server(value: object, *, source: str = "", line: int | None = None) -> str:
    """``host[:port]`` (port defaults to 443; ``[v6]:port`` accepted) → ``https://host:port``."""
    if not isinstance(value, str) or not value.strip():
        raise NodeConfigError("teleport.proxy_server must be 'host:port'", source=source, line=line)
    text = value.strip()
    if "://" in text:
        # The gateway is always HTTPS: an access token must never travel in clear text.
        if not text.startswith("https://"):
            raise NodeConfigError(
                "teleport.proxy_server must be host:port (HTTPS only)", source=source, line=line
            )
        text = text[len("https://") :].rstrip("/")
    host, port_text = text, "443"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise NodeConfigError(
                f"bad IPv6 address in proxy_server {value!r}", source=source, line=line
            )
        host, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise NodeConfigError(f"bad proxy_server {value!r}", source=source, line=line)
            port_text = rest[1:]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    if not host.startswith("[") and not _HOST_RE.fullmatch(host):
        raise NodeConfigError(f"bad host in proxy_server {value!r}", source=source, line=line)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise NodeConfigError(f"bad port in proxy_server {value!r}", source=source, line=line)
    return f"https://{host}:{int(port_text)}"


class _Doc:
    """The composed YAML tree: values plus the line each key sits on, for error messages."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.root = node
            self._loader = loader
            self.data: Any = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise NodeConfigError(f"not valid YAML: {exc}", source=source, line=line) from exc
        finally:
            loader.dispose()

    def line(self, *path: str) -> int | None:
        """Line (1-based) of the key at ``path``, or of the deepest existing parent."""
        node: yaml.Node | None = self.root
        line = 1
        for key in path:
            if not isinstance(node, yaml.MappingNode):
                return line
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                return line
        return line

    def node(self, *path: str) -> yaml.Node | None:
        node: yaml.Node | None = self.root
        for key in path:
            if not isinstance(node, yaml.MappingNode):
                return None
            node = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key),
                None,
            )
        return node

    def check_no_duplicates(self, *path: str) -> None:
        """YAML lets a repeated key silently win; in our own section that hides a mistake."""
        stack = [self.node(*path)]
        while stack:
            node = stack.pop()
            if not isinstance(node, yaml.MappingNode):
                continue
            seen: set[str] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise NodeConfigError(
                            f"duplicate key {k.value!r} in {'.'.join(path)}",
                            source=self.source,
                            line=k.start_mark.line + 1,
                        )
                    seen.add(k.value)
                stack.append(v)

    def error(self, message: str, *path: str) -> NodeConfigError:
        return NodeConfigError(message, source=self.source, line=self.line(*path))


def _mapping(doc: _Doc, value: object, *path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise doc.error(f"{'.'.join(path) or 'document'} must be a mapping", *path)
    for key in value:
        if not isinstance(key, str):
            raise doc.error(f"keys of {'.'.join(path)} must be strings", *path)
    return value


def _string(doc: _Doc, value: object, *path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error(f"{'.'.join(path)} must be a non-empty string", *path)
    return value.strip()


def _pins(doc: _Doc, tele: dict[str, Any], key: str) -> tuple[str, ...]:
    """``teleport.<key>``: one pin or a list of them (a list lets a CA rotation overlap)."""
    raw = tele.get(key)
    if raw is None:
        return ()
    line = doc.line("teleport", key)
    raw_list = raw if isinstance(raw, list) else [raw]
    return tuple(
        parse_ca_pin(p, source=doc.source, line=line, key=f"teleport.{key}") for p in raw_list
    )


def parse_node_config(text: str, *, source: str = "<node config>") -> AgentSettings:
    """Parse the node config's text. Without ``teleport.nodename`` the node name is left
    to the gateway (the VM's verified Azure name, or the token's template)."""
    doc = _Doc(text, source)
    top = _mapping(doc, doc.data)
    version = top.get("version")
    if version != "v3":
        raise doc.error(f"version must be v3, got {version!r}", "version")
    if "teleport" not in top:
        raise doc.error("missing the teleport section")
    tele = _mapping(doc, top["teleport"], "teleport")
    if "join_params" not in tele:
        raise doc.error("missing teleport.join_params", "teleport")
    jp = _mapping(doc, tele["join_params"], "teleport", "join_params")
    doc.check_no_duplicates("teleport", "join_params")
    for key in jp:
        if key not in _JOIN_PARAMS_KEYS:
            raise doc.error(
                f"unknown key teleport.join_params.{key} (allowed: "
                f"{', '.join(sorted(_JOIN_PARAMS_KEYS))})",
                "teleport",
                "join_params",
                key,
            )
    if "token_name" not in jp:
        raise doc.error("missing teleport.join_params.token_name", "teleport", "join_params")
    token_name = _string(doc, jp["token_name"], "teleport", "join_params", "token_name")
    method = jp.get("method")
    if method != "azure":
        raise doc.error(
            f"teleport.join_params.method must be azure, got {method!r}",
            "teleport",
            "join_params",
            "method",
        )
    client_id: str | None = None
    if jp.get("azure") is not None:
        az = _mapping(doc, jp["azure"], "teleport", "join_params", "azure")
        for key in az:
            if key not in _AZURE_KEYS:
                raise doc.error(
                    f"unknown key teleport.join_params.azure.{key} (allowed: client_id)",
                    "teleport",
                    "join_params",
                    "azure",
                    key,
                )
        if az.get("client_id") is not None:
            client_id = _string(
                doc, az["client_id"], "teleport", "join_params", "azure", "client_id"
            )
            if not is_guid(client_id):
                raise doc.error(
                    "teleport.join_params.azure.client_id must be a GUID",
                    "teleport",
                    "join_params",
                    "azure",
                    "client_id",
                )
    if "proxy_server" not in tele:
        raise doc.error("missing teleport.proxy_server (the gateway's host:port)", "teleport")
    gateway_url = parse_proxy_server(
        tele["proxy_server"], source=source, line=doc.line("teleport", "proxy_server")
    )
    pins = _pins(doc, tele, "ca_pin")
    ssh_pins = _pins(doc, tele, "ssh_ca_pin")
    data_dir = DEFAULT_DATA_DIR
    if tele.get("data_dir") is not None:
        data_dir = Path(_string(doc, tele["data_dir"], "teleport", "data_dir"))
    # Unset, the gateway names the node after the VM's verified Azure name (the hostname
    # differs on a uniform scale set, whose instances are <set>_<id>); a configured name
    # is sent, and the gateway accepts it only if the token's name policy gives it.
    node_name = ""
    if tele.get("nodename") is not None:
        node_name = _string(doc, tele["nodename"], "teleport", "nodename")
    return AgentSettings(
        token_name=token_name,
        client_id=client_id,
        gateway_url=gateway_url,
        data_dir=data_dir,
        ca_pins=pins,
        ssh_ca_pins=ssh_pins,
        node_name=node_name,
    )


def load_node_config(path: Path) -> AgentSettings:
    """Read and parse the node config at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeConfigError(f"cannot read: {exc}", source=str(path)) from exc
    return parse_node_config(text, source=str(path))
