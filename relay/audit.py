"""The audit trail of one relay process, and its binding to one session.

One rule for every audit call of a session: it is fire-and-forget. ``BoundAudit.success``
and ``BoundAudit.failure`` schedule the event and return at once, so a synchronous
callback (a writer thread's error, a timer) audits exactly as a coroutine does. The events
of one binding are written in the order they were made, each after the one before, and
every one is kept until written (``Background.drain`` waits for them at shutdown, so none
is lost). Where the order against what the client sees matters (a refusal, the session's
end) the caller awaits ``BoundAudit.settled()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from recorder.store.spool import StoreSpool

log = logging.getLogger("castgate.relay")


class Background:
    """Tasks that must finish even though nobody awaits them (audit writes, uploads,
    seek indexes): each is kept until done, and ``drain`` waits for all of them."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Future[Any]] = set()

    def track(self, task: asyncio.Future[Any]) -> None:
        """Keep ``task`` alive until it finishes."""
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for every tracked task, including those they start meanwhile."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


class AuditTrail:
    """Audit events (PCI DSS 10.2.2 fields): logged, counted, written through the store
    spool; a store failure is logged, never raised into a session. An event of a session
    with attributes (an OIDC token's provider, subject, run) carries them (``oidc``)."""

    def __init__(self, spool: StoreSpool, background: Background) -> None:
        self.spool = spool
        self.background = background
        self.counters: Counter[tuple[str, str]] = Counter()
        """Events written, by (kind, outcome): the ``/metrics`` counters."""
        self.recording_failures: Counter[str] = Counter()
        """Recording failures by what was done (terminated, refused, continued)."""
        self._attributes: dict[str, dict[str, Any]] = {}

    def attribute(self, session_id: str, detail: dict[str, Any]) -> None:
        """From now on every event of ``session_id`` carries ``detail`` as ``oidc``."""
        self._attributes[session_id] = detail

    def forget(self, session_id: str) -> None:
        """The session ended: its later events (none expected) carry nothing extra."""
        self._attributes.pop(session_id, None)

    def bind(
        self,
        *,
        actor: str | None = None,
        origin: str | None = None,
        resource: str | None = None,
        session_id: str | None = None,
    ) -> BoundAudit:
        """The audit of one connection or session: who, from where, on what."""
        return BoundAudit(self, actor, origin, resource, session_id)

    def emit(
        self,
        kind: str,
        actor: str | None,
        outcome: str,
        origin: str | None,
        resource: str | None,
        detail: dict[str, Any] | None = None,
        session_id: str | None = None,
        *,
        after: asyncio.Future[Any] | None = None,
    ) -> asyncio.Task[None]:
        """Schedule an event (from synchronous code too) and keep it until written;
        ``after``: written only once that earlier event is. What the event says is
        settled now (the session's attributes too), not when it is written."""
        args = (kind, actor, outcome, origin, resource, self._detail(detail, session_id))
        task = asyncio.ensure_future(self._write_after(after, *args, session_id))
        self.background.track(task)
        return task

    async def _write_after(self, after: asyncio.Future[Any] | None, *args: Any) -> None:
        if after is not None:
            await asyncio.gather(after, return_exceptions=True)
        await self._write(*args)

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
        """Write an event and wait until the store (or its spool) has it."""
        detail = self._detail(detail, session_id)
        await self._write(kind, actor, outcome, origin, resource, detail, session_id)

    def _detail(
        self, detail: dict[str, Any] | None, session_id: str | None
    ) -> dict[str, Any] | None:
        oidc = self._attributes.get(session_id) if session_id is not None else None
        if oidc is not None and not (detail and "oidc" in detail):
            return {**(detail or {}), "oidc": oidc}
        return detail

    async def _write(
        self,
        kind: str,
        actor: str | None,
        outcome: str,
        origin: str | None,
        resource: str | None,
        detail: dict[str, Any] | None,
        session_id: str | None,
    ) -> None:
        self.counters[(kind, outcome)] += 1
        extra = {
            "actor": actor,
            "outcome": outcome,
            "origin": origin,
            "resource": resource,
            "session": session_id,
        }
        log.info(kind, extra={**extra, **(detail or {})})
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


class BoundAudit:
    """The audit of one connection or session, its fields bound once:
    ``audit.failure("command.blocked", rule=..., command=...)``. Fire-and-forget, in
    order (see the module docstring)."""

    def __init__(
        self,
        trail: AuditTrail,
        actor: str | None,
        origin: str | None,
        resource: str | None,
        session_id: str | None,
    ) -> None:
        self.trail = trail
        self.actor = actor
        self.origin = origin
        self.resource = resource
        self.session_id = session_id
        self._last: asyncio.Task[None] | None = None

    def bind(self, **fields: str | None) -> BoundAudit:
        """Another binding with some fields changed (its events ordered of their own)."""
        values: dict[str, Any] = {
            "actor": self.actor,
            "origin": self.origin,
            "resource": self.resource,
            "session_id": self.session_id,
            **fields,
        }
        return self.trail.bind(**values)

    def success(self, kind: str, /, **detail: Any) -> None:
        """An event whose outcome is ``success``; ``detail`` is its detail object."""
        self._emit(kind, "success", detail)

    def failure(self, kind: str, /, **detail: Any) -> None:
        """An event whose outcome is ``failure``."""
        self._emit(kind, "failure", detail)

    def outcome(self, kind: str, ok: bool, /, **detail: Any) -> None:
        """``success`` when ``ok``, else ``failure``."""
        self._emit(kind, "success" if ok else "failure", detail)

    def _emit(self, kind: str, outcome: str, detail: dict[str, Any]) -> None:
        self._last = self.trail.emit(
            kind,
            self.actor,
            outcome,
            self.origin,
            self.resource,
            detail or None,
            self.session_id,
            after=self._last,
        )

    async def settled(self) -> None:
        """Wait until every event of this binding so far is written."""
        last = self._last
        if last is not None:
            await asyncio.gather(asyncio.shield(last), return_exceptions=True)
