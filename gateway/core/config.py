"""The gateway's configuration: one frozen :class:`Config`, parsed once.

``load_config(path)`` reads ``gateway.yaml`` strictly: every key is declared by a
dataclass field below, an unknown key or a value of the wrong type is a
:class:`ConfigError` naming the file and line. Every value has a safe default, so an
empty file is a valid (if not very useful) config. CLI overrides are applied with
:func:`dataclasses.replace` on the loaded object, never by mutating it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from gateway.core.cloud import CLOUDS, CloudProfile, cloud_by_name

__all__ = [
    "AiaConfig",
    "ArmBudgetConfig",
    "AzureConfig",
    "CacheConfig",
    "ChallengeConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "ListenerConfig",
    "MetricsConfig",
    "ProxyConfig",
    "TlsConfig",
    "TokensConfig",
    "UpstreamConfig",
    "check_single_use",
    "dump_config",
    "load_config",
    "parse_config",
]


class ConfigError(Exception):
    """A config or token file is invalid; the message names the file and line."""


@dataclass(frozen=True)
class ListenerConfig:
    address: str = "0.0.0.0:443"
    # Expect a PROXY protocol v1/v2 header (from trusted peers only) before TLS.
    proxy_protocol: bool = False


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = "/etc/join-gateway/tls.crt"
    key_file: str = "/etc/join-gateway/tls.key"
    session_tickets: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    # A separate plain listener for /metrics; empty: /metrics on the main listeners.
    listen: str = ""
    client_ca_file: str = ""


@dataclass(frozen=True)
class ProxyConfig:
    trusted_cidrs: tuple[str, ...] = ()
    # The one header a trusted proxy names the client in; the other is ignored even from
    # a trusted peer (a balancer that sets one header usually passes the other through).
    client_address_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"


@dataclass(frozen=True)
class ChallengeConfig:
    keys_file: str = "/etc/join-gateway/challenge-keys"
    ttl_seconds: float = 60.0


@dataclass(frozen=True)
class AiaConfig:
    enabled: bool = True
    # Added to the built-in Microsoft/DigiCert prefixes (tests: the emulator's URL).
    extra_allowed_prefixes: tuple[str, ...] = ()
    # Production refuses private, loopback and link-local destinations (SSRF).
    allow_private_destinations: bool = False
    timeout_seconds: float = 5.0
    max_bytes: int = 65536


@dataclass(frozen=True)
class ArmBudgetConfig:
    """Our own spending limit for Resource Manager reads, per subscription: Azure's
    published limits (250 burst, +25/s; 300 list calls a minute) less a safety margin,
    so the gateway never provokes a 429."""

    burst: float = 250.0
    refill_per_second: float = 25.0
    list_per_minute: int = 300
    safety_margin: float = 0.1
    # A join waits this long for a token before it gets 503 + Retry-After.
    max_wait_seconds: float = 1.0


@dataclass(frozen=True)
class AzureConfig:
    cloud: str = "public"
    # Extra PEM files: self-signed certs become pinned roots, others intermediates.
    extra_ca_files: tuple[str, ...] = ()
    # Only the pinned roots of extra_ca_files, not the bundled Azure roots.
    bundled_roots: bool = True
    # Subject CNs under which request intermediates may reach path building, besides the
    # CAs' in the trust store and Azure's documented issuing CAs (e.g. the emulator's).
    known_issuer_names: tuple[str, ...] = ()
    allowed_tenants: tuple[str, ...] = ()
    vm_binding: bool = True
    # Overrides for the cloud's endpoints (the emulator, a private link).
    authority_host: str = ""
    arm_endpoint: str = ""
    # Extra trust for outbound HTTPS (Entra, ARM) — e.g. the emulator's TLS CA.
    outbound_ca_file: str = ""
    clock_skew_seconds: float = 60.0
    token_leeway_seconds: float = 60.0
    # Per-request limit for Entra ID and Resource Manager calls.
    request_timeout_seconds: float = 5.0
    aia: AiaConfig = AiaConfig()
    arm_budget: ArmBudgetConfig = ArmBudgetConfig()


@dataclass(frozen=True)
class TokensConfig:
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "https://127.0.0.1:3025"
    client_cert_file: str = ""
    client_key_file: str = ""
    ca_file: str = ""
    timeout_seconds: float = 10.0
    max_connections: int = 64
    # Consecutive failures that open the circuit, and how long it stays open.
    breaker_failures: int = 5
    breaker_reset_seconds: float = 10.0
    # Registrations that arrive together share one POST /v1/register/batch request (up to
    # 64). false: one request per registration — for an auth service without the batch
    # endpoint (one that answers it 404/405 is detected and falls back on its own).
    batch: bool = True


@dataclass(frozen=True)
class CacheConfig:
    # false: no caching and no coalescing at all — only the benchmark's naive baseline.
    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    jwks_ttl_seconds: float = 86400.0
    jwks_min_refresh_seconds: float = 300.0
    vm_ttl_seconds: float = 300.0
    negative_ttl_seconds: float = 30.0
    # A resource group is listed once (not read VM by VM) when this many of its VMs miss
    # within list_window_seconds; its vmId map is reread at most every map_refresh_seconds.
    list_threshold: int = 3
    list_window_seconds: float = 5.0
    map_refresh_seconds: float = 30.0


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 65536
    # The whole body must arrive within this: a slow drip does not hold a slot forever.
    body_read_timeout_seconds: float = 10.0
    # Every request's headers must arrive within this (slowloris): a new connection's
    # from the accept, a kept-alive connection's from the next request's first byte.
    header_read_timeout_seconds: float = 10.0
    # An idle kept-alive connection is closed after this. Above the balancer's own
    # upstream idle timeout (nginx: 60 s), so that the balancer, not we, closes first.
    keepalive_timeout_seconds: float = 75.0
    # Open connections per worker (TLS handshakes included); beyond it a new connection
    # is closed at accept, before any TLS work. Keep it below the open-files limit.
    max_connections: int = 1024
    max_in_flight: int = 256
    max_queue: int = 1024
    queue_timeout_seconds: float = 5.0
    retry_after_seconds: float = 2.0
    # Per client address (after trusted-proxy headers), challenge and join requests per
    # second; 0 = no limit (the default: VMs behind one NAT share an address).
    per_client_rate: float = 0.0
    per_client_burst: float = 20.0


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    tls: TlsConfig = TlsConfig()
    metrics: MetricsConfig = MetricsConfig()
    proxy: ProxyConfig = ProxyConfig()
    challenge: ChallengeConfig = ChallengeConfig()
    azure: AzureConfig = AzureConfig()
    tokens: TokensConfig = TokensConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()
    workers: int = 1
    shutdown_timeout_seconds: float = 30.0
    # On SIGTERM: unready at once, keep serving this long (balancers notice), then drain.
    drain_delay_seconds: float = 0.0
    # On drain: connections with no complete request get this long to send one (answered
    # 503 shutting_down with Connection: close), then they are closed.
    shutdown_grace_seconds: float = 1.0
    log_level: str = "INFO"
    # Where relative paths in this file are resolved from (set by load_config).
    base_dir: str = "."

    @property
    def cloud(self) -> CloudProfile:
        return cloud_by_name(self.azure.cloud)

    def path(self, value: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.proxy.trusted_cidrs)


# --- strict loading ---------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    cfg = parse_config(text, source=str(p))
    return dataclasses.replace(cfg, base_dir=str(p.parent.resolve()))


def parse_config(text: str, *, source: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    cfg = Config() if node is None else _build(Config, node, source, "")
    _validate(cfg, source)
    line = _key_line(node, "workers") or _key_line(node, "cache", "backend")
    check_single_use(cfg, f"{source}:{line}" if line else source)
    return cfg


def check_single_use(cfg: Config, where: str) -> None:
    """A challenge is redeemed at most once across processes: several workers need the
    replay store they all share (Redis). ``where`` is the file and line, or the flag, that
    set the worker count. Raises :class:`ConfigError`."""
    if cfg.workers > 1 and cfg.cache.backend == "memory":
        raise ConfigError(
            f"{where}: workers: {cfg.workers} needs cache.backend: redis (with "
            "cache.redis_url): with the memory backend each worker keeps its own replay "
            "store, and one challenge could be redeemed once per worker"
        )


def _key_line(node: yaml.Node | None, *path: str) -> int | None:
    """The 1-based line of the key at ``path`` in a composed mapping, if it is there."""
    line = None
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            return None
        found = next(((k, v) for k, v in node.value if k.value == key), None)
        if found is None:
            return None
        line, node = int(found[0].start_mark.line) + 1, found[1]
    return line


def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _build(cls: type[Any], node: yaml.Node, source: str, ctx: str) -> Any:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(source, node)}: {ctx or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "base_dir"}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = key_node.value
        name = f"{ctx}.{key}" if ctx else key
        if key not in fields:
            raise ConfigError(
                f"{_where(source, key_node)}: unknown key {name!r} "
                f"(known: {', '.join(sorted(fields))})"
            )
        if key in values:
            raise ConfigError(f"{_where(source, key_node)}: duplicate key {name!r}")
        values[key] = _convert(hints[key], value_node, source, name)
    return cls(**values)


def _scalar(node: yaml.Node) -> Any:
    return yaml.SafeLoader(b"").construct_object(node)


def _convert(tp: Any, node: yaml.Node, source: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, node, source, name)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError(f"{_where(source, node)}: {name} must be a list")
        return tuple(_convert(item_tp, n, source, f"{name}[{i}]") for i, n in enumerate(node.value))
    if origin is Literal:
        value = _scalar(node)
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"{_where(source, node)}: {name} must be one of {list(typing.get_args(tp))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {tp}")  # none declared; keep it that way
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{_where(source, node)}: {name} must be a {tp.__name__}")
    value = _scalar(node)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported config type {tp}")
    if not ok:
        raise ConfigError(f"{_where(source, node)}: {name} must be a {tp.__name__}, got {value!r}")
    problem = _value_problem(name, value)
    if problem is not None:
        raise ConfigError(f"{_where(source, node)}: {name} {problem}")
    return value


def _value_problem(name: str, value: Any) -> str | None:
    """What is wrong with one well-typed value (checked where it is read, so the error
    names its line); None when nothing is. Cross-key rules stay in ``_validate``."""
    # A list item's checks are declared once for the list: "listeners[2].address" is
    # checked as "listeners[].address".
    check = _VALUE_CHECKS.get(re.sub(r"\[\d+\]", "[]", name))
    if check is not None:
        return check(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        # No count, size, rate or duration of ours means anything below zero.
        if value < 0:
            return f"must be >= 0, got {value!r}"
        if name.endswith("timeout_seconds") and value == 0:
            return "must be > 0 (a zero timeout fails every call)"
    return None


def _redis_url(value: str) -> str | None:
    # redis-py's own parser, so what passes here is what redis_client() accepts; it lets
    # a host-less URL or a non-numeric database through silently, we do not.
    from redis.asyncio.connection import parse_url

    try:
        parsed = parse_url(value)
    except ValueError as exc:
        return f"is not a Redis URL ({exc})"
    parts = urlsplit(value)
    if parts.scheme == "unix":
        return None if parsed.get("path") else "names no socket path (unix:///path)"
    if not parsed.get("host"):
        return "names no host (redis://host:port/db)"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"database {db!r} is not a number"
    return None


def _https_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        return f"must be https:// with a host, got {value!r}"
    return None


def _optional_https_url(value: str) -> str | None:
    return None if value == "" else _https_url(value)


def _one_of(choices: Sequence[str]) -> typing.Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {sorted(choices)}"


def _within(
    low: float, high: float, *, low_open: bool = False
) -> typing.Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = (low < value if low_open else low <= value) and value <= high
        return None if ok else f"must be within {low:g}..{high:g}"

    return check


def _at_least(low: int) -> typing.Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be >= {low}"


def _cidr(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not a CIDR"
    return None


def _hostport(value: str) -> str | None:
    try:
        split_hostport(value)
    except ValueError as exc:
        return str(exc)
    return None


def _optional_hostport(value: str) -> str | None:
    return None if value == "" else _hostport(value)


_VALUE_CHECKS: dict[str, typing.Callable[[Any], str | None]] = {
    "azure.cloud": _one_of(tuple(CLOUDS)),
    "proxy.trusted_cidrs[]": _cidr,
    "listeners[].address": _hostport,
    "metrics.listen": _optional_hostport,
    "workers": _at_least(1),
    "shutdown_grace_seconds": _within(0, 10),
    "challenge.ttl_seconds": _within(5, 3600),
    "limits.max_body_bytes": _within(1024, 1024 * 1024),
    "limits.max_in_flight": _at_least(1),
    "limits.max_connections": _at_least(1),
    "limits.header_read_timeout_seconds": _within(0, 300, low_open=True),
    "limits.keepalive_timeout_seconds": _within(0, 3600, low_open=True),
    "cache.redis_url": _redis_url,
    # The auth service is reached over mTLS only.
    "upstream.url": _https_url,
    "azure.authority_host": _optional_https_url,
    "azure.arm_endpoint": _optional_https_url,
}


def _validate(cfg: Config, source: str) -> None:
    """Rules across keys (one key's own value is checked where it is read, with its line)."""
    problems: list[str] = []
    if not cfg.listeners:
        problems.append("listeners: at least one listener is needed")
    problems.extend(_shared_ports(cfg))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*"})


def _shared_ports(cfg: Config) -> list[str]:
    """Two of the listeners (``metrics.listen`` included) on one port of one address.

    The supervisor binds every listener with ``SO_REUSEPORT``, so the kernel would accept
    both binds and split connections between them: TLS clients landing on the plain
    ``/metrics`` listener (or on a PROXY-protocol one) would fail at random. A wildcard
    host shares its port with every address. Port 0 (any free port) never clashes."""
    named = [(f"listeners[{i}].address", lst.address) for i, lst in enumerate(cfg.listeners)]
    if cfg.metrics.listen:
        named.append(("metrics.listen", cfg.metrics.listen))
    seen: list[tuple[str, str, str, int]] = []
    problems: list[str] = []
    for key, address in named:
        try:
            host, port = split_hostport(address)
        except ValueError:
            continue  # refused with its own message where the key is read
        for other_key, other_address, other_host, other_port in seen:
            same_host = host == other_host or {host, other_host} & _WILDCARD_HOSTS
            if port and port == other_port and same_host:
                problems.append(
                    f"{other_key} {other_address!r} and {key} {address!r} share a port: "
                    "the kernel would split connections between them"
                )
        seen.append((key, address, host, port))
    return problems


def split_hostport(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{value!r} is not host:port")
        return value, default_port
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host, int(port)


def dump_config(config: Config) -> str:
    """The config as YAML that ``parse_config`` reads back to an equal object."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.name != "base_dir"
            }
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return str(yaml.safe_dump(plain(config), sort_keys=False))


def config_keys(cls: type[Any] = Config, prefix: str = "") -> Sequence[str]:
    """Every dotted key the config accepts (for docs and `check-config --keys`)."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "base_dir":
            continue
        tp = hints[f.name]
        name = prefix + f.name
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out.extend(config_keys(tp, name + "."))
        else:
            out.append(name)
    return out
