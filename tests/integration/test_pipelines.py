"""CI/CD pipelines through the relay: GitHub Actions and GitLab CI id-tokens (their real
claim sets, signed by test issuers whose JWKS is served over HTTPS), a people IdP beside
them, real ``ssh``, ``git push`` and ``psql``; pipeline runs kept apart, listed by
``castgate runs`` and bundled by ``castgate evidence --run`` (verified offline)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import psycopg
import pytest

from recorder.config import load_config
from recorder.store import Store
from tests.fix_oidc import GITHUB_ISSUER, Issuer, JwksServer, github_claims, gitlab_claims
from tests.fix_pg_relay import APP_PASSWORD, PANS, PG_TARGETS, _prepare_app_db
from tests.fix_postgres import PostgresServer
from tests.fix_relay import CASTGATE, TOKENS, Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget

pytestmark = pytest.mark.postgres

PEOPLE = "https://idp.corp.test"
GITLAB = "https://gitlab.example.com"
RUN_A = "github:7001:1"
RUN_B = "github:7002:1"
STRIPE = "sk_live_" + "Ab3dEf6hIj9lMn2pQr5tUv8x"


@dataclass
class Pipelines:
    relay: Relay
    jwks: JwksServer
    askpass: Path
    workdir: Path

    def env(self, token: str) -> dict[str, str]:
        """What a pipeline step has: its token in the environment, an askpass that
        hands it to ssh (as assets/ci does)."""
        return {
            **os.environ,
            "CASTGATE_TOKEN": token,
            "SSH_ASKPASS": str(self.askpass),
            "SSH_ASKPASS_REQUIRE": "force",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "pipeline",
            "GIT_AUTHOR_EMAIL": "ci@example.com",
            "GIT_COMMITTER_NAME": "pipeline",
            "GIT_COMMITTER_EMAIL": "ci@example.com",
        }

    def ssh_args(self) -> list[str]:
        return [
            "-p",
            str(self.relay.port),
            "-o",
            f"UserKnownHostsFile={self.relay.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=keyboard-interactive,password",
            "-o",
            "NumberOfPasswordPrompts=1",
            "-o",
            "LogLevel=ERROR",
        ]

    def ssh(self, token: str, target: str, command: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ssh", *self.ssh_args(), f"{target}@127.0.0.1", command],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=self.env(token),
        )

    def psql(self, token: str, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        dsn = (
            f"host=127.0.0.1 port={self.relay.pg_port} dbname=appdb user={user} "
            "sslmode=disable connect_timeout=10"
        )
        return subprocess.run(
            ["psql", dsn, "-X", *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env={**self.env(token), "PGPASSWORD": token},
        )

    def exchange(self, token: str) -> subprocess.CompletedProcess[str]:
        """What a pipeline step does for ssh and git (assets/ci): trade the id-token,
        too long for an OpenSSH password, for a short castgate token, with curl."""
        return subprocess.run(
            [
                "curl", "-sS", "--fail-with-body", "-X", "POST",
                "-H", f"Authorization: Bearer {token}",
                f"{self.relay.api}/api/v1/token/exchange",
            ],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def short(self, token: str) -> str:
        res = self.exchange(token)
        assert res.returncode == 0, res.stdout + res.stderr
        short: str = json.loads(res.stdout)["token"]
        assert short.startswith("cgx_") and len(short) < 100
        return short

    def store(self) -> Store:
        return Store.open(load_config(self.relay.config).store_url())


@pytest.fixture(scope="module")
def pipes(
    sshd_target: SshTarget,
    postgres_server: PostgresServer,
    jwks_server_module: JwksServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipelines]:
    jwks = jwks_server_module
    people, github, gitlab = Issuer(PEOPLE), Issuer(GITHUB_ISSUER), Issuer(GITLAB)
    oidc = f"""
