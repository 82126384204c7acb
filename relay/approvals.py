"""Approvals: a held command waits for human decisions recorded in the audit store.

The store is the meeting point: the relay creates the request and watches it; anyone
deciding through the same store (``castgate approve`` today, the control API later)
resolves it. Who may decide is checked here, before the store's own atomic checks
(separation of duties, distinct approvers, expiry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from recorder.config import Config, RuleConfig
from recorder.errors import CastgateError
from recorder.store import Store


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


async def wait_for_approval(
    store: Store,
    *,
    session_id: str,
    identity: str,
    target: str,
    command: str,
    rule: RuleConfig,
    on_requested: Callable[[int], None],
    poll_interval: float = 0.1,
) -> Outcome:
    """Create an approval request for an already masked ``command`` and wait until it
    is decided or ``rule.timeout`` passes (timeout means denied)."""
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
    on_requested(approval_id)
    try:
        while True:
            row = await asyncio.to_thread(store.get_approval, approval_id)
            if row is not None and row["status"] != "pending":
                return _outcome(row)
            if datetime.now(UTC) >= expires:
                await asyncio.to_thread(
                    store.set_approval_status, approval_id, "expired", reason="timed out"
                )
                row = await asyncio.to_thread(store.get_approval, approval_id)
                assert row is not None
                return _outcome(row)
            await asyncio.sleep(poll_interval)
    except asyncio.CancelledError:
        # The held session went away (agent disconnected, relay stopping).
        await asyncio.to_thread(
            store.set_approval_status, approval_id, "interrupted", reason="session ended"
        )
        raise


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
    cfg: Config, store: Store, approval_id: int, *, approver: str, approve: bool, reason: str | None
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
        "cli",
        f"approval:{approval_id}",
        {"decision": "approve" if approve else "deny", "reason": reason, "rule": row["rule"]},
        session_id=row["session_id"],
    )
    return row
