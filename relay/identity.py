"""Who is connecting: SSH public keys, static tokens and OIDC JWTs mapped to identities.

The relay calls :class:`Authenticator` from its SSH and PostgreSQL front ends; whatever
the method, the result is an :class:`Identity` whose name and groups drive target access,
rules and the audit trail. Refusals are :class:`AuthError` with a short reason fit for the
audit log; the secret itself never appears in a message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncssh
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from recorder.config import Config, ConfigError, IdentityConfig, OidcConfig
from recorder.errors import CastgateError

# Three base64url segments; the signature may be empty (as in an ``alg: none`` token),
# which must still take the JWT path so it is refused as a JWT, not as an unknown token.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# A password can be large; no real ID token comes near this, and refusing early keeps
# an unauthenticated peer from making us base64- and JSON-decode megabytes.
_MAX_TOKEN_LEN = 16384

# Algorithms that may ever verify a token, with the public key type each needs. HMAC and
# "none" are absent on purpose: with a JWKS of public keys, HS* lets anyone who knows
# the public key forge tokens, and "none" needs no key at all.
_ASYMMETRIC: dict[str, tuple[type[Any], ...]] = {
    "RS256": (rsa.RSAPublicKey,),
    "RS384": (rsa.RSAPublicKey,),
    "RS512": (rsa.RSAPublicKey,),
    "PS256": (rsa.RSAPublicKey,),
    "PS384": (rsa.RSAPublicKey,),
    "PS512": (rsa.RSAPublicKey,),
    "ES256": (ec.EllipticCurvePublicKey,),
    "ES256K": (ec.EllipticCurvePublicKey,),
    "ES384": (ec.EllipticCurvePublicKey,),
    "ES512": (ec.EllipticCurvePublicKey,),
    "ES521": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
_EC_CURVES: dict[str, str] = {
    "ES256": "secp256r1",
    "ES256K": "secp256k1",
    "ES384": "secp384r1",
    "ES512": "secp521r1",
    "ES521": "secp521r1",
}

# How long a JWKS fetched over HTTPS is trusted before it is fetched again.
_JWKS_LIFESPAN = 300.0


@dataclass(frozen=True)
class Identity:
    """An authenticated principal: what policy and the audit trail know about a peer."""

    name: str
    """Identity name (static) or the JWT ``preferred_username`` / ``sub``."""
    groups: tuple[str, ...]
    """Groups that grant targets, roles and rule scopes."""
    method: str
    """How it authenticated: ``publickey``, ``token`` or ``oidc``."""
    subject: str | None = None
    """JWT ``sub``, kept for the audit record."""
    expires_at: float | None = None
    """JWT ``exp`` in epoch seconds; sessions may be cut when it passes."""


class AuthError(CastgateError):
    """Authentication refused; the message is a short audit reason, never the secret."""


def _reason(exc: jwt.PyJWTError) -> str:
    """The audit reason for a PyJWT failure (subclasses are tested before their bases)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.PyJWKClientError | jwt.InvalidKeyError | jwt.PyJWKError):
        return "unknown signing key"
    return "malformed token"


def _groups_from_claim(value: object) -> tuple[str, ...]:
    """Groups from the claim: a list of strings, or one string; anything else grants none."""
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(g, str) for g in value):
        # A list with any non-string is not what the IdP documents; grant nothing rather
        # than guess which entries were meant.
        return tuple(dict.fromkeys(g for g in value if g))
    return ()


def _key_fits(alg: str, key: object) -> bool:
    """Whether ``key`` is the public key type (and curve) that ``alg`` verifies with."""
    if not isinstance(key, _ASYMMETRIC[alg]):
        return False
    curve = _EC_CURVES.get(alg)
    return curve is None or (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve)


