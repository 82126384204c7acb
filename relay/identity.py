"""Who is connecting: SSH public keys, static tokens and OIDC JWTs mapped to identities.

The relay calls :class:`Authenticator` from its SSH and PostgreSQL front ends; whatever
the method, the result is an :class:`Identity` whose name and groups drive target access,
rules and the audit trail. Refusals are :class:`AuthError` with a short reason fit for the
audit log; the secret itself never appears in a message.

JWTs come from one or more OIDC providers (``[[oidc.providers]]``), chosen by the token's
issuer and audience. A provider that identities are bound to (``identities.oidc``, a CI
issuer) maps a token to exactly one of them by its claims, and the identity's groups
apply; any other provider (a people IdP) names the identity by ``preferred_username`` or
``sub`` with the groups of its groups claim. The claims that identify a pipeline run and
who started it are kept on the :class:`Identity` for the session and its audit trail.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncssh
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from recorder.config import Config, ConfigError, IdentityConfig, OidcProviderConfig
from recorder.errors import CastgateError

# Three base64url segments; the signature may be empty (as in an ``alg: none`` token),
# which must still take the JWT path so it is refused as a JWT, not as an unknown token.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# Short castgate tokens handed out for a verified OIDC token (POST /api/v1/token/exchange).
EXCHANGED_PREFIX = "cgx_"

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
# No IdP's key set comes near this; a larger body is refused unread.
_JWKS_MAX_BYTES = 1 << 20

# Claims that identify a pipeline run and who started it, kept with the session:
# GitHub Actions (actor .. environment) and GitLab CI (user_login .. job_id).
RUN_CLAIMS: tuple[str, ...] = (
    "actor",
    "triggering_actor",
    "repository",
    "workflow",
    "job_workflow_ref",
    "run_id",
    "run_attempt",
    "sha",
    "ref",
    "environment",
    "user_login",
    "project_path",
    "pipeline_id",
    "job_id",
)
# A claim value longer than this is not an id, a ref or a name; it is cut in the record.
_ATTR_MAX = 256


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
    provider: str | None = None
    """Name of the OIDC provider that verified the token."""
    attributes: tuple[tuple[str, str], ...] = ()
    """Run and initiator claims of a CI token (:data:`RUN_CLAIMS`), masked, in order."""
    leeway: float = 0.0
    """The provider's clock-skew allowance, which also extends ``expires_at``."""

    @property
    def attrs(self) -> dict[str, str]:
        """``attributes`` as a dict."""
        return dict(self.attributes)

    @property
    def run_id(self) -> str | None:
        """The pipeline run the token was issued to: ``PROVIDER:RUN[:ATTEMPT]`` (GitHub
        ``run_id`` and ``run_attempt``, GitLab ``pipeline_id``), or None."""
        a = self.attrs
        if self.provider is None:
            return None
        if "run_id" in a:
            return f"{self.provider}:{a['run_id']}:{a.get('run_attempt', '1')}"
        if "pipeline_id" in a:
            return f"{self.provider}:{a['pipeline_id']}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Everything about the identity, as JSON (kept for an exchanged token)."""
        return {
            "name": self.name,
            "groups": list(self.groups),
            "method": self.method,
            "subject": self.subject,
            "expires_at": self.expires_at,
            "provider": self.provider,
            "attributes": [list(a) for a in self.attributes],
            "leeway": self.leeway,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Identity:
        """The identity :meth:`to_dict` wrote."""
        return cls(
            name=str(d["name"]),
            groups=tuple(str(g) for g in d.get("groups") or ()),
            method=str(d.get("method") or "oidc"),
            subject=d.get("subject"),
            expires_at=d.get("expires_at"),
            provider=d.get("provider"),
            attributes=tuple((str(k), str(v)) for k, v in d.get("attributes") or ()),
            leeway=float(d.get("leeway") or 0.0),
        )

    def detail(self) -> dict[str, Any]:
        """What audit events, the session row and the cast header keep of an OIDC
        identity (empty for keys and static tokens)."""
        if self.provider is None:
            return {}
        out: dict[str, Any] = {"provider": self.provider, "subject": self.subject}
        if self.run_id is not None:
            out["run_id"] = self.run_id
        if self.attributes:
            out["attributes"] = self.attrs
        return out


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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> None:
        fp.close()
        raise urllib.error.URLError("JWKS URL redirected; give the final https URL")


class _JwksUrl:
    """A JWKS fetched over HTTPS, cached for :data:`_JWKS_LIFESPAN` and fetched again on
    an unknown ``kid`` (key rotation at the IdP) at most once per ``min_refresh``."""

    def __init__(
        self,
        url: str,
        *,
        ca_file: Path | None = None,
        min_refresh: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.min_refresh = min_refresh
        self.fetches = 0
        self._clock = clock
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        # No redirects: one could lead to plain http, where the keys can be substituted.
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), _NoRedirect()
        )
        self._keys: jwt.PyJWKSet | None = None
        self._fetched_at = 0.0
        self._refetched_at: float | None = None
        # by_token runs in worker threads: one fetch at a time, the others wait for it.
        self._lock = threading.Lock()

    def _fetch(self) -> jwt.PyJWKSet:
        self.fetches += 1
        try:
            # The scheme is https (checked in _jwks_source), and redirects are refused.
            req = urllib.request.Request(self.url, headers={"Accept": "application/json"})  # noqa: S310
            with self._opener.open(req, timeout=10) as resp:
                body = resp.read(_JWKS_MAX_BYTES + 1)
            if len(body) > _JWKS_MAX_BYTES:
                raise ValueError("JWKS too large")
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not a JWKS")
            return jwt.PyJWKSet.from_dict(data)
        except (OSError, ValueError, urllib.error.URLError, jwt.PyJWTError):
            # Whatever the IdP served (or did not), it is our keys that are missing, not
            # the token that is bad.
            raise AuthError("signing keys unavailable") from None

    def reload(self) -> None:
        with self._lock:
            self._keys = None  # fetched again by the next token

    def candidates(self, kid: str | None) -> list[jwt.PyJWK]:
        with self._lock:
            now = self._clock()
            if self._keys is None or now - self._fetched_at >= _JWKS_LIFESPAN:
                self._keys, self._fetched_at = self._fetch(), now
            found = _select(self._keys, kid)
            due = self._refetched_at is None or now - self._refetched_at >= self.min_refresh
            if not found and kid is not None and due and self._fetched_at != now:
                # An unknown kid: the IdP may have rotated its keys since the last fetch.
                self._refetched_at = now
                self._keys, self._fetched_at = self._fetch(), now
                found = _select(self._keys, kid)
            return found