[[oidc.providers]]
name = "corp"
issuer = "{PEOPLE}"
audience = "castgate"
jwks = "{jwks.add("corp", people)}"
jwks_ca_file = "{jwks.ca}"
groups_claim = "groups"
[[oidc.providers]]
name = "github"
issuer = "{GITHUB_ISSUER}"
audience = "castgate"
jwks = "{jwks.add("github", github)}"
jwks_ca_file = "{jwks.ca}"
[[oidc.providers]]
name = "gitlab"
issuer = "{GITLAB}"
audience = "castgate"
jwks = "{jwks.add("gitlab", gitlab)}"
jwks_ca_file = "{jwks.ca}"
groups_claim = "groups_direct"
"""
    extra = (
        PG_TARGETS.format(port=postgres_server.port)
        + """
[[identities]]
name = "payments-deploy"
groups = ["agents"]
oidc = { provider = "github", bound_claims = { repository = "acme/payments", ref = "refs/heads/main" } }
[[identities]]
name = "ledger-ci"
groups = ["agents"]
oidc = { provider = "gitlab", bound_claims = { project_path = "acme/ledger", ref = "main" } }
"""
    )
    _prepare_app_db(postgres_server)
    workdir = tmp_path_factory.mktemp("pipelines")
    relay = start_relay(
        workdir / "relay", sshd_target, extra=extra, env={"APPDB_PASSWORD": APP_PASSWORD}, oidc=oidc
    )
    # The askpass script the pipelines of assets/ci use.
    askpass = Path(__file__).resolve().parents[2] / "assets" / "ci" / "castgate-askpass.sh"
    try:
        yield Pipelines(relay, jwks, askpass, workdir)
    finally:
        relay.stop()


def _runs(pipes: Pipelines) -> list[dict[str, Any]]:
    res = pipes.relay.castgate("runs", "--json", "--token", TOKENS["alice"])
    assert res.returncode == 0, res.stderr
    runs: list[dict[str, Any]] = json.loads(res.stdout)
    return runs


def _ended(pipes: Pipelines, run_id: str, sessions: int) -> dict[str, Any] | None:
    for run in _runs(pipes):
        if run["run_id"] == run_id and run["sessions"] == sessions and run["live"] == 0:
            return run
    return None


def _git_push(pipes: Pipelines, token: str, repo: Path, work: Path) -> bytes:
    """Clone and push through the relay; the push waits for alice's approval."""
    env = {**pipes.env(token), "GIT_SSH_COMMAND": " ".join(["ssh", *pipes.ssh_args()])}
    url = f"ssh://gitsrv@127.0.0.1:{pipes.relay.port}{repo}"
    res = subprocess.run(["git", "clone", "-q", url, str(work)], env=env, capture_output=True)
    assert res.returncode == 0, res.stderr
    (work / "deploy.txt").write_text("release 42\n")
    subprocess.run(["git", "-C", str(work), "add", "."], env=env, check=True)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "deploy 42"], env=env, check=True)
    push = subprocess.Popen(
        ["git", "-C", str(work), "push", "-q", "origin", "HEAD"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert push.stderr is not None
    err = push.stderr
    seen: list[bytes] = []
    t = threading.Thread(target=lambda: seen.extend(iter(lambda: err.read1(4096), b"")))
    t.start()
    wait_for(lambda: b"required" in b"".join(seen), 30)
    m = re.search(rb"approval #(\d+) required", b"".join(seen))
    assert m is not None, b"".join(seen)
    ok = pipes.relay.castgate(
        "approve",
        m.group(1).decode(),
        "--reason",
        "release 42 reviewed",
        "--token",
        TOKENS["alice"],
    )
    assert ok.returncode == 0, ok.stderr
    assert push.wait(60) == 0, b"".join(seen)
    t.join(10)
    err.close()
    return m.group(1)


def test_people_and_pipelines_through_one_relay(
    pipes: Pipelines, git_bare_repo: Path, tmp_path: Path
) -> None:
    github = pipes.jwks.issuers["github"]
    run_a_jwt = github.mint(github_claims(run_id="7001"))
    assert len(run_a_jwt) > 1023  # more than OpenSSH sends as a password
    run_a = pipes.short(run_a_jwt)
    run_b = pipes.short(github.mint(github_claims(run_id="7002", actor="hubot")))

    # Run A: ssh, git clone + push (approved by a person), psql.
    res = pipes.ssh(run_a, "web", f"echo deploy-step-1; printf 'sk_live_%s\\n' {STRIPE[8:]}")
    assert res.returncode == 0, res.stderr
    assert b"deploy-step-1" in res.stdout
    assert STRIPE.encode() not in res.stdout  # the custom secret pattern, masked
    approval = _git_push(pipes, run_a, git_bare_repo, tmp_path / "work")
    # psql takes the id-token itself (libpq has no length limit); same identity, same run.
    q = pipes.psql(run_a_jwt, "payments-deploy", "-c", "SELECT pan FROM cards ORDER BY id")
    assert q.returncode == 0, q.stderr
    assert all(pan not in q.stdout for pan in PANS)
    assert "411111******1111" in q.stdout
    drop = pipes.psql(run_a, "payments-deploy", "-c", "DROP DATABASE app")
    assert drop.returncode != 0 and "no-drop-database" in drop.stderr

    # Run B of the same workflow, another actor: kept apart.
    res = pipes.ssh(run_b, "web", "echo deploy-step-b")
    assert res.returncode == 0 and b"deploy-step-b" in res.stdout, res.stderr

    # A person from the people IdP, groups from its claim: no run.
    person = pipes.short(
        pipes.jwks.issuers["corp"].mint(
            {"sub": "u-17", "preferred_username": "carol", "groups": ["sre"]}
        )
    )
    res = pipes.ssh(person, "web", "echo person-here")
    assert res.returncode == 0 and b"person-here" in res.stdout, res.stderr

    wait_for(lambda: _ended(pipes, RUN_A, 5) is not None, 30)
    wait_for(lambda: _ended(pipes, RUN_B, 1) is not None, 30)
    runs = {r["run_id"]: r for r in _runs(pipes) if r["run_id"] in (RUN_A, RUN_B)}
    a, b = runs[RUN_A], runs[RUN_B]
    assert (a["provider"], a["initiator"], a["repository"], a["ref"]) == (
        "github",
        "octocat",
        "acme/payments",
        "refs/heads/main",
    )
    assert a["sha"] == github_claims()["sha"]
    assert a["identities"] == ["payments-deploy"] and a["targets"] == ["appdb", "gitsrv", "web"]
    assert (a["blocked"], a["approvals"]) == (1, 1)
    assert a["masking_counts"]["pan"] >= len(PANS) and a["masking_counts"]["stripe-key"] == 1
    assert (b["initiator"], b["sessions"], b["blocked"], b["approvals"]) == ("hubot", 1, 0, 0)
    assert not set(a["session_ids"]) & set(b["session_ids"])
    text = pipes.relay.castgate("runs", "--token", TOKENS["alice"])
    assert text.returncode == 0, text.stderr
    line_a = next(line for line in text.stdout.splitlines() if line.startswith(RUN_A))
    assert "octocat  acme/payments@refs/heads/main" in line_a and "sessions 5" in line_a
    req = urllib.request.Request(
        f"{pipes.relay.api}/api/v1/runs/{RUN_A}",
        headers={"Authorization": f"Bearer {TOKENS['alice']}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        one = json.loads(resp.read())
    assert one["run"]["session_ids"] == a["session_ids"]
    assert [r["id"] for r in one["sessions"]] == a["session_ids"]

    with pipes.store() as store:
        person_rows = [r for r in store.list_sessions() if r["identity"] == "carol"]
        assert len(person_rows) == 1 and person_rows[0]["run_id"] is None
        assert person_rows[0]["attributes"]["provider"] == "corp"
        assert person_rows[0]["groups"] == ["sre"]
        rows = store.run_sessions(RUN_A)
        assert {r["protocol"] for r in rows} == {"ssh", "postgres"}
        assert all(r["groups"] == ["agents"] for r in rows)
        sid = rows[0]["id"]
        events = store.list_events(session_id=sid)
        start = next(e for e in events if e["kind"] == "session.start")
        assert start["detail"]["oidc"]["run_id"] == RUN_A
        assert start["detail"]["oidc"]["attributes"]["actor"] == "octocat"
        creds = [e["detail"]["credential"] for r in rows for e in store.list_events(session_id=r["id"]) if e["kind"] == "credential.use"]  # fmt: skip
        auths = [e for e in store.list_events(kind="auth") if e["outcome"] == "success"]
        assert any((e["detail"].get("oidc") or {}).get("run_id") == RUN_A for e in auths)
    web = next(c for c in creds if c["target"] == "web")
    assert web["key_file"] and web["fingerprint"].startswith("SHA256:")
    assert next(c for c in creds if c["target"] == "appdb")["env"] == "APPDB_PASSWORD"
    assert all(APP_PASSWORD not in json.dumps(c) for c in creds)

    # The cast header's castgate object names the run.
    cast = pipes.relay.recordings() / f"{sid}.cast"
    header = json.loads(cast.read_text().splitlines()[0])
    assert header["castgate"]["oidc"]["run_id"] == RUN_A
    assert header["castgate"]["oidc"]["provider"] == "github"

    # Evidence for run A: run-record.json and a timeline, verified offline.
    out = pipes.workdir / "evidence-a"
    res2 = pipes.relay.castgate("evidence", "--run", RUN_A, "-o", str(out))
    assert res2.returncode == 0, res2.stderr
    record = json.loads((out / "run-record.json").read_text())
    assert record["run_id"] == RUN_A and record["initiator"] == "octocat"
    assert [s["id"] for s in record["sessions"]] == a["session_ids"]
    timeline = record["timeline"]
    commands = [e for e in timeline if e["kind"] == "command"]
    texts = [e["text"] for e in commands]
    assert any(t.startswith("echo deploy-step-1") for t in texts)
    assert any(t.startswith("git-receive-pack") for t in texts)
    assert "SELECT pan FROM cards ORDER BY id" in texts
    dropped = next(e for e in commands if e["text"] == "DROP DATABASE app")
    assert (dropped["action"], dropped["rule"]) == ("block", "no-drop-database")
    decision = next(e for e in timeline if e["kind"] == "approval.decision")
    assert decision["approval_id"] == int(approval)
    assert (decision["approver"], decision["decision"]) == ("alice", "approve")
    assert decision["reason"] == "release 42 reviewed"
    assert decision["command"].startswith("git-receive-pack")
    assert all(e["replay"] and "replay.html#t=" in e["replay"] for e in commands)
    assert [e["at"] for e in timeline] == sorted(e["at"] for e in timeline)
    assert {c["target"] for c in record["secrets_read"]["credentials"]} == {
        "web",
        "gitsrv",
        "appdb",
    }
    assert record["secrets_read"]["masked_secret_patterns"] == {"stripe-key": 1}
    # ... and where it was shown: the session, the time and the cast line of the output.
    [where] = record["secrets_read"]["shown_masked"]
    assert (where["detector"], where["count"], where["session"]) == ("stripe-key", 1, sid)
    shown_cast = next((out / "sessions").glob(f"*/{sid}.cast"))
    shown_event = json.loads(shown_cast.read_text().splitlines()[where["line"] - 1])
    assert shown_event[1] == "o" and "*" * len(STRIPE) in shown_event[2]
    assert shown_event[0] == pytest.approx(where["t"], abs=1e-3)
    [shown_entry] = [e for e in timeline if e["kind"] == "secret.shown"]
    assert shown_entry["replay"].endswith(f"#t={round(where['t'], 3)}")
    assert "secret shown to the agent, masked: stripe-key" in (out / "index.html").read_text()
    assert {"8.6.1", "8.6.2", "8.2.1", "7.2.5", "10.2.1", "10.2.2", "6.5.1"} <= set(
        record["pci_dss"]
    )
    assert not any("deploy-step-b" in json.dumps(e) for e in timeline)  # run B is not here
    audit = json.loads((out / "sessions" / sid / "audit-record.json").read_text())
    assert audit["run_id"] == RUN_A
    assert audit["fields"]["oidc"]["value"]["attributes"]["triggering_actor"] == "octocat"
    assert audit["fields"]["oidc"]["pci_dss"] == ["8.2.1", "8.6.1", "10.2.2"]
    assert audit["fields"]["credentials_used"]["pci_dss"] == ["8.6.2", "7.2.5"]
    index = (out / "index.html").read_text()
    assert "Pipeline run github:7001:1" in index and "Timeline" in index
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".html", ".cast"):
            text = f.read_text(errors="replace")
            assert not any(pan in text for pan in PANS), f
            assert STRIPE not in text, f
    ok = subprocess.run(
        [CASTGATE, "verify", str(out)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # And a changed run record is caught.
    (out / "run-record.json").write_text(json.dumps({**record, "initiator": "someone-else"}))
    bad = subprocess.run(
        [CASTGATE, "verify", str(out)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "run-record.json" in bad.stdout + bad.stderr


@pytest.mark.parametrize(
    ("over", "shown"),
    [
        ({"repository": "acme/other"}, "repository='acme/other'"),
        ({"ref": "refs/heads/feature-x"}, "ref='refs/heads/feature-x'"),
    ],
)
def test_token_for_another_repository_or_branch_is_refused(
    pipes: Pipelines, over: dict[str, str], shown: str
) -> None:
    github = pipes.jwks.issuers["github"]
    token = github.mint({**github_claims(run_id="7999"), **over})
    ex = pipes.exchange(token)
    assert ex.returncode != 0 and "no identity bound to these claims" in ex.stdout
    assert "cgx_" not in ex.stdout
    q = pipes.psql(token, "payments-deploy", "-c", "SELECT 1")
    assert q.returncode != 0 and "no identity bound to these claims" in q.stderr
    with pipes.store() as store:
        reasons = [
            str(e["detail"].get("reason"))
            for e in store.list_events(kind="auth")
            if e["outcome"] == "failure"
        ]
    assert sum(1 for r in reasons if "no identity bound" in r and shown in r) >= 2
    # Positive control: the bound repository and branch still work, byte for byte.
    ok = pipes.ssh(
        pipes.short(github.mint(github_claims(run_id="7998"))), "web", "printf 'x\\001y'"
    )
    assert ok.returncode == 0 and ok.stdout == b"x\x01y", ok.stderr


def test_gitlab_pipeline_and_key_rotation(pipes: Pipelines) -> None:
    gitlab = pipes.jwks.issuers["gitlab"]
    res = pipes.ssh(
        pipes.short(gitlab.mint(gitlab_claims(pipeline_id="880"))), "web", "echo gl-880"
    )
    assert res.returncode == 0 and b"gl-880" in res.stdout, res.stderr
    before = pipes.jwks.fetches["gitlab"]
    # The issuer rotates its key (the old one withdrawn): the relay refetches on the
    # new kid and the next job's token works at once.
    gitlab.rotate(drop_old=True)
    q = pipes.psql(gitlab.mint(gitlab_claims(pipeline_id="881")), "ledger-ci", "-c", "SELECT 41+1")
    assert q.returncode == 0 and "42" in q.stdout, q.stderr
    assert pipes.jwks.fetches["gitlab"] == before + 1
    wait_for(lambda: _ended(pipes, "gitlab:881", 1) is not None, 30)
    run = _ended(pipes, "gitlab:881", 1)
    assert run is not None
    assert (run["initiator"], run["repository"], run["ref"]) == ("jdoe", "acme/ledger", "main")
    assert run["identities"] == ["ledger-ci"]
    # groups_direct (GitLab's groups claim lists "sre") granted nothing: the identity's.
    with pipes.store() as store:
        (row,) = store.run_sessions("gitlab:881")
    assert row["groups"] == ["agents"]


def _expiring(pipes: Pipelines, run_id: str, seconds: int) -> str:
    """A GitHub id-token that stays acceptable for about ``seconds`` more: its exp lies
    in the past, inside the provider's 30 s leeway."""
    claims = {**github_claims(run_id=run_id), "exp": int(time.time()) - 30 + seconds}
    return pipes.jwks.issuers["github"].mint(claims)


def _sleeping(server: PostgresServer, needle: str) -> list[tuple[int]]:
    """Backends of the target running a statement with ``needle`` in it."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        return conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = 'app' AND state = 'active' "
            "AND query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{needle}%",),
        ).fetchall()


def test_sessions_end_with_their_token(pipes: Pipelines, postgres_server: PostgresServer) -> None:
    short = pipes.short(_expiring(pipes, "7100", 6))

    async def ssh() -> tuple[str, asyncssh.SSHCompletedProcess, asyncssh.SSHCompletedProcess]:
        async with asyncssh.connect(
            "127.0.0.1",
            pipes.relay.port,
            username="web",
            password=short,
            preferred_auth="password",
            client_keys=None,
            known_hosts=pipes.relay.known_hosts_obj(),
            config=[],
            agent_path=None,
        ) as conn:
            before = await conn.run("printf 'before\\001expiry'", check=False)
            assert before.stdout == "before\x01expiry"  # positive control, byte for byte
            cut = await conn.run("sleep 120; echo never", check=False)
            # A new channel on the same connection after the expiry: refused.
            after = await conn.run("echo after-expiry", check=False)
            return str(before.stdout), cut, after

    _, cut, after = asyncio.run(ssh())
    assert "never" not in str(cut.stdout) and "token expired" in str(cut.stderr)
    assert "after-expiry" not in str(after.stdout) and "token expired" in str(after.stderr)

    jwt = _expiring(pipes, "7101", 6)
    ok = pipes.psql(jwt, "payments-deploy", "-c", "SELECT 'still-valid'")
    assert ok.returncode == 0 and "still-valid" in ok.stdout, ok.stderr
    cut_pg = pipes.psql(jwt, "payments-deploy", "-c", "SELECT pg_sleep(120)")
    # Connected while valid (leeway), cut when the token runs out.
    assert cut_pg.returncode != 0 and "token expired" in cut_pg.stderr, cut_pg.stderr
    # The statement does not outlive its session: the relay cancels it on the target
    # (a closed connection alone would leave the backend sleeping until it next writes).
    wait_for(lambda: not _sleeping(postgres_server, "pg_sleep(120)"), 30)

    wait_for(lambda: _ended(pipes, "github:7100:1", 3) is not None, 30)
    wait_for(lambda: _ended(pipes, "github:7101:1", 2) is not None, 30)
    with pipes.store() as store:
        rows = store.run_sessions("github:7100:1") + store.run_sessions("github:7101:1")
        expired = {
            e["session_id"]
            for r in rows
            for e in store.list_events(session_id=r["id"])
            if e["kind"] == "session.token_expired"
        }
    cut_ids = {r["id"] for r in rows[1:3]} | {rows[-1]["id"]}
    assert cut_ids <= expired and rows[0]["id"] not in expired
    marked = [
        r["id"]
        for r in rows
        if "your token expired" in (pipes.relay.recordings() / f"{r['id']}.cast").read_text()
    ]
    assert set(marked) >= cut_ids


def test_an_idle_ssh_connection_ends_with_its_token(pipes: Pipelines) -> None:
    # No channel at all (what `ssh -N` or a multiplexing master holds): the connection
    # itself is closed once the token is past its expiry.
    short = pipes.short(_expiring(pipes, "7102", 4))
    lost: list[Exception | None] = []

    class Client(asyncssh.SSHClient):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)

    async def idle() -> None:
        conn, _client = await asyncssh.create_connection(
            Client,
            "127.0.0.1",
            pipes.relay.port,
            username="web",
            password=short,
            preferred_auth="password",
            client_keys=None,
            known_hosts=pipes.relay.known_hosts_obj(),
            config=[],
            agent_path=None,
        )
        # (A bound so a relay that never closes fails the test instead of hanging it.)
        await asyncio.wait_for(conn.wait_closed(), 120)

    asyncio.run(idle())
    assert len(lost) == 1  # closed by the relay (without the limit: the bound above)
