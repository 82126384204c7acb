"""The protocol-neutral core of one relayed session (an SSH channel, a PostgreSQL
connection, a Kubernetes API client): who, on what target, its session id, its bound
audit, its recording and the one way a policy decision is enforced.

The protocol keeps its I/O and gives the core a :class:`Frontend` (how its client is
told things and how the session is closed) and a :class:`CommandLog` (where decided
commands are logged). What a protocol calls a command (a shell line, a SQL text, an
HTTP request) reaches :meth:`SessionCore.enforce` as its masked text and a kind.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from recorder.config import TargetConfig
from recorder.session import SessionRecorder
from recorder.store import StoreError
from relay.identity import Identity
from relay.policy import Decision, ScopedPolicy
from relay.session_recording import Recording, RecordingDeps, RecordingLost
from relay.tokens import expiry_text

if TYPE_CHECKING:
    from relay.context import RelayContext

log = logging.getLogger("castgate.relay")


class Frontend(Protocol):
    """What the protocol gives its session core."""

    def tell(self, text: str) -> None:
        """Show a relay message (``castgate: ...``) to the client where it reads one."""

    async def close(self, reason: str) -> None:
        """End the session from the relay's side and wait until it is sealed."""


class CommandLog(Protocol):
    """Where a protocol logs the commands decided in its sessions."""

    async def opened(self, command: str, kind: str, decision: Decision) -> None:
        """A command was decided (before it is enforced)."""

    async def refused(self, command: str, decision: Decision, status: str) -> None:
        """The command was refused: ``blocked``, an approval's end, ``store unavailable``."""


@dataclass(frozen=True)
class Verdict:
    """What came of enforcing a decision: whether the command may run and, when not,
    the message for the client (the protocol shows it its own way)."""

    allowed: bool
    status: str
    message: str = ""


ALLOWED = Verdict(True, "allowed")


def _why(decision: Decision) -> str:
    """`` (reason)`` when the decision has a reason other than its rule's name."""
    reason = decision.reason
    return f" ({reason})" if reason and reason != decision.rule_name else ""


