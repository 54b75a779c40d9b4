"""The composition root: each resource closes what it opened, config values are checked at
load with file and line, and SIGHUP swaps tokens and challenge keys whole."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.config import (
    CacheConfig,
    ChallengeConfig,
    Config,
    ConfigError,
    TokensConfig,
    UpstreamConfig,
    parse_config,
)
from gateway.core.reload import Reloadable
from gateway.join.challenge import write_new_keys_file
from gateway.join.deps import production_deps
from tests.support.tokens import azure_token_yaml


class CountingSessions:
    """Opens real ``aiohttp.ClientSession`` s and remembers them, to count the closed ones."""

    def __init__(self) -> None:
        self.sessions: list[aiohttp.ClientSession] = []

    def __call__(self, **kwargs: Any) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(**kwargs)
        self.sessions.append(session)
        return session

    @property
    def opened(self) -> int:
        return len(self.sessions)

    @property
    def closed(self) -> int:
        return sum(s.closed for s in self.sessions)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A config whose every file exists; memory backend; the auth service never called."""
    (tmp_path / "tokens.yaml").write_text(azure_token_yaml())
    write_new_keys_file(tmp_path / "challenge-keys")
    return Config(
        challenge=ChallengeConfig(keys_file="challenge-keys"),
        tokens=TokensConfig(files=("tokens.yaml",)),
        base_dir=str(tmp_path),
    )


def _with(**sections: Callable[[Config], object]) -> Callable[[Config], Config]:
    def change(cfg: Config) -> Config:
        return dataclasses.replace(cfg, **{k: f(cfg) for k, f in sections.items()})

    return change


# A Config built in code skips load-time validation, so a bad value reaches its factory:
# each row breaks one factory and says how many sessions were open by then.
FAILURES = [
    (
        "a missing outbound CA file fails before any session is opened",
        _with(azure=lambda c: dataclasses.replace(c.azure, outbound_ca_file="missing.pem")),
        OSError,
        0,
    ),
    (
        "a missing auth-service CA file closes the outbound session",
        _with(upstream=lambda c: dataclasses.replace(c.upstream, ca_file="missing.pem")),
        OSError,
        1,
    ),
    (
        "a Redis URL that does not parse closes both sessions",
        _with(cache=lambda c: CacheConfig(backend="redis", redis_url="http://not-redis")),
        ValueError,
        2,
    ),
    (
        "a binder setting refused after Redis is open closes everything",
        _with(
            cache=lambda c: CacheConfig(
                backend="redis", redis_url="redis://127.0.0.1:9/0", list_threshold=0
            )
        ),
        ValueError,
        2,
    ),
]


@pytest.mark.parametrize(
    ("change", "error", "sessions"),
    [f[1:] for f in FAILURES],
    ids=[f[0] for f in FAILURES],
)
async def test_a_failing_factory_closes_what_was_opened(
    config: Config, change: Callable[[Config], Config], error: type[Exception], sessions: int
) -> None:
    counting = CountingSessions()
    with pytest.raises(error):
        async with production_deps(change(config), open_session=counting):
            pytest.fail("the deps must not be built")
    assert counting.opened == sessions
    assert counting.closed == sessions


async def test_a_failure_while_in_use_closes_everything(config: Config) -> None:
    counting = CountingSessions()
    with pytest.raises(RuntimeError):
        async with production_deps(config, open_session=counting) as deps:
            assert counting.opened == 2 and counting.closed == 0
            assert deps.tokens.current.names() == ["azure-token"]
            raise RuntimeError("the server failed to start")
    assert counting.closed == 2


async def test_a_missing_token_file_opens_nothing(config: Config) -> None:
    counting = CountingSessions()
    broken = dataclasses.replace(config, tokens=TokensConfig(files=("absent.yaml",)))
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        async with production_deps(broken, open_session=counting):
            pass
    assert counting.opened == 0


async def test_the_auth_client_gets_the_configured_pool_and_tls(config: Config) -> None:
    cfg = dataclasses.replace(config, upstream=UpstreamConfig(max_connections=7))
    counting = CountingSessions()
    async with production_deps(cfg, open_session=counting) as deps:
        auth_session = counting.sessions[1]
        assert auth_session.connector is not None
        assert auth_session.connector.limit == 7
        assert deps.auth.breaker is not None


# --- config values are checked where they are read (the bad ones: tests/unit/test_config.py)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://cache.internal:6380/2", "unix:///run/r.sock"]
)
def test_good_redis_urls_load(url: str) -> None:
    assert parse_config(f"cache:\n  redis_url: {url}\n").cache.redis_url == url


# --- SIGHUP: one holder swapped whole ------------------------------------------------------


async def test_reload_swaps_tokens_and_keys_whole_and_a_bad_file_keeps_them(
    config: Config,
) -> None:
    async with production_deps(config) as deps:
        with pytest.raises(dataclasses.FrozenInstanceError):
            deps.binder = None  # type: ignore[misc]
        registry, codec = deps.tokens.current, deps.challenges
        issued = codec.issue().value

        Path(config.base_dir, "tokens.yaml").write_text(
            azure_token_yaml(name="renamed") + "---\n" + azure_token_yaml(name="second")
        )
        write_new_keys_file(Path(config.base_dir, "challenge-keys"))
        assert all([h.reload() for h in deps.reloadables()])
        assert deps.tokens.current.names() == ["renamed", "second"]
        assert registry.names() == ["azure-token"]  # a join holding the old one keeps it
        assert deps.challenges is not codec and deps.challenges.key_count == 2
        deps.challenges.verify(issued)  # the old key still verifies after the rotation

        Path(config.base_dir, "tokens.yaml").write_text("kind: token\nversion: [broken\n")
        current = deps.tokens.current
        assert deps.tokens.reload() is False
        assert deps.tokens.current is current


def test_a_holder_reloads_only_when_its_loader_succeeds() -> None:
    values = iter([1, 2])

    def load() -> int:
        value = next(values, None)
        if value is None:
            raise ValueError("no more")
        return value

    holder = Reloadable("number", load)
    assert holder.current == 1
    assert holder.reload() and holder.current == 2 and holder.reloads == 1
    assert not holder.reload() and holder.current == 2 and holder.reloads == 1


CHECKED_FILES = [
    ("azure:\n  outbound_ca_file: missing.pem\n", "azure.outbound_ca_file"),
    ("azure:\n  extra_ca_files: [missing.pem]\n", "azure.extra_ca_files"),
    ("upstream:\n  ca_file: missing.pem\n", "upstream TLS files"),
]


@pytest.mark.parametrize(
    ("extra", "what"),
    CHECKED_FILES,
    ids=[
        "check-config finds a missing outbound CA file",
        "check-config finds a missing extra CA file",
        "check-config finds a missing auth-service CA file",
    ],
)
def test_check_config_reads_what_the_composition_root_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, what: str
) -> None:
    from gateway.cli import main

    (tmp_path / "tokens.yaml").write_text(azure_token_yaml())
    write_new_keys_file(tmp_path / "keys")
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).write_text("x")
    base = (
        "tls: {cert_file: tls.crt, key_file: tls.key}\n"
        "challenge: {keys_file: keys}\n"
        "tokens: {files: [tokens.yaml]}\n"
    )
    (tmp_path / "gateway.yaml").write_text(base)
    assert main(["check-config", "-c", str(tmp_path / "gateway.yaml")]) == 0
    (tmp_path / "gateway.yaml").write_text(base + extra)
    capsys.readouterr()
    assert main(["check-config", "-c", str(tmp_path / "gateway.yaml")]) == 1
    assert f"error: {what}:" in capsys.readouterr().err
