"""The session core (relay/session_core.py) without sockets: a real CastWriter in
tmp_path, the real SQLite store, the real Broker. The protocol side is a small
Frontend/CommandLog that keeps what the client would have been told."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recorder.config import parse_config
from recorder.integrity import Verdict as Seal
from recorder.integrity import verify_cast
from recorder.recording import DiscardWriter
from recorder.signing import SigningKey
from recorder.store import Store
from relay.context import RelayContext, new_session_id
from relay.identity import Identity
from relay.policy import Decision
from relay.session_core import SessionCore
from relay.session_recording import CastSpec

CONFIG = """
data_dir = "data"
[recording]
on_failure = "{on_failure}"
[[identities]]
name = "alice"
groups = ["sre"]
[roles]
approver = ["sre"]
[[targets]]
name = "web"
kind = "ssh"
address = "127.0.0.1:22"
groups = ["agents"]
opaque = "block"
[[rules]]
name = "no-rm"
command = "^rm"
action = "block"
[[rules]]
name = "restart"
command = "^systemctl restart"
action = "approve"
timeout = "5m"
"""


class Client:
    """The protocol side: what the client was told, the commands logged, closes."""

    def __init__(self) -> None:
        self.told: list[str] = []
        self.lost: list[tuple[str, bool, bool]] = []
        self.closed: list[str] = []
        self.logged: list[tuple[str, str, str | None]] = []
        self.told_event = asyncio.Event()

    def tell(self, text: str) -> None:
        self.told.append(text)
        self.told_event.set()

    async def close(self, reason: str) -> None:
        self.closed.append(reason)

    async def opened(self, command: str, kind: str, decision: Decision) -> None:
        self.logged.append(("opened", command, decision.action))

    async def refused(self, command: str, decision: Decision, status: str) -> None:
        self.logged.append(("refused", command, status))

    def on_lost(self, why: str, *, terminate: bool, at_start: bool) -> None:
        self.lost.append((why, terminate, at_start))


def _context(tmp_path: Path, on_failure: str = "terminate") -> RelayContext:
    cfg = parse_config(CONFIG.format(on_failure=on_failure), tmp_path / "castgate.toml")
    return RelayContext(cfg, Store.open(cfg.store_url()), SigningKey.generate())


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[RelayContext]:
    context = _context(tmp_path)
    try:
        yield context
    finally:
        context.store.close()


AGENT = Identity(name="ci-agent", groups=("agents",), method="publickey")


def _core(ctx: RelayContext, client: Client, ident: Identity = AGENT) -> SessionCore:
    target = ctx.policy.target("web")
    assert target is not None
    return SessionCore(
        ctx,
        session_id=new_session_id(),
        ident=ident,
        target=target,
        origin="192.0.2.7:5000",
        frontend=client,
        commands=client,
        on_lost=client.on_lost,
    )


def _open(core: SessionCore) -> str | None:
    who = {"identity": core.ident.name, "target": core.target.name, "protocol": "test"}
    spec = CastSpec("a test", 80, 24, {"TERM": "dumb"}, who, who, "commands", 0.0)
    return core.recording.open(spec)


def _markers(path: Path) -> list[str]:
    lines = path.read_text().splitlines()[1:]
    return [e[2] for e in map(json.loads, lines) if isinstance(e, list) and e[1] == "m"]


def _kinds(ctx: RelayContext, sid: str) -> list[str]:
    return [e["kind"] for e in ctx.store.list_events(session_id=sid)]


def test_a_session_starts_records_and_ends_sealed_with_its_events_in_order(
    ctx: RelayContext,
) -> None:
    client = Client()

    async def main() -> SessionCore:
        core = _core(ctx, client)
        assert _open(core) is None
        assert await core.start(protocol="ssh", title="t", failure=None, kind="shell")
        assert ctx.live[core.id] is core
        core.recording.safe(lambda rec: rec.output(b"hello\r\n"))
        core.seal("closed", {"identity": "ci-agent"})
        assert core.id not in ctx.live
        await core.end("closed", {"exit_status": 0})
        return core

    core = asyncio.run(main())
    row = ctx.store.get_session(core.id)
    assert row is not None and row["status"] == "closed" and row["ended_at"] is not None
    # session.end was awaited (settled): no drain needed to see it.
    assert _kinds(ctx, core.id) == ["session.start", "session.end"]
    assert verify_cast(core.recording.path).verdict == Seal.INTACT


def test_a_block_is_marked_audited_and_logged_before_the_verdict_returns(
    ctx: RelayContext,
) -> None:
    client = Client()

    async def main() -> tuple[SessionCore, Any]:
        core = _core(ctx, client)
        _open(core)
        await core.start(protocol="ssh", title="t", failure=None)
        decision = ctx.policy.decide_shell(target="web", groups=AGENT.groups, command="rm -r x")
        verdict = await core.enforce(decision, "rm -r x", "shell")
        # On record when the verdict comes back, not some time later.
        blocked = ctx.store.list_events(kind="command.blocked")
        return core, (verdict, blocked)

    core, (verdict, blocked) = asyncio.run(main())
    assert not verdict.allowed and verdict.status == "blocked"
    assert verdict.message == "castgate: blocked by rule no-rm"
    assert [e["detail"] for e in blocked] == [{"rule": "no-rm", "command": "rm -r x"}]
    assert blocked[0]["actor"] == "ci-agent" and blocked[0]["resource"] == "ssh:web"
    assert client.logged == [("opened", "rm -r x", "block"), ("refused", "rm -r x", "blocked")]
    assert client.told == []  # the protocol shows the verdict its own way
    core.recording.rec.writer.sync()  # type: ignore[union-attr]
    assert _markers(core.recording.path) == ["blocked: no-rm"]


def test_an_opaque_decision_names_its_reason(ctx: RelayContext) -> None:
    client = Client()

    async def main() -> Any:
        core = _core(ctx, client)
        _open(core)
        return await core.enforce(core.opaque("cannot be parsed"), "x <<", "shell")

    verdict = asyncio.run(main())
    assert verdict.message == "castgate: blocked by rule castgate:opaque (cannot be parsed)"


def test_a_held_command_waits_for_the_broker_and_runs_once_approved(ctx: RelayContext) -> None:
    client = Client()

    async def main() -> tuple[SessionCore, Any]:
        core = _core(ctx, client)
        _open(core)
        await core.start(protocol="ssh", title="t", failure=None)
        decision = ctx.policy.decide_shell(
            target="web", groups=AGENT.groups, command="systemctl restart x"
        )
        held = asyncio.ensure_future(core.enforce(decision, "systemctl restart x", "shell"))
        await client.told_event.wait()  # the approval was asked
        (pending,) = ctx.store.list_approvals(status="pending")
        await ctx.broker.decide(
            pending["id"], approver="alice", approve=True, reason=None, origin="test"
        )
        return core, await held

    core, verdict = asyncio.run(main())
    assert verdict.allowed
    assert client.told[0].startswith("castgate: approval #") and "(rule restart)" in client.told[0]
    assert client.told[1].endswith("granted by alice")
    (event,) = ctx.store.list_events(kind="command.approval")
    assert event["outcome"] == "success" and event["detail"]["status"] == "approved"
    core.recording.rec.writer.sync()  # type: ignore[union-attr]
    markers = _markers(core.recording.path)
    assert markers[0].endswith("requested (rule restart)") and "granted by alice" in markers[1]


@pytest.mark.parametrize(
    ("on_failure", "action", "terminate"),
    [("terminate", "refused", True), ("continue", "continued", False)],
)
def test_a_cast_that_cannot_be_opened_applies_on_failure_once(
    tmp_path: Path, on_failure: str, action: str, terminate: bool
) -> None:
    ctx = _context(tmp_path, on_failure)
    # The recordings directory is a file: the cast cannot be created.
    ctx.cfg.recordings_dir.parent.mkdir(parents=True, exist_ok=True)
    ctx.cfg.recordings_dir.write_text("")
    client = Client()

    async def main() -> tuple[SessionCore, bool]:
        core = _core(ctx, client)
        failure = _open(core)
        assert failure is not None
        started = await core.start(protocol="ssh", title="t", failure=failure)
        core.recording.fail("later: again")  # once only
        await ctx.background.drain()
        return core, started

    try:
        core, started = asyncio.run(main())
        assert started is not terminate
        assert (core.id in ctx.live) is not terminate
        assert len(client.lost) == 1 and client.lost[0][1:] == (terminate, True)
        assert isinstance(core.recording.rec.writer, DiscardWriter)  # type: ignore[union-attr]
        (event,) = ctx.store.list_events(kind="recording.failed")
        assert event["detail"]["action"] == action and event["session_id"] == core.id
        assert ctx.audit.recording_failures[action] == 1
    finally:
        ctx.store.close()


def test_a_token_that_ran_out_before_the_start_ends_the_session_at_once(
    ctx: RelayContext,
) -> None:
    client = Client()
    gone = Identity(
        name="payments-deploy",
        groups=("agents",),
        method="oidc",
        subject="repo:acme/payments",
        expires_at=time.time() - 60,
        provider="github",
        leeway=10.0,
    )

    async def main() -> SessionCore:
        core = _core(ctx, client, gone)
        _open(core)
        # The watch start() arms fires while the row is written: before it is live.
        await core.start(protocol="ssh", title="t", failure=None)
        await ctx.background.drain()
        return core

    core = asyncio.run(main())
    assert len(client.closed) == 1 and client.closed[0].startswith("your token expired at ")
    assert client.told == ["castgate: " + client.closed[0]]
    kinds = _kinds(ctx, core.id)
    assert kinds.index("session.start") < kinds.index("session.token_expired")


def test_bound_audit_keeps_its_order_and_takes_any_detail_name(ctx: RelayContext) -> None:
    async def main() -> None:
        audit = ctx.audit.bind(actor="a", origin="o", resource="r")
        for n in range(20):
            audit.success("step", kind=n, outcome="x")
        await audit.settled()

    asyncio.run(main())
    events = ctx.store.list_events(kind="step")
    assert sorted(e["detail"]["kind"] for e in events) == list(range(20))
    by_id = sorted(events, key=lambda e: e["id"])
    assert [e["detail"]["kind"] for e in by_id] == list(range(20))
    assert all(e["outcome"] == "success" and e["detail"]["outcome"] == "x" for e in events)