class _JwksFile:
    """A JWKS read from a local file; reloaded only on request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys = self._load()

    def _load(self) -> jwt.PyJWKSet:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: oidc.jwks: no such JWKS file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: oidc.jwks: cannot read JWKS: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path}: oidc.jwks: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: oidc.jwks: not a JWKS (expected an object)")
        try:
            return jwt.PyJWKSet.from_dict(data)
        except jwt.PyJWTError as exc:
            raise ConfigError(f"{self.path}: oidc.jwks: {exc}") from None

    def reload(self) -> None:
        # Load first, swap after: a broken file must not drop the keys in use.
        self.keys = self._load()

    def candidates(self, kid: str | None) -> list[jwt.PyJWK]:
        return _select(self.keys, kid)


class _JwksUrl:
    """A JWKS fetched over HTTPS by PyJWKClient, lazily and cached for a while."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = self._client()

    def _client(self) -> jwt.PyJWKClient:
        # Constructing the client does no I/O; the first token triggers the fetch.
        return jwt.PyJWKClient(self.url, cache_jwk_set=True, lifespan=_JWKS_LIFESPAN, timeout=10)

    def reload(self) -> None:
        # A fresh client drops the cache without blocking here on the network.
        self.client = self._client()

    def candidates(self, kid: str | None) -> list[jwt.PyJWK]:
        try:
            if kid is not None:
                # get_signing_key refetches once (rate-limited) on an unknown kid, which
                # is how key rotation at the IdP reaches us before the cache expires.
                self.client.get_signing_key(kid)
            return _select(self.client.get_jwk_set(), kid)
        except (jwt.PyJWKClientConnectionError, jwt.PyJWKSetError, ValueError, OSError):
            # PyJWKClient lets a non-JSON body through as a bare ValueError; whatever the
            # IdP served, it is our keys that are missing, not the token that is bad.
            raise AuthError("signing keys unavailable") from None


def _select(keys: jwt.PyJWKSet, kid: str | None) -> list[jwt.PyJWK]:
    """Signing keys for ``kid``; without a kid, only a set of exactly one key is usable."""
    signing = [k for k in keys if k.public_key_use in ("sig", None)]
    if kid is None:
        return signing if len(signing) == 1 else []
    return [k for k in signing if k.key_id == kid]


