"""The development token issuer: an RS256 key pair made on first run, its JWKS for
Envoy, and token minting for the CLI and tests.

Production uses a real identity provider's JWKS instead; nothing else changes, because
Envoy only ever sees a JWKS and the claims below.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ALGORITHM = "RS256"
PRIVATE_KEY_FILE = "dev-signing-key.pem"
# After `rotate`, the previous key stays in the JWKS so tokens it signed verify until they expire.
PREVIOUS_KEY_FILE = "dev-signing-key.previous.pem"
JWKS_FILE = "jwks.json"


@dataclass(frozen=True)
class DevIssuer:
    private_key: rsa.RSAPrivateKey
    kid: str
    issuer: str
    audience: str
    # Where the key files live, so the JWKS can include the previous key.
    keys_dir_hint: Path | None = None

    @classmethod
    def load_or_create(cls, keys_dir: Path, issuer: str, audience: str, *, create: bool = True,
                       write_jwks: bool = True) -> DevIssuer:
        """Loads the dev key from `keys_dir`, creating it (and the JWKS) the first time
        unless `create` is false (then a missing key is FileNotFoundError)."""
        key_path = keys_dir / PRIVATE_KEY_FILE
        if not create and not key_path.exists():
            raise FileNotFoundError(key_path)
        keys_dir.mkdir(parents=True, exist_ok=True)
        if key_path.exists():
            key = _load_key(key_path)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_key(key_path, key)
        dev = cls(private_key=key, kid=_kid(key), issuer=issuer, audience=audience, keys_dir_hint=keys_dir)
        if write_jwks:
            dev.write_jwks(keys_dir / JWKS_FILE)
        return dev

    @classmethod
    def rotate(cls, keys_dir: Path, issuer: str, audience: str) -> DevIssuer:
        """A new signing key; the current one is kept in the JWKS (as the previous key) so
        tokens it signed stay valid until they expire. Envoy picks the new JWKS up when it
        next refreshes it, without a restart."""
        key_path = keys_dir / PRIVATE_KEY_FILE
        if key_path.exists():
            key_path.replace(keys_dir / PREVIOUS_KEY_FILE)
        return cls.load_or_create(keys_dir, issuer, audience)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        keys = [_jwk(self.private_key, self.kid)]
        previous = self.keys_dir_hint / PREVIOUS_KEY_FILE if self.keys_dir_hint else None
        if previous is not None and previous.exists():
            old = _load_key(previous)
            if _kid(old) != self.kid:
                keys.append(_jwk(old, _kid(old)))
        return {"keys": keys}

    def write_jwks(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.jwks(), indent=2))
        tmp.replace(path)

    def mint(self, tenant_id: str | None, subject: str, roles: Iterable[str], ttl_s: int = 3600,
             *, audience: str | None = None, issuer: str | None = None, not_before_s: int = 0,
             extra: dict[str, object] | None = None) -> str:
        """A signed token. Keyword overrides exist so tests can mint wrong tokens too."""
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": issuer or self.issuer,
            "aud": audience or self.audience,
            "sub": subject,
            "roles": sorted(set(roles)),
            "iat": now,
            "nbf": now + not_before_s,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
        }
        if tenant_id is not None:
            claims["tenant_id"] = tenant_id
        claims.update(extra or {})
        return jwt.encode(claims, self.private_key, algorithm=ALGORITHM, headers={"kid": self.kid})


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return loaded


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Written then renamed so a crash never leaves a half key that later runs trust.
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    tmp.replace(path)


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    jwk: dict[str, str] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "alg": ALGORITHM, "use": "sig"})
    return jwk


def _kid(key: rsa.RSAPrivateKey) -> str:
    numbers = key.public_key().public_numbers()
    # Stable per key, short enough to read in logs.
    return f"dev-{numbers.n % (1 << 64):016x}"
