"""JWT validation with an algorithm allow-list, and development token minting.

HS256 tokens are checked against `JWT_SECRET`; RS256/ES256 tokens against the JWKS published by
`AUTH_SERVICE_URL` at `/.well-known/jwks.json`. The JWKS is fetched with httpx rather than
PyJWT's `PyJWKClient`, which is synchronous and would block the event loop; it is cached and
re-fetched when a token names a key id it does not know (at most every `_REFRESH_MIN_S`).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

from parley.errors import Unauthorized
from parley.observability import get_logger

log = get_logger(__name__)

ASYMMETRIC_ALGORITHMS = ("RS256", "ES256")
_LEEWAY_S = 5
_JWKS_TTL_S = 300.0
_REFRESH_MIN_S = 30.0
MAX_USER_ID_CHARS = 255
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class Identity:
    user_id: str
    claims: dict[str, Any]

    @property
    def expires_at(self) -> float:
        """The token's `exp` (seconds since the epoch); validation made it present and numeric."""
        return float(self.claims["exp"])


class JwksCache:
    def __init__(self, auth_service_url: str, client: httpx.AsyncClient) -> None:
        self._url = auth_service_url.rstrip("/") + "/.well-known/jwks.json"
        self._client = client
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        stale = time.monotonic() - self._fetched_at > _JWKS_TTL_S
        if stale or (kid not in self._keys and self._may_refresh()):
            await self.refresh()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid is None or kid not in self._keys:
            raise Unauthorized("token signed with an unknown key")
        return self._keys[kid]

    def _may_refresh(self) -> bool:
        return time.monotonic() - self._fetched_at > _REFRESH_MIN_S

    async def refresh(self) -> None:
        async with self._lock:
            response = await self._client.get(self._url, timeout=5.0)
            response.raise_for_status()
            try:
                published = response.json()["keys"]
                if not isinstance(published, list):
                    raise TypeError("keys is not a list")
            except (ValueError, KeyError, TypeError) as exc:
                # Not a JWKS document: like an unreachable key service, never a crashed handshake.
                raise httpx.DecodingError(f"the key service's JWKS is malformed: {exc}") from None
            keys: dict[str, jwt.PyJWK] = {}
            for data in published:
                if not isinstance(data, dict):
                    continue
                try:
                    key = jwt.PyJWK.from_dict(data)
                except jwt.PyJWTError:
                    continue  # a key type this server does not use
                if key.algorithm_name in ASYMMETRIC_ALGORITHMS:
                    keys[str(data.get("kid", ""))] = key
            self._keys = keys
            self._fetched_at = time.monotonic()


class Authenticator:
    """Turns a bearer token into an `Identity`, or raises `Unauthorized`."""

    def __init__(
        self,
        *,
        secret: str | None,
        jwks: JwksCache | None,
        issuer: str | None,
        audience: str | None,
    ) -> None:
        if secret is None and jwks is None:
            raise ValueError("an Authenticator needs a secret or a JWKS source")
        self._secret = secret
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        allowed = []
        if secret is not None:
            allowed.append("HS256")
        if jwks is not None:
            allowed.extend(ASYMMETRIC_ALGORITHMS)
        self.allowed_algorithms = tuple(allowed)

    async def authenticate(self, token: str) -> Identity:
        if self._jwks is None:
            # One algorithm, one key: verify at once. The header is read on its own only to
            # say why a token was refused (read first, it was a quarter of the check's cost).
            try:
                claims = self._decode(token, self._secret, "HS256")
            except jwt.PyJWTError:
                pass  # the full check below gives the reason
            else:
                return self._identity(claims)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        algorithm = header.get("alg")
        if algorithm not in self.allowed_algorithms:
            raise Unauthorized(f"token algorithm {algorithm!r} is not allowed")
        key: Any
        if algorithm == "HS256":
            key = self._secret
        else:
            assert self._jwks is not None
            try:
                key = await self._jwks.key(header.get("kid"))
            except httpx.HTTPError:
                log.warning("auth.jwks_unreachable")
                raise Unauthorized("cannot verify token: key service unreachable") from None
        try:
            claims = self._decode(token, key, algorithm)
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        return self._identity(claims)

    def _decode(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=[algorithm],
            issuer=self._issuer,
            audience=self._audience,
            leeway=_LEEWAY_S,
            options={
                "require": ["exp", "sub"],
                "verify_aud": self._audience is not None,
                "verify_iss": self._issuer is not None,
            },
        )
        return claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_USER_ID_CHARS:
            raise Unauthorized(
                f"token 'sub' must be a non-empty string of at most {MAX_USER_ID_CHARS} characters"
            )
        if _UNSTORABLE.search(subject) is not None:
            # The user id is stored and sent in every frame: PostgreSQL cannot store NUL, and
            # a lone surrogate cannot be encoded as UTF-8 at all.
            raise Unauthorized("token 'sub' must not contain NUL or a lone surrogate")
        return Identity(user_id=subject, claims=claims)


def mint_token(
    *,
    secret: str,
    user_id: str,
    ttl_s: int,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def development_secret(data_dir: Path) -> str:
    """The generated development secret under `data_dir`, created on first use (mode 0600)."""
    path = data_dir / "jwt_secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret
