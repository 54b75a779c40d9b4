from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.config import Config, ConfigError, config_keys, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_empty_config_is_all_defaults() -> None:
    assert parse_config("") == Config()
    cfg = Config()
    assert cfg.limits.max_body_bytes == 65536
    assert cfg.challenge.ttl_seconds == 60
    assert cfg.azure.vm_binding is True
    assert cfg.azure.aia.allow_private_destinations is False
    assert cfg.cloud.metadata_domain == "metadata.azure.com"


def test_example_config_loads_and_resolves_paths_relative_to_it() -> None:
    cfg = load_config(REPO / "config" / "gateway.yaml")
    assert cfg.base_dir == str((REPO / "config").resolve())
    assert cfg.path("token.yaml") == REPO / "config" / "token.yaml"
    assert cfg.path("/abs") == Path("/abs")


def test_config_keys_lists_every_dotted_key() -> None:
    keys = config_keys()
    assert "azure.aia.allow_private_destinations" in keys
    assert "limits.max_in_flight" in keys
    assert "base_dir" not in keys


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("azure:\n  clod: public\n", "g.yaml:2", "unknown key 'azure.clod'"),
        ("workers: 2\nworkers: 3\n", "g.yaml:2", "duplicate key"),
        ("workers: two\n", "g.yaml:1", "workers must be a int"),
        ("workers: true\n", "g.yaml:1", "workers must be a int"),
        ("azure:\n  vm_binding: 1\n", "g.yaml:2", "must be a bool"),
        ("listeners: {}\n", "g.yaml:1", "must be a list"),
        ("listeners:\n  - addr: x\n", "g.yaml:2", "unknown key 'listeners[0].addr'"),
        ("cache:\n  backend: memcached\n", "g.yaml:2", "must be one of"),
        ("azure:\n  cloud: mars\n", "g.yaml", "azure.cloud must be one of"),
        ("proxy:\n  trusted_cidrs: [10.0.0.0/33]\n", "g.yaml", "is not a CIDR"),
        ("listeners:\n  - address: nohost\n", "g.yaml", "is not host:port"),
        ("upstream:\n  url: http://auth:3025\n", "g.yaml", "must be https://"),
        ("challenge:\n  ttl_seconds: 1\n", "g.yaml", "ttl_seconds"),
        ("- a\n- b\n", "g.yaml:1", "must be a mapping"),
        ("a: [\n", "g.yaml", "invalid YAML"),
        ("workers: 2\n", "g.yaml:1", "workers: 2 needs cache.backend: redis"),
        ("cache:\n  backend: memory\nworkers: 4\n", "g.yaml:3", "needs cache.backend: redis"),
        ("proxy:\n  client_address_header: x-real-ip\n", "g.yaml:2", "must be one of"),
        ("limits:\n  keepalive_timeout_seconds: 0\n", "g.yaml", "keepalive_timeout_seconds"),
        ("limits:\n  max_connections: 0\n", "g.yaml", "max_connections must be >= 1"),
        ("shutdown_grace_seconds: 30\n", "g.yaml", "shutdown_grace_seconds"),
        ("cache:\n  backend: redis\n  redis_url: http://x\n", "g.yaml:3", "is not a Redis URL"),
        ("cache:\n  redis_url: redis://h:abc/0\n", "g.yaml:2", "is not a Redis URL"),
        ("cache:\n  redis_url: redis://\n", "g.yaml:2", "names no host"),
        ("cache:\n  redis_url: redis://h/zero\n", "g.yaml:2", "database 'zero' is not a number"),
        ("cache:\n  redis_url: unix://\n", "g.yaml:2", "names no socket path"),
        ("azure:\n  arm_endpoint: http://arm\n", "g.yaml:2", "must be https://"),
        ("limits:\n  max_queue: -1\n", "g.yaml:2", "must be >= 0"),
        ("upstream:\n  timeout_seconds: 0\n", "g.yaml:2", "must be > 0"),
        (
            "proxy:\n  trusted_cidrs:\n    - 10.0.0.0/8\n    - 10.0.0.0/33\n",
            "g.yaml:4",
            "proxy.trusted_cidrs[1] '10.0.0.0/33' is not a CIDR",
        ),
        (
            "listeners:\n  - address: 0.0.0.0:443\n  - address: nohost\n",
            "g.yaml:3",
            "listeners[1].address 'nohost' is not host:port",
        ),
        ("azure:\n  cloud: mars\n", "g.yaml:2", "azure.cloud must be one of"),
        (
            "listeners:\n  - address: 127.0.0.1:8443\nmetrics:\n  listen: 127.0.0.1:8443\n",
            "g.yaml",
            "listeners[0].address '127.0.0.1:8443' and metrics.listen '127.0.0.1:8443' share",
        ),
        (
            "listeners:\n  - address: 0.0.0.0:443\n  - address: 10.0.0.4:443\n",
            "g.yaml",
            "listeners[0].address '0.0.0.0:443' and listeners[1].address '10.0.0.4:443' share",
        ),
    ],
    ids=[
        "an unknown key names its file and line",
        "a duplicate key is an error",
        "a string where an int belongs",
        "a bool is not an int",
        "an int is not a bool",
        "a mapping where a list belongs",
        "unknown keys inside list items are found",
        "a backend outside the choices",
        "an unknown cloud",
        "a CIDR that does not parse",
        "a listener without a port",
        "a plain-HTTP upstream",
        "a challenge lifetime out of range",
        "a document that is not a mapping",
        "YAML that does not parse",
        "several workers with the default memory backend would redeem a challenge per worker",
        "the memory backend named explicitly with several workers points at the workers line",
        "a client address header outside the choices",
        "a keep-alive idle time of zero",
        "a connection cap of zero",
        "a drain grace longer than ten seconds",
        "a Redis URL of another scheme is a config error",
        "a Redis URL whose port is not a number is a config error",
        "a Redis URL without a host is a config error",
        "a Redis URL whose database is not a number is a config error",
        "a unix Redis URL without a path is a config error",
        "an endpoint override over plain HTTP is a config error",
        "a negative size is a config error",
        "a zero timeout is a config error",
        "the bad item of a list is named with its line",
        "the bad listener of several is named with its line",
        "an unknown cloud is named with its line",
        "the metrics listener on the main listener's port would take some of its connections",
        "a wildcard listener shares its port with every address",
    ],
)
def test_bad_configs_name_file_and_line(text: str, where: str, what: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="g.yaml")
    assert str(err.value).startswith(where)
    assert what in str(err.value)


