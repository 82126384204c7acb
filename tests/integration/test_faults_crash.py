"""The relay SIGKILLed with SSH and PostgreSQL sessions open and an SSH command held for
approval: every cast verifies up to its last fsync, and at restart the crashed casts are
recovered (sealed, truncated-but-authentic), the sessions are interrupted and the held
approval is listed as interrupted with its history intact. Checked through the CLI."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import psycopg

from recorder.integrity import manifest_path
from recorder.recovery import REASON
from recorder.store import Store
from tests.fix_pg_relay import APP_PASSWORD, PG_TARGETS, PgRelay
from tests.fix_relay import TOKENS, Held, Relay, Streamer, launch, start_relay, wait_for
from tests.fix_sshd import SshTarget

HOLD_RULE = """
[[rules]]
name = "deploy-needs-two"
command = '^deploy-now'
action = "approve"
approvers = ["sre"]
min_approvals = 2
timeout = "30m"
"""


def store_of(relay: Relay) -> Store:
    return Store.open(f"sqlite:///{relay.workdir / 'data' / 'castgate.db'}")


def cli_json(relay: Relay, *args: str) -> Any:
    res = relay.castgate(*args, "--json", "--token", TOKENS["alice"])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def verify_lines(relay: Relay) -> tuple[int, dict[str, str]]:
    """``castgate verify -c CFG recordings/``: exit status and each cast's line."""
    res = relay.castgate("verify", str(relay.recordings()))
    assert res.returncode in (0, 1), res.stdout + res.stderr
    by_cast = {}
    for line in res.stdout.splitlines():
        path, _, rest = line.partition(": ")
        by_cast[Path(path).stem] = rest
    return res.returncode, by_cast


def test_relay_killed_mid_session_recovers_at_restart(
    pg_relay: PgRelay, sshd_target: SshTarget, tmp_path: Path
) -> None:
    # Two approvers and a long timeout: the request is still pending when the relay dies,
    # however slow the machine.
    extra = PG_TARGETS.format(port=pg_relay.server.port) + HOLD_RULE
    relay = start_relay(
        tmp_path / "r", sshd_target, extra=extra, env={"APPDB_PASSWORD": APP_PASSWORD}
    )
    marker = secrets.token_hex(6)
    streamer = Streamer(relay, marker)
    held = Held(relay, "deploy-now app")
    pg = psycopg.connect(relay.pg_dsn(), autocommit=True)
    try:
        aid = held.approval_id()
        decided = relay.castgate("approve", str(aid), "--token", TOKENS["alice"])
        assert decided.returncode == 0 and "pending" in decided.stdout, decided.stdout
        assert pg.execute(f"SELECT 'pg-{marker}'").fetchone() == (f"pg-{marker}",)
        pg.execute("SELECT pan FROM cards ORDER BY id").fetchall()
        live = {s["id"]: s for s in cli_json(relay, "sessions", "--live")}
        assert {s["protocol"] for s in live.values()} == {"ssh", "postgres"} and len(live) == 3
        # Let every session reach a checkpoint; the streamer keeps writing after it.
        with store_of(relay) as store:

            def checkpointed() -> bool:
                return all(store.latest_checkpoint(sid) is not None for sid in live)

            wait_for(checkpointed, 20)
        seen = streamer.ticks
        wait_for(lambda: streamer.ticks > seen + 10, 20)

        relay.proc.kill()  # SIGKILL: nothing is flushed, sealed or closed
        relay.proc.wait(10)
        assert relay.proc.returncode == -9
    finally:
        pg.close()
        streamer.finish()
        held.finish()

    # Before restart: unsealed casts, authentic up to the last fsync per the store.
    code, before = verify_lines(relay)
    assert code == 1 and set(before) == set(live), before
    for line in before.values():
        assert line.startswith(("UNSEALED: ", "TRUNCATED: ")), line
        assert "authentic up to the last fsync: lines 1-" in line, line
    with store_of(relay) as store:
        checkpoints = {sid: store.latest_checkpoint(sid) for sid in live}

    relay = launch(relay)
    try:
        # Restart: the casts were sealed before the relay listened.
        code, after = verify_lines(relay)
        # Exit 1 (truncated, DESIGN.md's contract), every recovered cast authentic.
        assert code == 1 and set(after) == set(live), after
        sessions = {s["id"]: s for s in cli_json(relay, "sessions")}
        for sid, line in after.items():
            assert line.startswith("TRUNCATED-AUTHENTIC: "), line
            manifest = json.loads(manifest_path(relay.recordings() / f"{sid}.cast").read_text())
            lines, kept = manifest["lines"], manifest["recovered"]["checkpoint_lines"]
            assert manifest["end_reason"].startswith(REASON)
            assert f"{lines} lines kept" in manifest["end_reason"]
            cp = checkpoints[sid]
            assert cp is not None and kept == cp["lines"] and lines >= kept
            assert manifest["recovered"]["checkpoint_hash"] == cp["chain_hash"]
            assert sessions[sid]["status"] == "interrupted", sessions[sid]
            assert sessions[sid]["ended_at"] is not None
        assert not cli_json(relay, "sessions", "--live")
        # The streaming session kept the ticks written after its last checkpoint.
        ssh_sid = next(
            sid for sid, s in live.items() if s["protocol"] == "ssh" and "tick" in str(s["title"])
        )
        cast = (relay.recordings() / f"{ssh_sid}.cast").read_text()
        assert cast.count(f"tick-{marker}") >= 10
        assert json.loads(cast.splitlines()[-1])[1] == "o"

        approvals = {a["id"]: a for a in cli_json(relay, "approvals", "--all")}
        approval = approvals[aid]
        assert approval["status"] == "interrupted" and approval["reason"] == "relay restarted"
        assert approval["command"] == "deploy-now app" and approval["rule"] == "deploy-needs-two"
        assert [(d["approver"], d["decision"]) for d in approval["decisions"]] == [
            ("alice", "approve")
        ]
        with store_of(relay) as store:
            recovered = store.list_events(kind="recording.recovered")
            assert {e["session_id"] for e in recovered} == set(live)
            assert all(e["outcome"] == "success" for e in recovered)
            assert store.get_manifest(ssh_sid) is not None

        # The restarted relay serves new sessions; a second start recovers nothing more.
        res = relay.ssh("web", "echo after-restart")
        assert res.returncode == 0 and res.stdout == b"after-restart\n", res.stderr
        assert relay.stop() == 0
        relay = launch(relay)
        assert not [e for e in relay.logs if e.get("msg") == "relay.recovered_casts"]
        code, again = verify_lines(relay)
        assert code == 1 and all(
            re.match(r"(INTACT|TRUNCATED-AUTHENTIC): ", line) for line in again.values()
        ), again
    finally:
        relay.stop()
