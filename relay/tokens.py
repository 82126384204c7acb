"""Tokens the relay issues or honours beyond the authenticator's own: ephemeral API
tokens, exchanged short tokens for OIDC identities, and token lifetimes (the watch that
ends a session at its token's expiry); and the API/operator roles of an identity."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from recorder.config import Config
from recorder.store import Store, StoreError
from relay.identity import EXCHANGED_PREFIX, Authenticator, Identity


def token_deadline(ident: Identity) -> float | None:
    """Epoch seconds when a session opened with ``ident``'s token must end (its ``exp``
    plus the provider's leeway), or None for credentials that do not expire."""
    if ident.expires_at is None:
        return None
    return ident.expires_at + ident.leeway


def expiry_text(ident: Identity) -> str | None:
    """The token's deadline as ISO 8601, for the audit trail and the agent's message."""
    deadline = token_deadline(ident)
    return datetime.fromtimestamp(deadline, UTC).isoformat() if deadline else None


class Tokens:
    """Ephemeral and exchanged tokens, and the expiry watch of open sessions."""

    def __init__(self, store: Store, auth: Authenticator) -> None:
        self.store = store
        self.auth = auth
        self._ephemeral: dict[str, Identity] = {}
        self._watch: dict[str, asyncio.TimerHandle] = {}
        self._ran_out: set[str] = set()
        auth.exchanged = self._exchanged_identity

    def _exchanged_identity(self, digest: str) -> Identity | None:
        # Called from by_token, which the listeners run in worker threads; a store
        # error refuses the token (fail closed), it is not a crash.
        try:
            found = self.store.get_exchanged_token(digest)
        except StoreError:
            return None
        return Identity.from_dict(found) if found is not None else None

    def exchange(self, ident: Identity) -> tuple[str, float]:
        """A short castgate token standing for ``ident`` (an OIDC identity) until its
        token's expiry (plus leeway): usable as an SSH or PostgreSQL password where the
        OIDC token is too long (OpenSSH sends at most 1023 bytes). Only its SHA-256 is
        stored. Returns the token and its expiry (epoch seconds). Blocking (store)."""
        deadline = token_deadline(ident)
        if ident.method != "oidc" or deadline is None:
            raise ValueError("only an OIDC token with an expiry can be exchanged")
        token = EXCHANGED_PREFIX + secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        self.store.put_exchanged_token(
            digest, ident.to_dict(), datetime.fromtimestamp(deadline, UTC)
        )
        return token, deadline

    @staticmethod
    def valid(ident: Identity, now: float | None = None) -> bool:
        """Whether ``ident``'s token still covers new work (a new channel, a statement)."""
        deadline = token_deadline(ident)
        return deadline is None or (time.time() if now is None else now) < deadline

    @staticmethod
    def watch(ident: Identity, on_expired: Callable[[], None]) -> asyncio.TimerHandle | None:
        """Call ``on_expired`` on this loop when ``ident``'s token expires (at once if it
        already has); cancel the handle when the work ends first."""
        deadline = token_deadline(ident)
        if deadline is None:
            return None
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, deadline - time.time()), on_expired)

    def watch_session(
        self, session_id: str, ident: Identity, on_expired: Callable[[], None]
    ) -> None:
        """Arm the end of ``session_id`` at its token's expiry: ``on_expired`` runs then
        (a session not live yet is ended by its start, see ``ran_out``)."""

        def expired() -> None:
            self._watch.pop(session_id, None)
            self._ran_out.add(session_id)
            on_expired()

        handle = self.watch(ident, expired)
        if handle is not None:
            self._watch[session_id] = handle

    def ran_out(self, session_id: str) -> bool:
        """Whether ``session_id``'s token expired (and the session was not ended yet)."""
        return session_id in self._ran_out

    def forget(self, session_id: str) -> None:
        """The session ended: its watch is no longer needed."""
        handle = self._watch.pop(session_id, None)
        if handle is not None:
            handle.cancel()
        self._ran_out.discard(session_id)

    def issue(self, ident: Identity) -> str:
        """A random API token standing for ``ident`` until ``revoke`` (the console an
        operator opens over SSH authenticates to the API with it)."""
        token = "cgt_eph_" + secrets.token_urlsafe(32)
        self._ephemeral[token] = ident
        return token

    def revoke(self, token: str) -> None:
        """End an ephemeral token."""
        self._ephemeral.pop(token, None)

    def identity(self, token: str) -> Identity:
        """The identity of an API bearer token: ephemeral ones first, then the
        authenticator (static tokens, OIDC). Raises AuthError."""
        for known, ident in self._ephemeral.items():
            if hmac.compare_digest(known, token):
                return ident
        return self.auth.by_token(token)


class Roles:
    """The API/operator roles of an identity's groups (``[roles]``)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def of(self, groups: tuple[str, ...] | list[str]) -> set[str]:
        """The roles an identity with ``groups`` holds."""
        gs = set(groups)
        return {role for role, role_groups in self.cfg.roles.items() if gs & set(role_groups)}


def identity_detail(ident: Identity) -> dict[str, Any]:
    """``{"oidc": {...}}`` for an identity from an OIDC token (provider, subject, run id,
    run and initiator claims), else ``{}``: spread into the ``auth`` event's detail and
    the cast header's ``castgate`` object."""
    detail = ident.detail()
    return {"oidc": detail} if detail else {}
