"""Protocol-neutral identity helpers (relay/tokens.py, the session core): OIDC
attributes on sessions and their events, credential-use events, exchanged tokens and
token lifetime (a real store, a real config, a real event loop)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from recorder.config import parse_config
from recorder.signing import SigningKey
from recorder.store import Store
from relay.context import RelayContext
from relay.identity import AuthError, Identity
from relay.policy import Decision
from relay.session_core import SessionCore
from relay.tokens import identity_detail, token_deadline
from tests.fix_oidc import Issuer


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[RelayContext]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "web_key").write_bytes(key.export_private_key())
    text = """
data_dir = "data"
[oidc]
issuer = "https://idp.example"
audience = "castgate"
jwks = "file:jwks.json"
[[targets]]
name = "web"
kind = "ssh"
address = "127.0.0.1:22"
key_file = "web_key"
[[targets]]
name = "appdb"
kind = "postgres"
address = "127.0.0.1:5432"
password_env = "APPDB_PASSWORD"
[[targets]]
name = "trusted"
kind = "postgres"
address = "127.0.0.1:5432"
"""
    (tmp_path / "jwks.json").write_text(json.dumps(Issuer("https://idp.example").jwks()))
    cfg = parse_config(text, tmp_path / "castgate.toml")
    store = Store.open(cfg.store_url())
    context = RelayContext(cfg, store, SigningKey.generate())
    context.fingerprint = key.get_fingerprint()  # type: ignore[attr-defined]
    try:
        yield context
    finally:
        store.close()


class _Client:
    """The protocol side of a session: what it was told and how it was closed."""

    def __init__(self) -> None:
        self.told: list[str] = []
        self.closed: list[str] = []

    def tell(self, text: str) -> None:
        self.told.append(text)

    async def close(self, reason: str) -> None:
        self.closed.append(reason)

    async def opened(self, command: str, kind: str, decision: Decision) -> None:
        pass

    async def refused(self, command: str, decision: Decision, status: str) -> None:
        pass

    def on_lost(self, why: str, *, terminate: bool, at_start: bool) -> None:
        pass


def _core(
    ctx: RelayContext, sid: str, ident: Identity, target: str = "web", client: _Client | None = None
) -> SessionCore:
    found = ctx.policy.target(target)
    assert found is not None
    client = client or _Client()
    return SessionCore(
        ctx,
        session_id=sid,
        ident=ident,
        target=found,
        origin="1.2.3.4:5",
        frontend=client,
        commands=client,
        on_lost=client.on_lost,
    )


def pipeline(expires_in: float = 300.0, leeway: float = 30.0) -> Identity:
    return Identity(
        name="payments-deploy",
        groups=("agents",),
        method="oidc",
        subject="repo:acme/payments:ref:refs/heads/main",
        expires_at=time.time() + expires_in,
        provider="github",
        attributes=(("actor", "octocat"), ("run_id", "55"), ("run_attempt", "2")),
        leeway=leeway,
    )


def test_session_rows_and_events_carry_the_run(ctx: RelayContext) -> None:
    ident = pipeline()
    core = _core(ctx, "s1", ident)
    kwargs = core.attribute()
    assert kwargs["run_id"] == "github:55:2"
    ctx.store.create_session("s1", ident.name, "web", "ssh", **kwargs)

    async def main() -> None:
        await ctx.audit.event(
            "session.start", ident.name, "success", "1.2.3.4:5", "ssh:web", {}, "s1"
        )
        await core.end("closed", {})
        await ctx.audit.event("late", ident.name, "success", None, None, {}, "s1")

    asyncio.run(main())
    row = ctx.store.get_session("s1")
    assert row is not None and row["run_id"] == "github:55:2"
    assert row["attributes"]["attributes"]["actor"] == "octocat"
    start, _end, late = ctx.store.list_events(session_id="s1")
    assert start["detail"]["oidc"]["run_id"] == "github:55:2"
    assert "oidc" not in (late["detail"] or {})  # forgotten once the session ended
    # A key or static-token identity adds nothing.
    plain = Identity(name="ci-agent", groups=("agents",), method="publickey")
    assert _core(ctx, "s2", plain).attribute() == {"attributes": None, "run_id": None}
    assert identity_detail(plain) == {}


def test_credential_use_names_the_credential_never_the_value(
    ctx: RelayContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPDB_PASSWORD", "hunter2-secret")

    async def main() -> None:
        for name in ("web", "appdb", "trusted"):
            _core(ctx, "s9", pipeline(), name).credential_used()
        await ctx.background.drain()

    asyncio.run(main())
    events = ctx.store.list_events(kind="credential.use")
    creds = {e["resource"]: e["detail"]["credential"] for e in events}
    assert set(creds) == {"ssh:web", "postgres:appdb"}  # the trusted target used none
    assert creds["ssh:web"]["fingerprint"] == ctx.fingerprint  # type: ignore[attr-defined]
    assert creds["ssh:web"]["key_file"].endswith("web_key")
    assert creds["postgres:appdb"]["env"] == "APPDB_PASSWORD"
    assert "hunter2-secret" not in repr(events)
    assert all(e["session_id"] == "s9" for e in events)


def test_exchanged_token_stands_for_the_identity_until_it_expires(ctx: RelayContext) -> None:
    ident = pipeline()
    token, deadline = ctx.tokens.exchange(ident)
    assert token.startswith("cgx_") and len(token) < 64
    assert deadline == pytest.approx(ident.expires_at + 30.0)  # type: ignore[operator]
    assert ctx.auth.by_token(token) == ident
    assert ctx.tokens.identity(token) == ident
    # Only the digest is kept.
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert ctx.store.get_exchanged_token(digest) is not None
    with pytest.raises(AuthError, match="unknown or expired"):
        ctx.auth.by_token(token[:-2] + "xx")
    # A token already past its expiry (and leeway) is not stored as usable.
    old = pipeline(expires_in=-60.0, leeway=10.0)
    stale, _ = ctx.tokens.exchange(old)
    with pytest.raises(AuthError, match="unknown or expired"):
        ctx.auth.by_token(stale)
    with pytest.raises(ValueError, match="only an OIDC token"):
        ctx.tokens.exchange(Identity(name="x", groups=(), method="token"))


def test_token_lifetime_helpers(ctx: RelayContext) -> None:
    ident = pipeline(expires_in=-5.0, leeway=30.0)  # expired, but within leeway
    assert ctx.tokens.valid(ident)
    assert not ctx.tokens.valid(ident, now=ident.expires_at + 31)  # type: ignore[operator]
    assert ctx.tokens.valid(Identity(name="k", groups=(), method="publickey"))
    assert token_deadline(Identity(name="k", groups=(), method="publickey")) is None

    async def main() -> str:
        fired = asyncio.Event()
        gone = pipeline(expires_in=-60.0, leeway=10.0)
        handle = ctx.tokens.watch(gone, fired.set)
        assert handle is not None
        await fired.wait()  # already past: called at once
        later = ctx.tokens.watch(pipeline(), lambda: None)
        assert later is not None and later.when() > asyncio.get_running_loop().time() + 200
        later.cancel()
        client = _Client()
        core = _core(ctx, "s3", gone, client=client)
        ran_out = asyncio.Event()
        ctx.tokens.watch_session("s3", gone, ran_out.set)
        await ran_out.wait()
        await core.expire()
        await ctx.background.drain()
        assert client.told == ["castgate: " + client.closed[0]]
        return client.told[0]

    message = asyncio.run(main())
    assert message.startswith("castgate: your token expired at ")
    (event,) = ctx.store.list_events(kind="session.token_expired")
    assert event["session_id"] == "s3" and event["detail"]["provider"] == "github"
