"""One Entra-shaped access-token minter for unit tests (real RS256, in process).

``TokenMinter`` holds an RSA key published under ``kid``; ``mint`` signs a v1 managed-
identity token for the shared IDs (``tests.support.ids``) with any claim changed, and
``jwks`` is the key set a verifier trusts (``StaticKeys``, or a JWKS file for inspect).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.ids import TENANT, vm_rid

__all__ = ["ARM_AUDIENCE", "TokenMinter"]

ARM_AUDIENCE = "https://management.azure.com/"


class TokenMinter:
    def __init__(self, *, tid: str = TENANT, kid: str = "k1") -> None:
        self.tid = tid
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @property
    def public_keys(self) -> dict[str, rsa.RSAPublicKey]:
        return {self.kid: self.key.public_key()}

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        return {"keys": [jwk]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def claims(self, *, now: float, **over: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "aud": ARM_AUDIENCE,
            "iss": f"https://sts.windows.net/{self.tid}/",
            "iat": int(now) - 60,
            "nbf": int(now) - 60,
            "exp": int(now) + 3600,
            "tid": self.tid,
            "oid": "11111111-2222-3333-4444-555555555555",
            "sub": "11111111-2222-3333-4444-555555555555",
            "xms_mirid": vm_rid(),
        }
        claims.update(over)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        *,
        now: float,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = None,
        **over: Any,
    ) -> str:
        """A signed token; a claim passed as ``None`` is left out."""
        return jwt.encode(
            self.claims(now=now, **over),
            key or self.key,
            algorithm="RS256",
            headers={"kid": kid or self.kid},
        )