class Authenticator:
    """Maps SSH public keys and token passwords to identities, from one :class:`Config`."""

    def __init__(self, cfg: Config) -> None:
        """Index the configured keys and token hashes and load a file JWKS.

        Raises :class:`ConfigError` for an unreadable key, a key or token hash shared by
        two identities, an unknown OIDC algorithm, or a missing or malformed JWKS file.
        """
        self._by_key: dict[bytes, IdentityConfig] = {}
        self._tokens: list[tuple[bytes, IdentityConfig]] = []
        seen_tokens: dict[bytes, str] = {}
        for ident in cfg.identities:
            for i, line in enumerate(ident.ssh_keys):
                try:
                    blob = asyncssh.import_public_key(line).public_data
                except (asyncssh.KeyImportError, ValueError) as exc:
                    raise ConfigError(
                        f"identities ({ident.name}).ssh_keys[{i}]: not an OpenSSH public key: {exc}"
                    ) from None
                other = self._by_key.get(blob)
                if other is not None and other.name != ident.name:
                    # One key for two identities would make the audit trail guess who it was.
                    raise ConfigError(
                        f"identities ({ident.name}).ssh_keys[{i}]: key also listed for {other.name!r}"
                    )
                self._by_key[blob] = ident
            if ident.token_sha256 is not None:
                digest = bytes.fromhex(ident.token_sha256)
                if digest in seen_tokens:
                    raise ConfigError(
                        f"identities ({ident.name}).token_sha256: same token as {seen_tokens[digest]!r}"
                    )
                seen_tokens[digest] = ident.name
                self._tokens.append((digest, ident))

        self._oidc: OidcConfig | None = cfg.oidc
        self._algorithms: frozenset[str] = frozenset()
        self._jwks: _JwksFile | _JwksUrl | None = None
        if cfg.oidc is not None:
            self._algorithms = _allowed_algorithms(cfg.oidc.algorithms)
            self._jwks = _jwks_source(cfg, cfg.oidc.jwks)

    def by_public_key(self, key: asyncssh.SSHKey) -> Identity | None:
        """The identity that lists ``key`` (compared on public data, not comment), or None."""
        ident = self._by_key.get(key.public_data)
        if ident is None:
            return None
        return Identity(name=ident.name, groups=tuple(ident.groups), method="publickey")

    def by_token(self, secret: str) -> Identity:
        """The identity a password-style token stands for; raises :class:`AuthError`.

        A JWT-shaped secret is verified as an OIDC token when ``[oidc]`` is configured;
        anything else is matched against the static token hashes. With a JWKS URL this
        may block on a fetch, so async callers should run it in a thread.
        """
        if self._oidc is not None and _JWT_SHAPE.fullmatch(secret):
            return self._by_jwt(secret, self._oidc)
        return self._by_static_token(secret)

    def reload_jwks(self) -> None:
        """Re-read the JWKS file (or drop the fetched set); a bad file keeps the old keys."""
        if self._jwks is not None:
            self._jwks.reload()

    def _by_static_token(self, secret: str) -> Identity:
        digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
        match: IdentityConfig | None = None
        # Every hash is compared, in constant time, whatever matched earlier: the time
        # taken says nothing about which identity (if any) the token belongs to.
        for expected, ident in self._tokens:
            equal = hmac.compare_digest(digest, expected)
            match = ident if equal else match
        if match is None or not secret:
            raise AuthError("unknown token")
        return Identity(name=match.name, groups=tuple(match.groups), method="token")

    def _by_jwt(self, token: str, oidc: OidcConfig) -> Identity:
        assert self._jwks is not None
        if len(token) > _MAX_TOKEN_LEN:
            raise AuthError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            kid = header.get("kid")
            # Checked before any key is touched, so "none" and HS* never reach PyJWT's
            # verifier; PyJWT checks the same list again in decode().
            if not isinstance(alg, str) or alg not in self._algorithms:
                raise AuthError("algorithm not allowed")
            candidates = self._jwks.candidates(kid if isinstance(kid, str) else None)
            if not candidates:
                raise AuthError("unknown signing key")
            key = next((k for k in candidates if k.algorithm_name == alg), candidates[0])
            if not _key_fits(alg, key.key):
                raise AuthError("algorithm not allowed")
            # The PyJWK binds its own algorithm; PyJWT refuses a token whose header names
            # another, so an RSA key is never used for an EC or HMAC verification.
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=oidc.audience,
                issuer=oidc.issuer,
                leeway=oidc.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from None

        sub = claims.get("sub")
        subject = sub if isinstance(sub, str) and sub else None
        preferred = claims.get("preferred_username")
        name = preferred if isinstance(preferred, str) and preferred else subject
        if name is None:
            raise AuthError("malformed token")
        exp = claims["exp"]
        return Identity(
            name=name,
            # Only the claim's groups: a static identity of the same name lends nothing.
            groups=_groups_from_claim(claims.get(oidc.groups_claim)),
            method="oidc",
            subject=subject,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )


def _allowed_algorithms(configured: list[str]) -> frozenset[str]:
    """Configured algorithms minus "none" and HMAC; unknown names are config errors."""
    allowed: set[str] = set()
    for alg in configured:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            continue  # never accepted, whatever the file says (DESIGN.md, OidcConfig)
        if alg not in _ASYMMETRIC:
            raise ConfigError(
                f"oidc.algorithms: unknown algorithm {alg!r} (use e.g. RS256, ES256, EdDSA)"
            )
        allowed.add(alg)
    if not allowed:
        raise ConfigError("oidc.algorithms: no usable algorithm (none and HS* are never accepted)")
    return frozenset(allowed)


def _jwks_source(cfg: Config, spec: str) -> _JwksFile | _JwksUrl:
    """The JWKS named by ``oidc.jwks``: ``file:PATH`` or an https URL."""
    if spec.startswith("file:"):
        return _JwksFile(cfg.resolve(spec[len("file:") :]))
    if urlparse(spec).scheme == "https":
        return _JwksUrl(spec)
    # Plain http would let anyone on the path substitute the signing keys.
    raise ConfigError(f"oidc.jwks: {spec!r}: use 'file:PATH' or an https URL")
