"""Tokens the fanout edge accepts (crates/fanout-edge/src/auth.rs, docs/security.md).

- A **connection token** opens a WebSocket / event stream: ``sub`` (the user), ``exp``,
  and optionally ``channels`` (exact names or ``prefix*`` patterns such as
  ``job_progress:*``), ``aud`` / ``iss`` (required by the edge when it is started with
  ``--jwt-audience`` / ``--jwt-issuer``).
- A **subscription token** grants one channel to one user's connection: ``sub``,
  ``channel``, ``exp``; it cannot open a connection.

Keys: an HS256 secret (the edge's ``--jwt-secret``, at least 16 bytes), or a PEM private
key for RS256 / ES256 (P-256) / EdDSA (Ed25519), verified by the edge's
``--jwt-public-key`` or a ``--jwt-jwks`` entry chosen by ``kid``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import jwt

from ._errors import FanoutError

__all__ = [
    "ALGORITHMS",
    "MIN_SECRET_BYTES",
    "Algorithm",
    "TokenError",
    "connection_token",
    "subscription_token",
]

Algorithm = Literal["HS256", "RS256", "ES256", "EdDSA"]
ALGORITHMS: Final[tuple[str, ...]] = ("HS256", "RS256", "ES256", "EdDSA")
#: The shortest HS256 secret the edge accepts (auth.rs: "must be at least 16 bytes").
MIN_SECRET_BYTES: Final = 16
_RESERVED: Final = frozenset({"sub", "exp", "iat", "channels", "channel", "aud", "iss"})


class TokenError(FanoutError, ValueError):
    """A token that cannot be made as asked (bad secret, key, algorithm or claim)."""


def _key(secret_or_key: str | bytes, algorithm: str) -> str | bytes:
    if algorithm not in ALGORITHMS:
        raise TokenError(
            f"algorithm {algorithm!r} is not one the edge verifies: {', '.join(ALGORITHMS)}"
        )
    if not isinstance(secret_or_key, str | bytes):
        raise TokenError(
            f"secret_or_key must be a str or bytes, not {type(secret_or_key).__name__}"
        )
    raw = secret_or_key.encode() if isinstance(secret_or_key, str) else secret_or_key
    if algorithm == "HS256":
        if len(raw) < MIN_SECRET_BYTES:
            raise TokenError(
                f"the HS256 secret is {len(raw)} bytes; the fanout edge requires at least "
                f"{MIN_SECRET_BYTES} (--jwt-secret / FANOUT_JWT_SECRET)"
            )
        if b"-----BEGIN" in raw:
            raise TokenError("an HS256 secret must not be a PEM key: pass algorithm= too")
    elif b"-----BEGIN" not in raw or b"PRIVATE KEY" not in raw:
        raise TokenError(f"{algorithm} needs a PEM private key (-----BEGIN ... PRIVATE KEY-----)")
    return secret_or_key


def _encode(
    secret_or_key: str | bytes,
    claims: dict[str, Any],
    # The public functions' common parameters, in their order, so that they pass them
    # through positionally.
    ttl: float,
    algorithm: str,
    audience: str | None,
    issuer: str | None,
    kid: str | None,
    extra: Mapping[str, Any] | None,
) -> str:
    key = _key(secret_or_key, algorithm)
    if ttl <= 0:
        raise TokenError(f"ttl must be positive seconds, not {ttl!r}")
    now = int(time.time())
    payload: dict[str, Any] = {}
    if extra:
        clash = sorted(_RESERVED & set(extra))
        if clash:
            raise TokenError(f"extra claims may not set {', '.join(clash)}: use the arguments")
        payload.update(extra)
    payload.update(claims)
    payload["iat"] = now
    payload["exp"] = now + int(ttl)
    if audience is not None:
        payload["aud"] = audience
    if issuer is not None:
        payload["iss"] = issuer
    headers = {"kid": kid} if kid is not None else None
    try:
        return jwt.encode(payload, key, algorithm=algorithm, headers=headers)
    except (ValueError, TypeError, jwt.PyJWTError) as e:
        raise TokenError(f"cannot sign a {algorithm} token with this key: {e}") from e


def _user(user: object) -> str:
    if user is None or str(user) == "":
        raise TokenError("user (the token's `sub`) is required")
    return str(user)


def connection_token(
    secret_or_key: str | bytes,
    user: str | int,
    channels: Iterable[str] | None = None,
    ttl: float = 3600,
    algorithm: Algorithm = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
    kid: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A token that opens a connection as ``user`` for ``ttl`` seconds, granting the
    ``channels`` (exact names or ``prefix*`` patterns; ``user:<user>`` needs none)."""
    claims: dict[str, Any] = {"sub": _user(user)}
    if channels is not None:
        if isinstance(channels, str):
            raise TokenError("channels must be a list of channel names, not one str")
        names = list(channels)
        if names:
            claims["channels"] = names
    return _encode(secret_or_key, claims, ttl, algorithm, audience, issuer, kid, extra)


def subscription_token(
    secret_or_key: str | bytes,
    user: str | int,
    channel: str,
    ttl: float = 600,
    algorithm: Algorithm = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
    kid: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A token granting ``channel`` to a connection of ``user`` (sent as the ``token`` of
    its ``subscribe`` frame); it cannot open a connection."""
    if not isinstance(channel, str) or not channel:
        raise TokenError("channel is required for a subscription token")
    claims = {"sub": _user(user), "channel": channel}
    return _encode(secret_or_key, claims, ttl, algorithm, audience, issuer, kid, extra)