def _select(keys: jwt.PyJWKSet, kid: str | None) -> list[jwt.PyJWK]:
    """Signing keys for ``kid``; without a kid, only a set of exactly one key is usable."""
    signing = [k for k in keys if k.public_key_use in ("sig", None)]
    if kid is None:
        return signing if len(signing) == 1 else []
    return [k for k in signing if k.key_id == kid]


class Authenticator:
    """Maps SSH public keys and token passwords to identities, from one :class:`Config`."""

    def __init__(self, cfg: Config, mask: Callable[[str], str] | None = None) -> None:
        """Index the configured keys and token hashes and load the file JWKSs; ``mask``
        masks token text kept in identities and refusal reasons (claims are the
        token holder's to choose: a branch may be named after a card number).

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

        self._mask = mask
        self._providers: list[_Provider] = []
        bound: dict[str, list[IdentityConfig]] = {}
        self._bound_names: dict[str, str] = {}
        for ident in cfg.identities:
            if ident.oidc is not None:
                bound.setdefault(ident.oidc.provider, []).append(ident)
                self._bound_names[ident.name] = ident.oidc.provider
        if cfg.oidc is not None:
            for pc in cfg.oidc.all_providers():
                self._providers.append(_Provider(cfg, pc, tuple(bound.get(pc.name, ()))))

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
        if self._providers and _JWT_SHAPE.fullmatch(secret):
            return self._by_jwt(secret)
        if secret.startswith(EXCHANGED_PREFIX) and self.exchanged is not None:
            return self._by_exchanged(secret)
        return self._by_static_token(secret)

    exchanged: Callable[[str], Identity | None] | None = None
    """Looks up an exchanged token by its SHA-256 (hex): the identity it stands for while
    unexpired, else None. Set by the relay (the tokens live in the shared store)."""

    def _by_exchanged(self, secret: str) -> Identity:
        assert self.exchanged is not None
        if len(secret) > 128:
            raise AuthError("unknown token")
        ident = self.exchanged(hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest())
        if ident is None:
            raise AuthError("unknown or expired exchanged token")
        deadline = (ident.expires_at or 0.0) + ident.leeway
        if time.time() >= deadline:
            raise AuthError("token expired")
        return ident

    def reload_jwks(self) -> None:
        """Re-read the JWKS files (or drop the fetched sets); a bad file keeps the old keys."""
        for prov in self._providers:
            prov.jwks.reload()

    def provider(self, name: str) -> _Provider | None:
        """The provider named ``name`` (tests and diagnostics)."""
        return next((p for p in self._providers if p.cfg.name == name), None)

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

    def _choose(self, token: str) -> _Provider:
        """The provider for the token's (unverified) issuer and audience; the signature,
        issuer and audience are then verified with that provider's keys and settings."""
        if len(self._providers) == 1:
            # Nothing to choose: verification gives the precise reason for any flaw.
            return self._providers[0]
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise AuthError("malformed token")
        by_issuer = [p for p in self._providers if p.cfg.issuer == iss]
        if not by_issuer:
            raise AuthError("wrong issuer")
        aud = unverified.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        chosen = [p for p in by_issuer if p.cfg.audience in auds]
        # One issuer, one provider: let PyJWT give the precise audience reason.
        return chosen[0] if chosen else by_issuer[0]

    def _by_jwt(self, token: str) -> Identity:
        if len(token) > _MAX_TOKEN_LEN:
            raise AuthError("malformed token")
        prov = self._choose(token)
        oidc = prov.cfg
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            kid = header.get("kid")
            # Checked before any key is touched, so "none" and HS* never reach PyJWT's
            # verifier; PyJWT checks the same list again in decode().
            if not isinstance(alg, str) or alg not in prov.algorithms:
                raise AuthError("algorithm not allowed")
            candidates = prov.jwks.candidates(kid if isinstance(kid, str) else None)
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
        exp = claims["exp"]
        expires_at = float(exp) if isinstance(exp, int | float) else None
        attributes = tuple(
            (name, self._masked(text)[:_ATTR_MAX])
            for name in RUN_CLAIMS
            if (text := _claim_text(claims.get(name))) is not None
        )
        common: dict[str, Any] = {
            "method": "oidc",
            "subject": self._masked(subject) if subject else None,
            "expires_at": expires_at,
            "provider": oidc.name,
            "attributes": attributes,
            "leeway": oidc.leeway,
        }
        if prov.bound:
            ident = self._bound_identity(prov, claims)
            # The identity's groups, whatever the token claims: a CI issuer signs for
            # every repository that uses it, so its claims grant nothing by themselves.
            return Identity(name=ident.name, groups=tuple(ident.groups), **common)
        preferred = claims.get("preferred_username")
        name = preferred if isinstance(preferred, str) and preferred else subject
        if name is None:
            raise AuthError("malformed token")
        if name in self._bound_names:
            # A person's token must not pass for a pipeline: the PostgreSQL user, the
            # approvals ("never your own request") and the audit trail go by the name.
            raise AuthError(
                f"token of provider {oidc.name} names {self._masked(name)!r}, an identity "
                f"bound to provider {self._bound_names[name]}; refused"
            )
        return Identity(
            name=name,
            # Only the claim's groups: a static identity of the same name lends nothing.
            groups=_groups_from_claim(claims.get(oidc.groups_claim)),
            **common,
        )

    def _bound_identity(self, prov: _Provider, claims: Mapping[str, Any]) -> IdentityConfig:
        """The one identity bound to ``prov`` whose bound claims the token matches."""
        matches = [i for i in prov.bound if _binding_matches(i, claims)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(i.name for i in matches)
            raise AuthError(f"claims match more than one identity ({names}); refused")
        # The reason names the claims the bindings look at, so the operator sees which
        # repository or branch asked; their values are the token's, masked.
        wanted = dict.fromkeys(c for i in prov.bound for c in _bound(i))
        shown = ", ".join(
            f"{c}={self._masked(_claim_text(claims.get(c)) or '-')[:_ATTR_MAX]!r}" for c in wanted
        )
        raise AuthError(f"no identity bound to these claims (provider {prov.cfg.name}: {shown})")

    def _masked(self, text: str) -> str:
        return self._mask(text) if self._mask is not None else text


def _bound(ident: IdentityConfig) -> dict[str, str | list[str]]:
    assert ident.oidc is not None
    return ident.oidc.bound_claims


def _claim_text(value: object) -> str | None:
    """A claim as the text bindings match and records keep: strings as they are,
    integers in decimal (GitLab and GitHub send ids as strings, some issuers as numbers),
    booleans as ``true``/``false``; lists, objects and null are not matched."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def _binding_matches(ident: IdentityConfig, claims: Mapping[str, Any]) -> bool:
    """Every bound claim is present and matches one of its values (exact or glob)."""
    for claim, want in _bound(ident).items():
        text = _claim_text(claims.get(claim))
        if text is None:
            return False
        patterns = [want] if isinstance(want, str) else want
        if not any(fnmatch.fnmatchcase(text, pat) for pat in patterns):
            return False
    return True


class _Provider:
    """One OIDC issuer: its settings, allowed algorithms, key source and bound identities."""

    def __init__(
        self, cfg: Config, pc: OidcProviderConfig, bound: tuple[IdentityConfig, ...]
    ) -> None:
        self.cfg = pc
        self.bound = bound
        self.algorithms = _allowed_algorithms(pc.algorithms)
        self.jwks = _jwks_source(cfg, pc)


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


def _jwks_source(cfg: Config, pc: OidcProviderConfig) -> _JwksFile | _JwksUrl:
    """The JWKS named by ``jwks``: ``file:PATH`` or an https URL."""
    spec = pc.jwks
    if spec.startswith("file:"):
        return _JwksFile(cfg.resolve(spec[len("file:") :]))
    if urlparse(spec).scheme == "https":
        ca = cfg.resolve(pc.jwks_ca_file) if pc.jwks_ca_file else None
        if ca is not None and not ca.is_file():
            raise ConfigError(f"oidc ({pc.name}).jwks_ca_file: no such file {ca}")
        return _JwksUrl(spec, ca_file=ca, min_refresh=pc.jwks_refresh)
    # Plain http would let anyone on the path substitute the signing keys.
    raise ConfigError(f"oidc.jwks: {spec!r}: use 'file:PATH' or an https URL")
