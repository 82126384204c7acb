"""What every listener of one relay process shares: config, policy, identities, the
store, the masker and the signing key."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh

from recorder.config import Config, RuleConfig, TargetConfig, mask_policy
from recorder.masking import Masker
from recorder.session import SessionRecorder
from recorder.signing import SigningKey
from recorder.store import Store, StoreError
from recorder.store.spool import StoreSpool
from relay.approvals import Broker, Outcome
from relay.cluster import Cluster, default_node_id, peer_token
from relay.connlimit import ConnectionLimits, fd_budget
from relay.identity import EXCHANGED_PREFIX, Authenticator, Identity
from relay.live import LiveHub
from relay.policy import Policy
from relay.ratelimit import AuthLimiter
from relay.uploader import Uploader

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
    node: str = ""
    live: dict[str, Any] = field(default_factory=dict)
    _pending: set[asyncio.Task[Any]] = field(default_factory=set)
    _checkpoints: deque[tuple[str, int, str]] = field(default_factory=deque)
    spool_dir: Path | None = None
    """Where store writes are spooled during an outage (default data_dir/spool)."""
    _checkpoint_lock: threading.Lock = field(default_factory=threading.Lock)
    counters: Counter[tuple[str, str]] = field(default_factory=Counter)
    uploader: Uploader | None = None
    cluster: Cluster | None = None
    peer_token: str | None = field(default=None, repr=False)
    _indexing: dict[Path, asyncio.Task[None]] = field(default_factory=dict)
    spool: StoreSpool = field(init=False)
    recording_failures: Counter[str] = field(default_factory=Counter)
    connections: ConnectionLimits = field(init=False)
    """Open connections by source and in total, every listener of this process."""
    _session_oidc: dict[str, dict[str, Any]] = field(default_factory=dict)
    """OIDC attributes of open sessions, added to each of their audit events."""
    _credential_ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    _token_watch: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    """Per open session with an expiring token: the timer that ends it."""
    _expired_early: dict[str, Identity] = field(default_factory=dict)
    """Sessions whose token ran out before they were live: ended at their start."""

    def __post_init__(self) -> None:
        self.policy = Policy(self.cfg)
        self.masker = Masker(mask_policy(self.cfg))
        self.auth = Authenticator(self.cfg, mask=self.masker.mask)
        self.auth.exchanged = self._exchanged_identity
        self.broker = Broker(self.cfg, self.store, self.masker)
        sec = self.cfg.security
        self.limiter = AuthLimiter(sec.auth_failure_limit, sec.auth_window, sec.auth_lockout)
        lim = self.cfg.limits
        self.connections = ConnectionLimits(
            min(lim.connections, fd_budget(lim.fd_reserve)),
            lim.connections_per_source,
            report=self._report_refusals,
            report_interval=lim.report_interval,
        )
        self.node = self.node or default_node_id(self.cfg)
        if self.peer_token is None:
            self.peer_token = peer_token(self.cfg)
        # Every store write of the relay goes through the spool (see recorder/store/spool.py).
        self.spool = StoreSpool(self.store, self.spool_dir or self.cfg.data_path / "spool")

    def _report_refusals(self, refused: dict[str, int]) -> None:
        # One log line and one audit event for a batch of refusals, never one each.
        log.warning("relay.connections_refused", extra={"refused": refused})
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # outside the relay's loop (tests): the log line has it
            return
        self.emit("connection.refused", None, "failure", None, "relay", {"refused": refused})

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
        # An empty manifest: the recording failed and nothing was sealed.
        manifest = (getattr(rec, "manifest", None) if rec is not None else None) or None
        self._session_oidc.pop(session_id, None)
        watch = self._token_watch.pop(session_id, None)
        if watch is not None:
            watch.cancel()
        self._expired_early.pop(session_id, None)
        # The seal's own checkpoint (queued by the writer pool) goes in before the end.
        await asyncio.to_thread(self._store_checkpoints)
        try:
            await asyncio.to_thread(
                self.spool.end_session,
                session_id,
                status=status,
                exit_status=exit_status,
                lines=rec.writer.lines if rec else None,
                final_hash=rec.writer.chain_hash if rec else None,
                masking_counts=dict(rec.counts) if rec else None,
            )
        except Exception:
            log.exception("store.end_session_failed", extra={"session": session_id})
        try:
            # Even when the end is already recorded (another relay declared this one
            # lost and ended the row): the signed manifest still belongs in the store.
            if manifest is not None:
                await asyncio.to_thread(self.spool.put_manifest, session_id, manifest)
        except Exception:
            log.exception("store.put_manifest_failed", extra={"session": session_id})
        if manifest is not None and rec is not None and self.uploader is not None:
            path = rec.writer.path
            self.track(asyncio.ensure_future(self._ship(path, self._indexing.pop(path, None))))

    async def _ship(self, path: Path, indexing: asyncio.Task[None] | None) -> None:
        # The index is uploaded with the cast (before the manifest), so wait for it.
        if indexing is not None:
            await asyncio.gather(indexing, return_exceptions=True)
        if self.uploader is not None:
            self.uploader.submit(path)

    def start_uploads(self, *, scan: bool = True) -> None:
        """Start shipping sealed casts to ``[s3]`` (no-op without it); upload audit
        events come back from the worker thread to this loop. ``scan``: also queue
        the sealed casts found in the recordings directory (one relay process of a
        machine does it, or two would ship the same files)."""
        from recorder.objectstore import ObjectStore

        if self.cfg.s3 is None:
            return
        loop = asyncio.get_running_loop()

        def on_event(
            kind: str, outcome: str, resource: str, detail: dict[str, Any], sid: str | None
        ) -> None:
            loop.call_soon_threadsafe(
                self.emit, kind, None, outcome, self.node, resource, detail, sid
            )

        self.uploader = Uploader(self.cfg, ObjectStore(self.cfg.s3), on_event)
        self.uploader.scan_at_start = scan
        self.uploader.start()

    async def stop_uploads(self) -> None:
        """Let the worker finish what is due (bounded), then flush its audit events."""
        if self.uploader is not None:
            await asyncio.to_thread(self.uploader.stop)
            await asyncio.sleep(0)  # run the events it handed over before drain()

    def index_cast(self, path: Path) -> asyncio.Task[None]:
        """Build the seek index of a sealed cast in a thread, if it is small enough;
        failures are logged (the index is rebuilt on demand anyway). The task is
        remembered so the cast's upload can wait for it."""
        task = asyncio.ensure_future(self._index(path))
        self._indexing[path] = task
        task.add_done_callback(lambda _: self._forget_index(path, task))
        return task

    def _forget_index(self, path: Path, task: asyncio.Task[None]) -> None:
        if self._indexing.get(path) is task:
            del self._indexing[path]

    async def _index(self, path: Path) -> None:
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
        logged, never raised into the session. An event of a session opened with an
        OIDC token carries the token's provider, subject, run and attributes (``oidc``)."""
        self.counters[(kind, outcome)] += 1
        oidc = self._session_oidc.get(session_id) if session_id is not None else None
        if oidc is not None and not (detail and "oidc" in detail):
            detail = {**(detail or {}), "oidc": oidc}
        if kind == "session.start" and session_id in self._expired_early:
            # A new session (an SSH channel) after the token ran out: it ends at once,
            # before its command reaches the target.
            self.track(asyncio.ensure_future(self._end_expired(session_id)))
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
                self.spool.add_event,
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

    def recording_failed(
        self,
        *,
        session_id: str,
        actor: str | None,
        origin: str | None,
        resource: str,
        error: str,
        action: str,
    ) -> None:
        """Alert that a session's recording failed: an ERROR log line, a
        ``recording.failed`` audit event (the error text, ``recording.on_failure`` and
        what was done: ``terminated``, ``refused`` or ``continued``) and the
        ``castgate_recording_failures_total`` metric."""
        policy = self.cfg.recording.on_failure
        self.recording_failures[action] += 1
        log.error(
            "recording.failed",
            extra={"session": session_id, "error": error, "on_failure": policy, "action": action},
        )
        self.emit(
            "recording.failed",
            actor,
            "failure",
            origin,
            resource,
            {"error": error, "on_failure": policy, "action": action},
            session_id=session_id,
        )

    async def await_approval(
        self,
        *,
        session_id: str,
        identity: str,
        target: str,
        command: str,
        rule: RuleConfig,
        on_requested: Callable[[int], None],
    ) -> Outcome:
        """Ask for an approval and wait for its decision (``Broker.wait``); StoreError
        at once while store writes are being spooled: without its store an approval can
        be neither asked nor awaited, so the caller fails closed. An approval already
        asked when the store fails is marked interrupted (if the store takes it)."""
        if self.spool.pending:
            raise StoreError("audit store unavailable (writes are being spooled)")
        asked: list[int] = []

        def requested(approval_id: int) -> None:
            asked.append(approval_id)
            on_requested(approval_id)

        try:
            return await self.broker.wait(
                session_id=session_id,
                identity=identity,
                target=target,
                command=command,
                rule=rule,
                on_requested=requested,
            )
        except StoreError:
            if asked:
                # Asked, then the store went away: nobody must decide it later.
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(
                        self.spool.set_approval_status,
                        asked[0],
                        "interrupted",
                        reason="approval store unavailable",
                    )
            raise

    def checkpoint(self, session_id: str, lines: int, chain_hash: str) -> None:
        """Queue a cast's checkpoint (called by the writer pool after each fsync); the
        event loop stores it (``store_checkpoints``). Storing it in the pool thread
        itself would let a slow or hanging store stall every cast that thread writes."""
        self._checkpoints.append((session_id, lines, chain_hash))

    def _store_checkpoints(self) -> None:
        # One thread at a time: two could otherwise store a session's checkpoints out
        # of order, and the store's latest would not be the last.
        with self._checkpoint_lock:
            latest: dict[str, tuple[int, str]] = {}
            while self._checkpoints:
                sid, lines, chain_hash = self._checkpoints.popleft()
                latest[sid] = (lines, chain_hash)  # a later one covers the earlier
            for sid, (lines, chain_hash) in latest.items():
                try:
                    self.spool.add_checkpoint(sid, lines, chain_hash)
                except Exception:
                    log.exception("store.checkpoint_failed", extra={"session": sid})

    async def store_checkpoints(self, every: float = 0.2) -> None:
        """Store queued checkpoints every ``every`` seconds until cancelled (then once
        more, so a clean shutdown keeps them all)."""
        try:
            while True:
                await asyncio.sleep(every)
                if self._checkpoints:
                    await asyncio.to_thread(self._store_checkpoints)
        finally:
            if self._checkpoints:
                await asyncio.to_thread(self._store_checkpoints)

    async def replay_spool(self, idle: float = 0.5, backoff: float = 5.0) -> None:
        """Replay store writes spooled during an outage, in the background, for as long
        as the relay runs: a look every ``idle`` seconds, at most one attempt every
        ``backoff`` seconds while the store stays away (no retry storm)."""
        delay = idle
        while True:
            await asyncio.sleep(delay)
            if not self.spool.pending:
                delay = idle
                continue
            try:
                await asyncio.to_thread(self.spool.replay)
            except Exception:
                log.exception("spool.replay_failed")
            delay = idle if not self.spool.pending else min(delay * 2, backoff)

    # --- identity attributes, credentials, token lifetime (protocol-neutral) -----------

    def _exchanged_identity(self, digest: str) -> Identity | None:
        # Called from by_token, which the listeners run in worker threads; a store
        # error refuses the token (fail closed), it is not a crash.
        try:
            found = self.store.get_exchanged_token(digest)
        except StoreError:
            return None
        return Identity.from_dict(found) if found is not None else None

    def exchange_token(self, ident: Identity) -> tuple[str, float]:
        """A short castgate token standing for ``ident`` (an OIDC identity) until its
        token's expiry (plus leeway): usable as an SSH or PostgreSQL password where the
        OIDC token is too long (OpenSSH sends at most 1023 bytes). Only its SHA-256 is
        stored. Returns the token and its expiry (epoch seconds). Blocking (store)."""
        deadline = self.token_deadline(ident)
        if ident.method != "oidc" or deadline is None:
            raise ValueError("only an OIDC token with an expiry can be exchanged")
        token = EXCHANGED_PREFIX + secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        self.store.put_exchanged_token(
            digest, ident.to_dict(), datetime.fromtimestamp(deadline, UTC)
        )
        return token, deadline

    @staticmethod
    def identity_detail(ident: Identity) -> dict[str, Any]:
        """``{"oidc": {...}}`` for an identity from an OIDC token (provider, subject,
        run id, run and initiator claims), else ``{}``: spread into the ``auth`` event's
        detail and the cast header's ``castgate`` object."""
        detail = ident.detail()
        return {"oidc": detail} if detail else {}

    def attribute_session(self, session_id: str, ident: Identity) -> dict[str, Any]:
        """Keyword arguments for ``create_session`` (``attributes``, ``run_id``), and from
        now on every audit event of ``session_id`` carries the identity's attributes."""
        detail = ident.detail()
        if detail:
            self._session_oidc[session_id] = detail
        self._watch_session(session_id, ident)
        return {"attributes": detail or None, "run_id": ident.run_id}

    def _watch_session(self, session_id: str, ident: Identity) -> None:
        """Arm the end of ``session_id`` at its token's expiry (plus leeway)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the relay's loop (tests of the row alone)
        handle = self.watch_token(ident, lambda: self._token_ran_out(session_id, ident))
        if handle is not None:
            self._token_watch[session_id] = handle

    def _token_ran_out(self, session_id: str, ident: Identity) -> None:
        self._token_watch.pop(session_id, None)
        self._expired_early[session_id] = ident
        if session_id in self.live:
            self.track(asyncio.ensure_future(self._end_expired(session_id)))
        # else: not live yet; the session.start event ends it.

    async def _end_expired(self, session_id: str) -> None:
        """End a live session whose token expired: an audit event, a cast marker, a
        message to the agent, then the session's own ``close`` (the one shutdown uses;
        each relay's session has it)."""
        ident = self._expired_early.pop(session_id, None)
        session = self.live.get(session_id)
        if ident is None or session is None:
            return
        target = getattr(session, "target", None)
        kind = getattr(target, "kind", None)
        resource = f"{kind}:{target.name}" if target is not None else None
        message = self.token_expired(ident, None, resource, session_id=session_id)
        rec = getattr(session, "rec", None)
        with contextlib.suppress(Exception):
            if rec is not None:
                rec.marker(message.removeprefix("castgate: "))
        chan = getattr(session, "chan", None)
        with contextlib.suppress(Exception):
            if chan is not None:  # SSH: the agent's stderr (PostgreSQL: the FATAL below)
                chan.write_stderr((message + "\r\n").encode())
        with contextlib.suppress(Exception):
            await session.close(message.removeprefix("castgate: "))

    def credential_detail(self, target: TargetConfig) -> dict[str, Any]:
        """What names the relay's credential for ``target`` in the audit trail: the
        environment variable's name, the key file and its public key's SHA-256
        fingerprint. Never the value (PCI DSS 8.6.2: the pipeline holds no static
        credential; the relay's is named where it is used)."""
        cached = self._credential_ids.get(target.name)
        if cached is not None:
            return cached
        detail: dict[str, Any] = {"target": target.name}
        if target.password_env:
            detail["env"] = target.password_env
        if target.key_file:
            path = self.cfg.resolve(target.key_file)
            detail["key_file"] = str(path)
            try:
                detail["fingerprint"] = asyncssh.read_private_key(path).get_fingerprint()
            except (OSError, ValueError, asyncssh.KeyImportError) as exc:
                detail["fingerprint"] = None
                detail["fingerprint_error"] = type(exc).__name__
        self._credential_ids[target.name] = detail
        return detail

    def credential_used(
        self, session_id: str, actor: str | None, origin: str | None, target: TargetConfig
    ) -> None:
        """Audit the relay's use of ``target``'s credential for a session
        (``credential.use``); the relays call it once the target accepted it."""
        detail = self.credential_detail(target)
        if len(detail) == 1:
            return  # no credential of the relay's (e.g. a trust-authenticated database)
        self.emit(
            "credential.use",
            actor,
            "success",
            origin,
            f"{target.kind}:{target.name}",
            {"credential": detail},
            session_id=session_id,
        )

    @staticmethod
    def token_deadline(ident: Identity) -> float | None:
        """Epoch seconds when a session opened with ``ident``'s token must end (its
        ``exp`` plus the provider's leeway), or None for credentials that do not expire."""
        if ident.expires_at is None:
            return None
        return ident.expires_at + ident.leeway

    def token_valid(self, ident: Identity, now: float | None = None) -> bool:
        """Whether ``ident``'s token still covers new work (a new channel, a statement)."""
        deadline = self.token_deadline(ident)
        return deadline is None or (time.time() if now is None else now) < deadline

    def watch_token(
        self, ident: Identity, on_expired: Callable[[], None]
    ) -> asyncio.TimerHandle | None:
        """Call ``on_expired`` on this loop when ``ident``'s token expires (at once if it
        already has); cancel the handle when the session ends first.
        :meth:`attribute_session` arms it for every session (SSH channel, PostgreSQL
        session) opened with an expiring token."""
        deadline = self.token_deadline(ident)
        if deadline is None:
            return None
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, deadline - time.time()), on_expired)

    def token_expired(
        self,
        ident: Identity,
        origin: str | None,
        resource: str | None,
        session_id: str | None = None,
    ) -> str:
        """Audit a session cut at its token's expiry (``session.token_expired``) and
        return the message for the agent."""
        deadline = self.token_deadline(ident)
        when = datetime.fromtimestamp(deadline, UTC).isoformat() if deadline else None
        self.emit(
            "session.token_expired",
            ident.name,
            "success",
            origin,
            resource,
            {"expired_at": when, "provider": ident.provider},
            session_id=session_id,
        )
        return f"castgate: your token expired at {when}; the session is closed"

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