def test_dump_config_round_trips() -> None:
    from gateway.core.config import (
        AiaConfig,
        AzureConfig,
        CacheConfig,
        ListenerConfig,
        ProxyConfig,
        dump_config,
    )

    cfg = Config(
        listeners=(ListenerConfig("127.0.0.1:8443", proxy_protocol=True),),
        proxy=ProxyConfig(trusted_cidrs=("10.0.0.0/8",)),
        azure=AzureConfig(cloud="china", aia=AiaConfig(extra_allowed_prefixes=("http://x/",))),
        cache=CacheConfig(backend="redis"),
        workers=3,
    )
    assert parse_config(dump_config(cfg)) == cfg


def test_several_workers_with_redis_are_accepted() -> None:
    cfg = parse_config("workers: 2\ncache:\n  backend: redis\n")
    assert cfg.workers == 2 and cfg.cache.backend == "redis"


def test_workers_flag_with_the_memory_backend_is_a_startup_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    config = tmp_path / "gateway.yaml"
    config.write_text("log_level: INFO\n")
    assert main(["serve", "-c", str(config), "--workers", "2"]) == 3
    assert "--workers 2: workers: 2 needs cache.backend: redis" in capsys.readouterr().err


def test_new_connection_defaults_are_bounded() -> None:
    cfg = Config()
    assert cfg.proxy.client_address_header == "x-forwarded-for"
    assert cfg.limits.keepalive_timeout_seconds <= 75
    assert cfg.limits.max_connections >= 1
    assert 0 < cfg.shutdown_grace_seconds <= 1
