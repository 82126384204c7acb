"""The control API, the operator CLI and the operator SSH entry against a real relay."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import WSMsgType

from recorder.masking import luhn_complete
from relay.api import BODY_MAX, WS_MESSAGE_MAX
from tests.fix_relay import TOKENS, Held, Relay, launch, mint_jwt, start_relay, wait_for
from tests.fix_sshd import SshTarget

VISA = luhn_complete("411111111111111")


def call(
    relay: Relay, path: str, token: str | None = None, method: str = "GET", body: Any = None
) -> tuple[int, Any]:
    req = urllib.request.Request(
        relay.api + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, json.loads(raw) if "json" in ctype else raw
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_tokens_and_roles(relay: Relay) -> None:
    assert call(relay, "/healthz")[0] == 200
    assert call(relay, "/api/v1/sessions")[0] == 401
    assert call(relay, "/api/v1/sessions", "not-a-token")[0] == 401
    # A JWT signed by a key the relay does not trust.
    from tests.fix_relay import write_jwks

    forger = relay.workdir / "forger"
    forger.mkdir(exist_ok=True)
    forged_relay = Relay.__new__(Relay)
    forged_relay.jwt_key = write_jwks(forger)
    assert call(relay, "/api/v1/sessions", mint_jwt(forged_relay, groups=["sre"]))[0] == 401
    # Valid identities without the role.
    status, body = call(relay, "/api/v1/sessions", TOKENS["ci-agent"])
    assert status == 403 and "lacks the role" in body["error"]
    assert call(relay, "/api/v1/approvals/1/approve", TOKENS["ci-agent"], "POST", {})[0] == 403
    # A valid OIDC token from the trusted IdP with the sre group is an auditor.
    assert call(relay, "/api/v1/sessions", mint_jwt(relay, groups=["sre"]))[0] == 200
    assert call(relay, "/metrics", TOKENS["alice"])[0] == 200
    status, doc = call(relay, "/openapi.json")
    assert status == 200 and "/api/v1/approvals/{id}/approve" in doc["paths"]


def test_session_record_and_cast_reads_are_audited(relay: Relay) -> None:
    res = relay.ssh("web", f"echo api-card {VISA}")
    assert res.returncode == 0
    token = TOKENS["alice"]
    sid = None
    for _ in range(100):
        rows = call(relay, "/api/v1/sessions?limit=20", token)[1]["sessions"]
        found = [r for r in rows if "api-card" in (r.get("title") or "") and r["status"] != "live"]
        if found:
            sid = found[0]["id"]
            break
        time.sleep(0.1)
    assert sid is not None
    status, record = call(relay, f"/api/v1/sessions/{sid}", token)
    assert status == 200 and record["session"]["identity"] == "ci-agent"
    assert record["commands"][0]["text"] == f"echo api-card {VISA[:6]}******{VISA[-4:]}"
    status, cast = call(relay, f"/api/v1/sessions/{sid}/cast", token)
    assert status == 200 and VISA not in cast.decode() and b"api-card" in cast
    assert call(relay, "/api/v1/sessions/nope", token)[0] == 404
    assert call(relay, "/api/v1/sessions?limit=abc", token)[0] == 400
    wait_for(
        lambda: any(
            e.get("msg") == "recording.read" and e.get("actor") == "alice" for e in relay.logs
        )
    )
    wait_for(lambda: any(e.get("msg") == "record.read" for e in relay.logs))
    metrics = call(relay, "/metrics", token)[1].decode()
    assert 'castgate_events_total{kind="recording.read",outcome="success"}' in metrics


CASTGATE = str(Path(os.sys.executable).parent / "castgate")


def live_session(relay: Relay, title_part: str) -> str:
    """The id of the live session whose title contains ``title_part``."""
    found: list[str] = []

    def look() -> bool:
        rows = call(relay, "/api/v1/sessions?live=true", TOKENS["alice"])[1]["sessions"]
        found[:] = [r["id"] for r in rows if title_part in (r.get("title") or "")]
        return bool(found)

    wait_for(look, 15)
    return found[0]


def test_cli_approve_releases_the_held_command(relay: Relay) -> None:
    held = Held(relay, "systemctl restart app 2>/dev/null; echo released")
    aid = held.approval_id()
    env = {**os.environ, "CASTGATE_TOKEN": TOKENS["alice"]}
    listed = subprocess.run(
        [str(Path(os.sys.executable).parent / "castgate"), "approvals", "-c", str(relay.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert f"#{aid}" in listed.stdout and "systemctl restart app" in listed.stdout
    shown = subprocess.run(
        [CASTGATE, "approvals", "show", str(aid), "-c", str(relay.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"approval #{aid}  rule ") and "ci-agent@web" in lines[0]
    assert lines[1].startswith("systemctl restart app")
    assert lines[-1].startswith("status pending, ") and lines[-1].endswith("s left")
    as_json = subprocess.run(
        [CASTGATE, "approvals", "show", str(aid), "--json", "-c", str(relay.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert json.loads(as_json.stdout)["id"] == aid
    missing = subprocess.run(
        [CASTGATE, "approvals", "show", "-c", str(relay.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert missing.returncode != 0 and "which request?" in missing.stderr
    decided_at = time.monotonic()
    res = subprocess.run(
        [
            str(Path(os.sys.executable).parent / "castgate"),
            "approve",
            str(aid),
            "-c",
            str(relay.config),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert held.finish() == 0
    assert b"released" in held.out
    # Released by the decision (the time it takes is bench_api's figure, not a test's:
    # on a loaded machine a wall-clock bound only measures the load).
    assert held.first_out is not None and held.first_out > decided_at


def test_self_approval_refused_and_two_approvers_needed(relay: Relay) -> None:
    # alice (an approver) runs a held command herself, with her own key.
    held = Held(relay, "systemctl restart mine; echo mine-ran", key=relay.operator_key)
    aid = held.approval_id()
    status, body = call(relay, f"/api/v1/approvals/{aid}/approve", TOKENS["alice"], "POST", {})
    assert status == 409 and "never approves its own" in body["error"]
    status, body = call(relay, f"/api/v1/approvals/{aid}/approve", TOKENS["bob"], "POST", {})
    assert status == 200 and body["status"] == "approved"
    assert held.finish() == 0 and b"mine-ran" in held.out
    # min_approvals = 2: bob alone is not enough, alice completes it.
    held = Held(relay, "systemctl stop app 2>/dev/null; echo stopped")
    aid = held.approval_id()
    status, body = call(
        relay, f"/api/v1/approvals/{aid}/approve", TOKENS["bob"], "POST", {"reason": "ok"}
    )
    assert status == 200 and body["status"] == "pending"
    assert call(relay, f"/api/v1/approvals/{aid}/approve", TOKENS["bob"], "POST", {})[0] == 409
    status, body = call(relay, f"/api/v1/approvals/{aid}/approve", TOKENS["alice"], "POST", {})
    assert status == 200 and body["status"] == "approved"
    assert held.finish() == 0 and b"stopped" in held.out
    assert b"granted by" in held.err


def test_deny_without_reason_is_refused_and_with_reason_reaches_the_agent(relay: Relay) -> None:
    held = Held(relay, "systemctl restart app; echo ran")
    aid = held.approval_id()
    assert call(relay, f"/api/v1/approvals/{aid}/deny", TOKENS["bob"], "POST", {})[0] == 400
    status, _ = call(
        relay, f"/api/v1/approvals/{aid}/deny", TOKENS["bob"], "POST", {"reason": "change freeze"}
    )
    assert status == 200
    assert held.finish() == 126
    assert b"denied by bob: change freeze" in held.err and b"ran" not in held.out


def test_operator_watch_over_ssh_with_openssh(relay: Relay) -> None:
    agent = subprocess.Popen(
        [
            "ssh",
            *relay.ssh_args(),
            "web@127.0.0.1",
            f'for i in $(seq 1 100); do echo "tick $i card {VISA}"; sleep 0.1; done',
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sid = live_session(relay, "tick")
        watcher = subprocess.Popen(
            ["ssh", "-tt", *relay.ssh_args(relay.operator_key), "castgate@127.0.0.1", "watch", sid],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert watcher.stdout is not None and watcher.stdin is not None
        seen = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and seen.count(b"tick") < 5:
            seen += watcher.stdout.read1(4096)  # type: ignore[attr-defined]
        watcher.stdin.write(b"q")
        watcher.stdin.flush()
        watcher.wait(15)
        watcher.stdout.close()
        watcher.stdin.close()
        assert seen.count(b"tick") >= 5
        assert f"card {VISA[:6]}******{VISA[-4:]}".encode() in seen and VISA.encode() not in seen
        # An agent identity cannot use the operator entry.
        res = subprocess.run(
            [
                "ssh",
                *relay.ssh_args()[:-2],
                "castgate@127.0.0.1",
                "sessions",
            ],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode != 0 and b"no operator role" in res.stderr
    finally:
        agent.kill()
        agent.wait()


def test_api_websocket_watch_with_the_cli(relay: Relay) -> None:
    agent = subprocess.Popen(
        [
            "ssh",
            *relay.ssh_args(),
            "web@127.0.0.1",
            f'for i in $(seq 1 60); do echo "wsline $i {VISA}"; sleep 0.05; done',
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        token = TOKENS["alice"]
        sid = live_session(relay, "wsline")
        res = subprocess.run(
            [
                str(Path(os.sys.executable).parent / "castgate"),
                "watch",
                sid,
                "-c",
                str(relay.config),
                "--token",
                token,
            ],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 0, res.stderr
        assert b"wsline" in res.stdout and VISA.encode() not in res.stdout
        assert b"session ended" in res.stdout
    finally:
        agent.wait(30)


def test_restart_with_pending_approval_lists_it_as_interrupted(
    sshd_target: SshTarget, tmp_path: Path
) -> None:
    relay = start_relay(tmp_path / "r", sshd_target)
    held = Held(relay, "systemctl restart app")
    aid = held.approval_id()
    relay.proc.kill()  # SIGKILL: no chance to clean up
    relay.proc.wait(10)
    held.finish()
    relay2 = launch(relay)
    try:
        status, row = call(relay2, f"/api/v1/approvals/{aid}", TOKENS["alice"])
        assert status == 200 and row["status"] == "interrupted"
        assert row["command"] == "systemctl restart app" and row["rule"] == "restart-needs-approval"
        sessions = call(relay2, "/api/v1/sessions", TOKENS["alice"])[1]["sessions"]
        assert any(s["status"] == "interrupted" for s in sessions)
    finally:
        relay2.stop()


def test_failed_logins_lock_the_address_out(sshd_target: SshTarget, tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "r", sshd_target, auth_limit=3)
    try:
        for _ in range(3):
            assert call(relay, "/api/v1/sessions", "wrong-token")[0] == 401
        status, body = call(relay, "/api/v1/sessions", TOKENS["alice"])
        assert status == 429 and "too many" in body["error"]
        # The SSH listener shares the lockout: even the right key is refused now.
        res = relay.ssh("web", "echo locked-out")
        assert res.returncode == 255 and b"locked-out" not in res.stdout
        with pytest.raises(psycopg.OperationalError, match="too many failed"):
            psycopg.connect(relay.pg_dsn())
    finally:
        relay.stop()
    wait_for(lambda: any("too many failed attempts" in str(e.get("reason")) for e in relay.logs))


@pytest.mark.parametrize("size", [BODY_MAX, BODY_MAX + 1], ids=["at-limit", "past-limit"])
def test_request_bodies_are_bounded(relay: Relay, size: int) -> None:
    req = urllib.request.Request(
        relay.api + "/api/v1/approvals/999999/deny",
        method="POST",
        data=b'{"reason": "' + b"x" * (size - 14) + b'"}',
        headers={"Authorization": f"Bearer {TOKENS['alice']}", "Content-Type": "application/json"},
    )
    assert len(req.data) == size  # type: ignore[arg-type]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=15)
    err.value.close()
    # At the limit the body is read and the request judged (no such approval); past it
    # the relay refuses to read it.
    assert err.value.code == (404 if size == BODY_MAX else 413)
    res = call(relay, "/healthz")
    assert res[0] == 200


def test_websocket_messages_from_a_watcher_are_bounded(relay: Relay) -> None:
    agent = subprocess.Popen(
        # ``cat`` ends with the channel (its stdin closes); a ``sleep`` on the target
        # outlived the test.
        ["ssh", *relay.ssh_args(), "web@127.0.0.1", "echo wsbound-start; exec cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sid = live_session(relay, "wsbound")

        async def watch() -> tuple[str, int | None, str, int | None]:
            url = f"{relay.api}/api/v1/sessions/{sid}/live"
            headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(url, headers=headers) as ws:
                    await ws.receive(timeout=60)  # the first frame: the session as it stands
                    await ws.send_str("x" * WS_MESSAGE_MAX)
                    await ws.ping()
                    # Still open after a message at the limit: a pong comes back.
                    pong = await ws.receive(timeout=60)
                    at = (str(pong.type), ws.close_code)
                async with http.ws_connect(url, headers=headers) as ws:
                    await ws.receive(timeout=60)
                    await ws.send_str("x" * (WS_MESSAGE_MAX + 1))
                    msg = await ws.receive(timeout=60)
                    while msg.type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
                        msg = await ws.receive(timeout=60)
                    return at[0], at[1], str(msg.type), ws.close_code

        at_type, at_code, past_type, past_code = asyncio.run(watch())
        assert at_code is None, at_type
        assert past_code == 1009, past_type  # "message too big"
    finally:
        agent.kill()
        agent.wait(30)
        assert agent.stdin is not None
        agent.stdin.close()
