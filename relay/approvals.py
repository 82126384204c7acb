"""Approvals: a held command waits for human decisions recorded in the audit store.

The store is the record and the meeting point: the relay creates the request, anyone
deciding through the control API (or another relay sharing the store) resolves it. A
decision made through this relay's API wakes the held session at once; decisions made
elsewhere are noticed by a short poll. Who may decide is checked here, before the
store's own atomic checks (separation of duties, distinct approvers, expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from recorder.config import Config, RuleConfig, mask_policy
from recorder.errors import CastgateError
from recorder.masking import Masker
from recorder.store import Store, StoreError
from recorder.store.spool import StoreSpool


class ApprovalError(CastgateError):
    """A decision that may not be made."""


@dataclass(frozen=True)
class Outcome:
    """How a held command's approval ended."""

    approval_id: int
    approved: bool
    status: str
    deciders: tuple[str, ...]
    reason: str | None

    def describe(self) -> str:
        """``approval #17 granted by alice`` / ``approval #17 denied by bob: reason``."""
        who = ", ".join(self.deciders) or "nobody"
        if self.approved:
            return f"approval #{self.approval_id} granted by {who}"
        if self.status == "expired":
            return f"approval #{self.approval_id} timed out"
        why = f": {self.reason}" if self.reason else ""
        return f"approval #{self.approval_id} {self.status} by {who}{why}"


def _outcome(row: dict[str, Any]) -> Outcome:
    decisions = row.get("decisions", [])
    status = row["status"]
    wanted = "approve" if status == "approved" else "deny"
    deciders = tuple(d["approver"] for d in decisions if d["decision"] == wanted)
    return Outcome(row["id"], status == "approved", status, deciders, row.get("reason"))


def check_approver(cfg: Config, approver: str, approval: dict[str, Any]) -> None:
    """Raise ApprovalError unless ``approver`` is a configured identity in the
    ``approver`` role and, when the rule names approver groups, in one of them."""
    ident = next((i for i in cfg.identities if i.name == approver), None)
    if ident is None:
        raise ApprovalError(f"unknown identity {approver!r}")
    groups = set(ident.groups)
    if not groups & set(cfg.roles.get("approver", [])):
        raise ApprovalError(f"{approver} does not have the approver role")
    wanted = set(approval.get("approver_groups") or [])
    if wanted and not groups & wanted:
        raise ApprovalError(
            f"{approver} is not in the approver groups of rule {approval['rule']} "
            f"({', '.join(sorted(wanted))})"
        )


def decide(
    cfg: Config,
    store: Store,
    approval_id: int,
    *,
    approver: str,
    approve: bool,
    reason: str | None,
    origin: str = "cli",
) -> dict[str, Any]:
    """Record a decision after checking who may make it; returns the approval."""
    approval = store.get_approval(approval_id)
    if approval is None:
        raise ApprovalError(f"no approval #{approval_id}")
    check_approver(cfg, approver, approval)
    row = store.add_decision(
        approval_id, approver=approver, decision="approve" if approve else "deny", reason=reason
    )
    store.add_event(
        "approval.decision",
        approver,
        "success",
        origin,
        f"approval:{approval_id}",
        {"decision": "approve" if approve else "deny", "reason": reason, "rule": row["rule"]},
        session_id=row["session_id"],
    )
    try:
        # Wakes the relay holding the session if it is another one (PostgreSQL).
        store.notify_approval(approval_id)
    except StoreError as exc:
        # The decision is recorded; the holder's poll will find it.
        log.warning("approval.notify_failed", extra={"approval": approval_id, "error": str(exc)})
    return row


log = logging.getLogger("castgate.approvals")


