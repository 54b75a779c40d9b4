"""The suite's secret guard must be able to fail: it recognises what it looks for."""

from __future__ import annotations

from tests.conftest import find_secrets


def test_the_guard_finds_a_jwt_and_a_private_key() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJ0aWQiOiIxMjM0NTY3OCJ9.c2lnbmF0dXJlc2lnbmF0dXJlc2ln"
    assert find_secrets(f"token={jwt}")
    assert find_secrets("-----BEGIN EC PRIVATE KEY-----\nMHcC")
    assert find_secrets("-----BEGIN PRIVATE KEY-----")
    assert not find_secrets("-----BEGIN CERTIFICATE----- and a challenge AAAAAAAA")