class SessionCore:
    """One session's identity, target, audit, recording and enforcement."""

    def __init__(
        self,
        ctx: RelayContext,
        *,
        session_id: str,
        ident: Identity,
        target: TargetConfig,
        origin: str,
        frontend: Frontend,
        commands: CommandLog,
        on_lost: RecordingLost,
    ) -> None:
        self.ctx = ctx
        self.id = session_id
        self.ident = ident
        self.target = target
        self.origin = origin
        self.frontend = frontend
        self.commands = commands
        self.resource = f"{target.kind}:{target.name}"
        self.audit = ctx.audit.bind(
            actor=ident.name, origin=origin, resource=self.resource, session_id=session_id
        )
        deps = RecordingDeps(
            ctx.cfg,
            ctx.masker,
            ctx.signing_key,
            ctx.hub,
            ctx.checkpoints,
            ctx.audit.recording_failures,
        )
        self.recording = Recording(deps, session_id, self.audit, on_lost)
        self._scoped: ScopedPolicy | None = None

    @property
    def rec(self) -> SessionRecorder | None:
        """The session's recorder (None until the recording is opened)."""
        return self.recording.rec

    @property
    def scoped(self) -> ScopedPolicy:
        """This identity's rules on this target."""
        if self._scoped is None:
            self._scoped = self.ctx.policy.scoped(self.target.name, self.ident.groups)
        return self._scoped

    def opaque(self, reason: str) -> Decision:
        """The decision on a command the relay cannot check (``castgate:opaque``)."""
        return self.scoped.opaque(reason)

    # -- start ---------------------------------------------------------------------------

    async def start(self, *, protocol: str, title: str, failure: str | None, **detail: Any) -> bool:
        """The session row (even for a refused session: the row says why), the
        recording's failure at start (``failure``, from ``recording.open``), then the
        session is live: ``session.start`` with ``detail``. False when the session must
        not go on (its recording failed and ``on_failure`` terminates)."""
        ident = self.ident
        await asyncio.to_thread(
            self.ctx.spool.create_session,
            self.id,
            identity=ident.name,
            target=self.target.name,
            protocol=protocol,
            groups=list(ident.groups),
            auth_method=ident.method,
            source=self.origin,
            node=self.ctx.node,
            cast_path=str(self.recording.path),
            title=title,
            **self.attribute(),
        )
        if failure is not None:
            self.recording.fail(failure, at_start=True)
            if self.recording.terminated:
                return False
        self.ctx.live[self.id] = self
        self.audit.success("session.start", **detail)
        if self.ctx.tokens.ran_out(self.id):
            # The token ran out before the session was live: it ends now, before its
            # command reaches the target.
            self.ctx.audit.background.track(asyncio.ensure_future(self.expire()))
        return True

    def attribute(self) -> dict[str, Any]:
        """Keyword arguments for ``create_session`` (``attributes``, ``run_id``); from
        now on every event of the session carries the identity's attributes, and the
        session ends at its token's expiry."""
        detail = self.ident.detail()
        if detail:
            self.ctx.audit.attribute(self.id, detail)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # not on the relay's loop (tests of the row alone)
        else:
            self.ctx.tokens.watch_session(self.id, self.ident, self._token_ran_out)
        return {"attributes": detail or None, "run_id": self.ident.run_id}

    def credential_used(self) -> None:
        """Audit the relay's use of the target's credential (``credential.use``), once
        the target accepted it; nothing for a target the relay holds no credential of."""
        detail = self.ctx.credentials.detail(self.target)
        if len(detail) > 1:
            self.audit.success("credential.use", credential=detail)

    # -- the token's expiry --------------------------------------------------------------

    def _token_ran_out(self) -> None:
        if self.id in self.ctx.live:
            self.ctx.audit.background.track(asyncio.ensure_future(self.expire()))
        # else: not live yet; ``start`` ends it.

    async def expire(self) -> None:
        """End the session at its token's expiry: an audit event, a cast marker, a
        message to the client, then the protocol's own close."""
        if not self.ctx.tokens.ran_out(self.id):
            return  # already ended, or ending
        self.ctx.tokens.forget(self.id)
        when = expiry_text(self.ident)
        self.audit.success("session.token_expired", expired_at=when, provider=self.ident.provider)
        message = f"your token expired at {when}; the session is closed"
        self.recording.marker(message)
        try:
            self.frontend.tell(f"castgate: {message}")
            await self.frontend.close(message)
        except Exception:  # the client may be gone already: the session ends anyway
            log.debug("session.expire_close_failed", extra={"session": self.id}, exc_info=True)

    async def close(self, reason: str) -> None:
        """End the session from the relay's side (shutdown, the cluster)."""
        await self.frontend.close(reason)

    # -- enforcement ---------------------------------------------------------------------

    async def enforce(self, decision: Decision, command: str, kind: str) -> Verdict:
        """Log and carry out a policy decision on a (masked) command: allow, block, or
        hold it for approval. What is not a plain allow has its marker, events and (when
        refused) command-log entry on record before the verdict returns; the protocol
        shows ``Verdict.message``."""
        await self.commands.opened(command, kind, decision)
        if decision.action == "allow":
            return ALLOWED
        rule = decision.rule
        assert rule is not None
        if decision.action == "block":
            self.recording.marker(f"blocked: {rule.name}{_why(decision)}")
            extra = {"reason": decision.reason} if decision.reason else {}
            self.audit.failure("command.blocked", rule=rule.name, command=command, **extra)
            return await self._refused(
                decision,
                command,
                "blocked",
                f"castgate: blocked by rule {rule.name}{_why(decision)}",
            )
        return await self._hold(decision, command)

    async def _hold(self, decision: Decision, command: str) -> Verdict:
        rule = decision.rule
        assert rule is not None
        asked: list[int] = []

        def requested(approval_id: int) -> None:
            asked.append(approval_id)
            self.recording.marker(f"approval #{approval_id} requested (rule {rule.name})")
            self.frontend.tell(
                f"castgate: approval #{approval_id} required (rule {rule.name}), "
                f"waiting{_why(decision)}"
            )

        try:
            outcome = await self.ctx.broker.ask(
                session_id=self.id,
                identity=self.ident.name,
                target=self.target.name,
                command=command,
                rule=rule,
                on_requested=requested,
            )
        except StoreError as exc:
            return await self._approval_unavailable(decision, command, asked, str(exc))
        self.recording.marker(outcome.describe())
        self.audit.outcome(
            "command.approval",
            outcome.approved,
            rule=rule.name,
            approval=outcome.approval_id,
            status=outcome.status,
        )
        if outcome.approved:
            await self.audit.settled()
            self.frontend.tell(f"castgate: {outcome.describe()}")
            return ALLOWED
        return await self._refused(
            decision, command, outcome.status, f"castgate: {outcome.describe()}"
        )

    async def _approval_unavailable(
        self, decision: Decision, command: str, asked: list[int], error: str
    ) -> Verdict:
        """Fail closed: without its store an approval can be neither asked for nor
        awaited, so the command is refused like a block."""
        rule = decision.rule_name
        self.recording.marker(f"refused: approval store unavailable (rule {rule})")
        self.audit.failure(
            "command.approval",
            rule=rule,
            approval=asked[0] if asked else None,
            status="store unavailable",
            error=error,
        )
        message = f"castgate: approval store unavailable; command refused (rule {rule})"
        return await self._refused(decision, command, "store unavailable", message)

    async def _refused(
        self, decision: Decision, command: str, status: str, message: str
    ) -> Verdict:
        # The refusal is on record before the client hears of it.
        await self.audit.settled()
        await self.commands.refused(command, decision, status)
        return Verdict(False, status, message)

    # -- end -----------------------------------------------------------------------------

    def seal(self, status: str, info: dict[str, Any], *, index: bool = True) -> bytes:
        """Out of the live view, the cast sealed (``info`` in its end) and its seek index
        started (``index``). Returns output the masker still held, for the client."""
        self.ctx.live.pop(self.id, None)
        self.ctx.hub.close(self.id, status)
        tail = self.recording.close(status, info)
        rec = self.recording.rec
        if self.recording.manifest is not None and rec is not None and index:
            self.ctx.shipping.index_cast(rec.writer.path)
        return tail

    async def end(
        self, status: str, detail: dict[str, Any], *, exit_status: int | None = None
    ) -> None:
        """After ``seal``: the store row ended (with how far the cast got and its
        manifest) and ``session.end`` written (with ``detail``), waited for."""
        ctx = self.ctx
        ctx.audit.forget(self.id)
        ctx.tokens.forget(self.id)
        await ctx.shipping.end_session(
            self.id, self.recording.rec, status=status, exit_status=exit_status
        )
        self.audit.outcome("session.end", status == "closed", status=status, **detail)
        await self.audit.settled()