class Broker:
    """Approval requests of one relay process."""

    def __init__(
        self, cfg: Config, store: Store, masker: Masker | None = None, poll_interval: float = 0.5
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.poll_interval = poll_interval
        self._events: dict[int, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_request: list[Callable[[dict[str, Any]], None]] = []
        self.masker = masker or Masker(mask_policy(cfg))
        self.spool: StoreSpool | None = None
        """The relay's store spool: while it holds writes, no approval can be asked."""

    async def ask(
        self,
        *,
        session_id: str,
        identity: str,
        target: str,
        command: str,
        rule: RuleConfig,
        on_requested: Callable[[int], None],
    ) -> Outcome:
        """``wait``, failing closed: StoreError at once while store writes are being
        spooled (without its store an approval can be neither asked nor awaited), and an
        approval already asked when the store fails is marked interrupted (if the store
        takes it), so that nobody decides it later."""
        spool = self.spool
        if spool is not None and spool.pending:
            raise StoreError("audit store unavailable (writes are being spooled)")
        asked: list[int] = []

        def requested(approval_id: int) -> None:
            asked.append(approval_id)
            on_requested(approval_id)

        try:
            return await self.wait(
                session_id=session_id,
                identity=identity,
                target=target,
                command=command,
                rule=rule,
                on_requested=requested,
            )
        except StoreError:
            if asked:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(
                        (spool or self.store).set_approval_status,
                        asked[0],
                        "interrupted",
                        reason="approval store unavailable",
                    )
            raise

    async def wait(
        self,
        *,
        session_id: str,
        identity: str,
        target: str,
        command: str,
        rule: RuleConfig,
        on_requested: Callable[[int], None],
    ) -> Outcome:
        """Create a request for an already masked ``command`` and wait for its decision
        or ``rule.timeout`` (timeout means denied)."""
        store = self.store
        expires = datetime.now(UTC) + timedelta(seconds=rule.timeout)
        approval_id = await asyncio.to_thread(
            store.create_approval,
            session_id=session_id,
            identity=identity,
            target=target,
            command=command,
            rule=rule.name,
            expires_at=expires,
            min_approvals=rule.min_approvals,
            approver_groups=rule.approvers,
        )
        event = self._events[approval_id] = asyncio.Event()
        on_requested(approval_id)
        row = await asyncio.to_thread(store.get_approval, approval_id)
        if row is not None:
            for hook in self.on_request:
                hook(row)
            if rule.webhook:
                self._spawn(self._webhook(rule.webhook, row))
        try:
            while True:
                remaining = (expires - datetime.now(UTC)).total_seconds()
                if remaining <= 0:
                    await asyncio.to_thread(
                        store.set_approval_status, approval_id, "expired", reason="timed out"
                    )
                    row = await asyncio.to_thread(store.get_approval, approval_id)
                    assert row is not None
                    return _outcome(row)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(self.poll_interval, remaining))
                event.clear()
                row = await asyncio.to_thread(store.get_approval, approval_id)
                if row is not None and row["status"] != "pending":
                    return _outcome(row)
        except asyncio.CancelledError:
            await asyncio.to_thread(
                store.set_approval_status, approval_id, "interrupted", reason="session ended"
            )
            raise
        finally:
            self._events.pop(approval_id, None)

    async def decide(
        self, approval_id: int, *, approver: str, approve: bool, reason: str | None, origin: str
    ) -> dict[str, Any]:
        """Record a decision (after checking who may make it) and wake the held session.
        The reason is free text from a person: it is masked like everything kept."""
        if reason:
            reason = self.masker.mask(reason)
        row = await asyncio.to_thread(
            decide,
            self.cfg,
            self.store,
            approval_id,
            approver=approver,
            approve=approve,
            reason=reason,
            origin=origin,
        )
        self.wake(approval_id)
        return row

    def held(self) -> int:
        """Commands held here waiting for a decision now."""
        return len(self._events)

    def wake(self, approval_id: int) -> None:
        """Make a command held here for ``approval_id`` re-read its approval now."""
        event = self._events.get(approval_id)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        """Make every held command re-read its approval (after notifications may have
        been missed)."""
        for event in list(self._events.values()):
            event.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _webhook(self, url: str, row: dict[str, Any]) -> None:
        """POST the request as JSON, retried with backoff; never blocks the session."""
        import aiohttp

        body = {
            "event": "approval.requested",
            "approval": {
                k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()
            },
        }
        delay = 1.0
        for attempt in range(5):
            try:
                timeout = aiohttp.ClientTimeout(total=10)
                async with (
                    aiohttp.ClientSession(timeout=timeout) as http,
                    http.post(url, json=body) as resp,
                ):
                    if resp.status < 300:
                        return
                    log.warning(
                        "approval.webhook_status",
                        extra={"status": resp.status, "attempt": attempt},
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning(
                    "approval.webhook_failed", extra={"error": str(exc), "attempt": attempt}
                )
            await asyncio.sleep(delay)
            delay *= 2


def interrupt_stale(store: Store, node: str | None = None) -> tuple[int, int]:
    """After a restart: approvals still pending and sessions still live belong to held
    sessions that are gone; close them as ``interrupted`` (history intact)."""
    approvals = 0
    for row in store.list_approvals(status="pending"):
        # Only this relay's: with a shared store another relay may hold the session.
        session = store.get_session(row["session_id"])
        if node is not None and session is not None and session.get("node") not in (None, node):
            continue
        store.set_approval_status(row["id"], "interrupted", reason="relay restarted")
        approvals += 1
    sessions = 0
    for sess in store.list_sessions(live=True):
        if node is None or sess.get("node") in (None, node):
            try:
                store.end_session(sess["id"], status="interrupted")
            except StoreError:
                continue  # another relay's reaper ended it a moment ago
            sessions += 1
    return approvals, sessions
