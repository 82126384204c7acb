"""PAN canary: push test card numbers through every path of the relay (SSH output, input,
exec arguments, approval requests and their webhook bodies; PostgreSQL rows, query
literals, COPY, error details; metrics; an evidence bundle), then scan every file, the
store and every log line the relay produced. Zero raw card numbers may remain anywhere
(PCI DSS 3.4.1, 3.5.1, 12.10.7)."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import subprocess
import threading
import urllib.request
from pathlib import Path

import asyncssh
import psycopg

from tests.fix_pg_relay import APP_PASSWORD, PANS, PG_TARGETS, _prepare_app_db
from tests.fix_postgres import PostgresServer
from tests.fix_relay import TOKENS, mint_jwt, start_relay, wait_for
from tests.fix_sshd import SshTarget

RUN = re.compile(rb"[0-9]{13,19}")


def _raw_hits(data: bytes) -> list[str]:
    return [pan for pan in PANS if pan.encode() in data]


def test_no_raw_card_number_anywhere(
    sshd_target: SshTarget, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    _prepare_app_db(postgres_server)
    hook_bodies: list[bytes] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hook_bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    rule = f"""
[[rules]]
name = "canary-hook"
command = '^canary-deploy'
action = "approve"
approvers = ["sre"]
timeout = "20s"
webhook = "http://127.0.0.1:{hook.server_address[1]}/hook"
"""
    relay = start_relay(
        tmp_path / "canary",
        sshd_target,
        extra=PG_TARGETS.format(port=postgres_server.port) + rule,
        env={"APPDB_PASSWORD": APP_PASSWORD},
    )
    visa, mc, amex, disc = PANS
    try:
        # SSH: exec argument, stdout, stderr.
        res = relay.ssh("web", f"echo out {visa}; echo err {mc} >&2; echo '{amex}' | cat")
        assert res.returncode == 0
        assert not _raw_hits(res.stdout + res.stderr)

        # SSH: interactive input and output, a held command quoting a PAN, denied.
        async def shell() -> None:
            async with asyncssh.connect(
                "127.0.0.1",
                relay.port,
                username="web",
                client_keys=[str(relay.agent_key)],
                known_hosts=relay.known_hosts_obj(),
                config=[],
                agent_path=None,
            ) as conn:
                proc = await conn.create_process(term_type="xterm", term_size=(120, 30))
                proc.stdin.write(f"echo typed {disc}\r")
                # The command's output line, before the next line is typed: typed ahead
                # of the echo, "exit" would be opaque and held (a sleep here lost that
                # race on a loaded machine).
                got = ""
                while not re.search(r"[\r\n]typed ", got):  # the output, not the echo
                    got += await asyncio.wait_for(proc.stdout.read(4096), 120)
                proc.stdin.write("exit\r")
                await proc.wait()

        asyncio.run(shell())
        api = f"http://127.0.0.1:{relay.api_port}"
        held = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web@127.0.0.1", f"canary-deploy {amex}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: bool(hook_bodies), 20)
        assert b"canary-deploy" in hook_bodies[0] and not _raw_hits(b"".join(hook_bodies))
        held.kill()
        held.wait(30)
        held = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web@127.0.0.1", f"systemctl restart card-{visa}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def pending() -> list[dict[str, object]]:
            req = urllib.request.Request(
                api + "/api/v1/approvals",
                headers={"Authorization": f"Bearer {TOKENS['alice']}"},
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                return list(json.loads(resp.read())["approvals"])

        def restart_pending() -> list[dict[str, object]]:
            return [a for a in pending() if a.get("rule") == "restart-needs-approval"]

        wait_for(lambda: bool(restart_pending()), 20)
        listed = json.dumps(pending())
        assert visa not in listed and visa[:6] in listed
        aid = restart_pending()[0]["id"]
        req = urllib.request.Request(
            api + f"/api/v1/approvals/{aid}/deny",
            data=json.dumps({"reason": f"no, and here is a card {mc}"}).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {TOKENS['bob']}"},
        )
        with urllib.request.urlopen(req, timeout=10):
            pass
        held.wait(30)

        # PostgreSQL: rows, literals, COPY, error details, notices.
        with psycopg.connect(relay.pg_dsn(), autocommit=True) as conn:
            rows = conn.execute("SELECT pan, note FROM cards").fetchall()
            assert not _raw_hits(json.dumps(rows).encode())
            conn.execute(f"SELECT '{amex}' AS lit, '{disc}'::text")
            with conn.cursor() as cur, cur.copy("COPY cards TO STDOUT") as copy:
                data = b"".join(bytes(c) for c in copy)
            assert not _raw_hits(data)
            conn.execute("CREATE TEMP TABLE u (pan text UNIQUE)")
            conn.execute(f"INSERT INTO u VALUES ('{visa}')")
            try:
                conn.execute(f"INSERT INTO u VALUES ('{visa}')")
            except psycopg.errors.UniqueViolation as exc:
                assert not _raw_hits(str(exc.diag.message_detail).encode())
            conn.execute(f"DO $$ BEGIN RAISE NOTICE 'card %', '{mc}'; END $$")
        with urllib.request.urlopen(
            urllib.request.Request(
                api + "/metrics", headers={"Authorization": f"Bearer {TOKENS['alice']}"}
            ),
            timeout=10,
        ) as resp:
            assert not _raw_hits(resp.read())
        # A pipeline run whose token's claims carry card numbers (a branch named after
        # one, an actor, a commit): the claims are the token holder's to choose.
        token = mint_jwt(
            relay,
            run_id="4242",
            run_attempt="1",
            ref=f"refs/heads/{visa}",
            sha=mc,
            actor=f"bot-{amex}",
            repository="acme/payments",
        )
        with psycopg.connect(relay.pg_dsn(user="oidc-agent", token=token), autocommit=True) as conn:
            conn.execute(f"SELECT '{disc}' AS lit").fetchall()
        runs = relay.castgate("runs", "--json", "--token", TOKENS["alice"])
        assert runs.returncode == 0 and "oidc:4242:1" in runs.stdout, runs.stderr
        assert not _raw_hits(runs.stdout.encode()) and visa[:6] in runs.stdout
        run_bundle = tmp_path / "evidence-run"
        ev = relay.castgate("evidence", "--run", "oidc:4242:1", "-o", str(run_bundle), timeout=120)
        assert ev.returncode == 0, ev.stderr
        assert (run_bundle / "run-record.json").is_file()
        # An evidence bundle of every session, as an auditor would take it.
        bundle = tmp_path / "evidence"
        ev = relay.castgate("evidence", "--since", "2000-01-01", "-o", str(bundle), timeout=120)
        assert ev.returncode == 0, ev.stderr
    finally:
        assert relay.stop() == 0
        hook.shutdown()
        hook.server_close()
    for path in [*bundle.rglob("*"), *run_bundle.rglob("*")]:
        if path.is_file():
            assert not _raw_hits(path.read_bytes()), path
    assert list(bundle.rglob("*.cast")), "the bundle holds the casts it scanned"

    # Everything the relay wrote: casts, chains, manifests, the store (and its WAL), logs.
    hits: dict[str, list[str]] = {}
    for path in (relay.workdir / "data").rglob("*"):
        if path.is_file():
            found = _raw_hits(path.read_bytes())
            if found:
                hits[str(path)] = found
    logs = "\n".join(json.dumps(e) for e in relay.logs).encode()
    if _raw_hits(logs):
        hits["relay log"] = _raw_hits(logs)
    assert hits == {}
    # And the recordings did see the masked forms, so the scan looked at real traffic.
    casts = b"".join(p.read_bytes() for p in (relay.workdir / "data" / "recordings").glob("*.cast"))
    assert f"{visa[:6]}******{visa[-4:]}".encode() in casts
    assert b"typed " in casts
