"""What every listener of one relay process shares: config, policy, identities, the
store, the masker and the signing key."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recorder.config import Config, mask_policy
from recorder.masking import Masker
from recorder.session import SessionRecorder
from recorder.signing import SigningKey
from recorder.store import Store
from relay.approvals import Broker
from relay.identity import Authenticator, Identity
from relay.live import LiveHub
from relay.policy import Policy
from relay.ratelimit import AuthLimiter

log = logging.getLogger("castgate.relay")


def new_session_id() -> str:
    """Time-sortable, unguessable session id."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


@dataclass
class RelayContext:
    """Shared state of one relay process."""

    cfg: Config
    store: Store
    signing_key: SigningKey
    policy: Policy = field(init=False)
    auth: Authenticator = field(init=False)
    masker: Masker = field(init=False)
    broker: Broker = field(init=False)
    hub: LiveHub = field(default_factory=LiveHub)
    limiter: AuthLimiter = field(init=False)
    api_url: str | None = None
    _ephemeral: dict[str, Identity] = field(default_factory=dict)
    node: str = field(default_factory=socket.gethostname)
    live: dict[str, Any] = field(default_factory=dict)
    _pending: set[asyncio.Task[Any]] = field(default_factory=set)
    counters: Counter[tuple[str, str]] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.policy = Policy(self.cfg)
        self.auth = Authenticator(self.cfg)
        self.masker = Masker(mask_policy(self.cfg))
        self.broker = Broker(self.cfg, self.store, self.masker)
        sec = self.cfg.security
        self.limiter = AuthLimiter(sec.auth_failure_limit, sec.auth_window, sec.auth_lockout)

    @property
    def hold_deadline(self) -> float:
        """Seconds output that could still become a match may be held."""
        return self.cfg.masking.hold_deadline_ms / 1000

    def emit(
        self,
        kind: str,
        actor: str | None,
        outcome: str,
        origin: str | None,
        resource: str | None,
        detail: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        """``event`` from synchronous callbacks: the task is kept until it finishes, and
        ``drain`` waits for all of them at shutdown, so no audit event is dropped."""
        task = asyncio.ensure_future(
            self.event(kind, actor, outcome, origin, resource, detail, session_id)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def end_session(
        self,
        session_id: str,
        rec: SessionRecorder | None,
        *,
        status: str,
        exit_status: int | None = None,
    ) -> None:
        """Close a session's store row with its recording's figures and manifest, and
        start its seek index; store failures are logged, never raised."""
        manifest = getattr(rec, "manifest", None) if rec is not None else None
        try:
            await asyncio.to_thread(
                self.store.end_session,
                session_id,
                status=status,
                exit_status=exit_status,
                lines=rec.writer.lines if rec else None,
                final_hash=rec.writer.chain_hash if rec else None,
                masking_counts=dict(rec.counts) if rec else None,
            )
            if manifest is not None:
                await asyncio.to_thread(self.store.put_manifest, session_id, manifest)
        except Exception:
            log.exception("store.end_session_failed", extra={"session": session_id})

    async def index_cast(self, path: Path) -> None:
        """Build the seek index of a sealed cast in a thread, if it is small enough;
        failures are logged (the index is rebuilt on demand anyway)."""
        limit = self.cfg.recording.index_max_mb * 1024 * 1024
        try:
            if not path.is_file() or path.stat().st_size > limit:
                return
            from replay.seekindex import build_index, load_or_create_key

            key = load_or_create_key(self.cfg.keys_dir)
            await asyncio.to_thread(build_index, path, key=key)
        except Exception:
            log.exception("index.build_failed", extra={"cast": str(path)})

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task alive until it finishes; ``drain`` waits for it."""
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for audit events still being written."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def event(
        self,
        kind: str,
        actor: str | None,
        outcome: str,
        origin: str | None,
        resource: str | None,
        detail: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        """Write an audit event (PCI DSS 10.2.2 fields) and log it; a store failure is
        logged, never raised into the session."""
        self.counters[(kind, outcome)] += 1
        log.info(
            kind,
            extra={
                "actor": actor,
                "outcome": outcome,
                "origin": origin,
                "resource": resource,
                "session": session_id,
                **(detail or {}),
            },
        )
        try:
            await asyncio.to_thread(
                self.store.add_event,
                kind,
                actor,
                outcome,
                origin,
                resource,
                detail,
                session_id=session_id,
            )
        except Exception:
            log.exception("store.write_failed", extra={"kind": kind})

    def issue_token(self, ident: Identity) -> str:
        """A random API token standing for ``ident`` until ``revoke_token`` (the console
        an operator opens over SSH authenticates to the API with it)."""
        token = "cgt_eph_" + secrets.token_urlsafe(32)
        self._ephemeral[token] = ident
        return token

    def revoke_token(self, token: str) -> None:
        """End an ephemeral token."""
        self._ephemeral.pop(token, None)

    def token_identity(self, token: str) -> Identity:
        """The identity of an API bearer token: ephemeral ones first, then the
        authenticator (static tokens, OIDC). Raises AuthError."""
        for known, ident in self._ephemeral.items():
            if hmac.compare_digest(known, token):
                return ident
        return self.auth.by_token(token)

    def roles(self, groups: tuple[str, ...] | list[str]) -> set[str]:
        """The API/operator roles an identity with ``groups`` holds."""
        gs = set(groups)
        return {role for role, role_groups in self.cfg.roles.items() if gs & set(role_groups)}
