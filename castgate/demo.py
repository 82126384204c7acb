"""``castgate demo``: the embedded default, end to end, in a temporary directory.

It creates a working directory, starts a local SSH target (a shell behind an embedded
SSH server, so no sshd is needed), a local PostgreSQL target when the server binaries
are installed (castgate.localpg), and the relay in front of them, then runs a scripted
agent through the relay: it prints card numbers (masked on the way), runs a command a
rule blocks, and one that waits for approval, which the demo approves as an on-call
engineer through the control API; on PostgreSQL it reads a table of card numbers
(masked) and tries a DROP a rule blocks. It ends in the operator console when run in a
terminal, or with the session list and ``castgate verify`` on every cast otherwise.
The targets and the relay are stopped on the way out, on Ctrl-C and errors too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import asyncssh

from castgate.initdir import init_dir
from castgate.localpg import BINDIR_ENV, LocalPostgres, die_with_parent, find_bindir
from castgate.localtarget import LocalTarget
from recorder.errors import CastgateError
from recorder.integrity import verify_cast
from recorder.masking import luhn_complete
from recorder.signing import PUBLIC_NAME, load_public

_DEMO_CONFIG = """
[[identities]]
name = "alice"
groups = ["sre"]
token_sha256 = "{alice_sha}"

[[targets]]
name = "web"
kind = "ssh"
address = "127.0.0.1:{port}"
user = "demo"
key_file = "{key_file}"
host_key = "{host_key}"
groups = ["agents", "sre"]

[[rules]]
name = "no-rm-rf"
command = '^rm -rf'
action = "block"

[[rules]]
name = "restart-needs-approval"
command = '^systemctl restart'
action = "approve"
approvers = ["sre"]
timeout = "2m"
"""


_PG_CONFIG = """
[[targets]]
name = "appdb"
kind = "postgres"
address = "127.0.0.1:{port}"
database = "app"
user = "app"
password_env = "{password_env}"
tls = "disable"
groups = ["agents", "sre"]
mask_columns = ["cards.pan"]

[[rules]]
name = "no-drop"
sql = ["DropStmt", "DropdbStmt"]
action = "block"
"""

# The relay reads the demo database's password from here (never from the config file).
_PG_PASSWORD_ENV = "CASTGATE_DEMO_APPDB_PASSWORD"  # noqa: S105 - a variable name


class DemoError(CastgateError):
    """The demo could not run."""


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _start_relay(
    config: Path, data: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    log = (data / "relay.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "castgate.cli", "relay", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, **env},
        # SIGTERM: the relay seals its casts and stops, even when the demo was SIGKILLed.
        preexec_fn=die_with_parent(signal.SIGTERM),
    )
    log.close()
    runtime = data / "relay.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if runtime.exists():
            info = json.loads(runtime.read_text())
            if info.get("pid") == proc.pid:
                return proc, dict(info["listen"])
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise DemoError(f"the relay did not start; see {data / 'relay.log'}")


def _api(url: str, token: str, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(  # noqa: S310 - the demo's own loopback relay
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        method="POST" if body is not None else "GET",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310
        return json.loads(resp.read())


async def _agent(ssh_port: int, token: str, api: str, alice: str) -> None:
    visa = luhn_complete("411111111111111")
    mc = luhn_complete("555555555555444")
    async with asyncssh.connect(
        "127.0.0.1",
        ssh_port,
        username="web",
        password=token,
        known_hosts=None,  # the demo's own relay on loopback
        client_keys=None,
        agent_path=None,
        config=[],
    ) as conn:
        _say("$ ssh web@relay 'psql -c \"select * from cards\"'   # the agent reads card data")
        table = (
            f"printf ' id | holder | pan\\n----+--------+------------------\\n"
            f"  1 | alice  | {visa}\\n  2 | bob    | {mc[:4]} {mc[4:8]} {mc[8:12]} {mc[12:]}\\n'"
        )
        res = await conn.run(table, check=False)
        sys.stdout.write(str(res.stdout))
        _say("(the agent, the recording and every watcher saw only the masked form)\n")

        _say("$ ssh web@relay 'rm -rf /var/lib/app'   # a rule blocks this")
        res = await conn.run("rm -rf /var/lib/app-castgate-demo", check=False)
        sys.stdout.write(str(res.stderr))
        _say(f"[exit status {res.exit_status}]\n")

        _say("$ ssh web@relay 'systemctl restart app'   # a rule makes this wait for approval")
        proc = await conn.create_process(
            "systemctl restart app 2>/dev/null || echo 'app restarted (simulated)'"
        )
        line = await proc.stderr.readline()
        sys.stdout.write(str(line))
        match = re.search(r"approval #(\d+)", str(line))
        if match:
            await asyncio.sleep(1.0)
            _say(f"(on-call engineer alice approves #{match.group(1)} through the control API)")
            await asyncio.to_thread(
                _api, api, alice, f"/api/v1/approvals/{match.group(1)}/approve", {"reason": "demo"}
            )
        out, err = await proc.communicate()
        sys.stdout.write(str(err) + str(out))
        _say(f"[exit status {proc.exit_status}]\n")


def _line(exc: BaseException) -> str:
    """The first line of an error's text (psycopg's span several)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _demo_pans() -> list[str]:
    # Standard test card numbers (Visa, Mastercard, Amex), never real ones.
    return [luhn_complete(p) for p in ("411111111111111", "555555555555444", "37828224631000")]


def _seed(pg: LocalPostgres) -> str:
    """Role ``app``, database ``app`` and its ``cards`` table; returns app's password."""
    import psycopg
    from psycopg import sql

    password = secrets.token_urlsafe(18)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE app LOGIN PASSWORD {}").format(sql.Literal(password)))
        conn.execute("CREATE DATABASE app OWNER app")
    holders = ("alice", "bob", "carol")
    with psycopg.connect(pg.dsn("app", "app", password), autocommit=True) as conn:
        conn.execute("CREATE TABLE cards (id int PRIMARY KEY, holder text, pan text, note text)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO cards VALUES (%s, %s, %s, %s)",
                [
                    (i + 1, holders[i], pan, f"paid with {pan}")
                    for i, pan in enumerate(_demo_pans())
                ],
            )
    return password


def _pg_agent(pg_port: int, token: str) -> None:
    """The agent on PostgreSQL: reads card numbers, then tries a DROP."""
    import psycopg

    dsn = (
        f"host=127.0.0.1 port={pg_port} dbname=appdb user=ci-agent password={token} "
        "sslmode=disable connect_timeout=15"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        _say('$ psql "host=relay dbname=appdb user=ci-agent" -c "select * from cards"')
        cur = conn.execute("SELECT id, holder, pan, note FROM cards ORDER BY id")
        _say(" id | holder | pan              | note")
        _say("----+--------+------------------+---------------------------")
        for row in cur.fetchall():
            _say(f" {row[0]:>2} | {row[1]:<6} | {row[2]:<16} | {row[3]}")
        _say("(pan is a masked column; the card number in note was found by its content)\n")
        _say('$ psql ... -c "drop table cards"   # a rule blocks this')
        try:
            conn.execute("DROP TABLE cards")
        except psycopg.Error as exc:
            state = exc.diag.sqlstate or ""
            _say(f"ERROR:  {exc.diag.message_primary or exc}  (SQLSTATE {state})\n")
        else:
            raise DemoError("the relay let DROP TABLE through")


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C, so the targets and the
    relay are stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    # Under nohup SIGHUP is ignored on purpose: leave it so.
    sigs = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        sigs.append(signal.SIGHUP)
    try:
        previous = {sig: signal.signal(sig, handler) for sig in sigs}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_relay(relay: subprocess.Popen[bytes]) -> None:
    relay.send_signal(signal.SIGTERM)
    try:
        relay.wait(20)
    except subprocess.TimeoutExpired:
        relay.kill()
        relay.wait(10)


def run_demo(workdir: Path | None = None, console: bool = True, keep: bool = False) -> int:
    """Run the demo; returns the process exit status. ``keep``: after the script, leave
    the relay and its targets running until a signal ends the demo."""
    with _sigterm_as_exit(), contextlib.ExitStack() as stack:
        return _run(workdir, console, keep, stack)


def _sessions_settled(api: str, alice: str, within: float = 60.0) -> None:
    """Wait until the relay has ended (and sealed) every session of the script."""
    deadline = time.monotonic() + within
    while _api(api, alice, "/api/v1/sessions?live=true")["sessions"]:
        if time.monotonic() > deadline:
            raise DemoError(f"the relay still has live sessions after {within:g} s")
        time.sleep(0.05)


def _keep_running(listen: dict[str, str], config: Path) -> None:
    host, _, port = listen["ssh"].rpartition(":")
    _say(
        f"\nThe relay keeps running (Ctrl-C stops it and its targets):\n"
        f"  castgate sessions -c {config}\n"
        f"  ssh -p {port} web@{host}    # with the demo's agent key or token"
    )
    while True:
        signal.pause()  # SIGINT, SIGTERM and SIGHUP end the demo through their handlers


def _run(workdir: Path | None, console: bool, keep: bool, stack: contextlib.ExitStack) -> int:
    base = workdir or Path(tempfile.mkdtemp(prefix="castgate-demo-"))
    _say(f"castgate demo in {base}\n")
    res = init_dir(base)
    config = res.config_path
    data = base / "data"
    target = LocalTarget().start(data / "keys")
    stack.callback(target.stop)
    pg: LocalPostgres | None = None
    relay_env: dict[str, str] = {}
    bindir = find_bindir()
    if bindir is None:
        _say(
            "PostgreSQL server binaries (initdb, postgres) not found: skipped the "
            f"PostgreSQL target (install them, or point {BINDIR_ENV} at their directory)\n"
        )
    else:
        pg = LocalPostgres.start(bindir, base)
        stack.callback(pg.stop)
        try:
            relay_env[_PG_PASSWORD_ENV] = _seed(pg)
        except Exception as exc:  # psycopg's errors: one line, not a traceback
            raise DemoError(f"cannot prepare the local PostgreSQL target: {_line(exc)}") from None
        _say(f"PostgreSQL target 'appdb': a local server from {bindir}, cluster in {pg.base}")
    alice = "cgt_" + secrets.token_urlsafe(24)
    text = config.read_text()
    for name in ("ssh", "postgres", "api"):
        text = re.sub(rf'^{name} = "127\.0\.0\.1:\d+"', f'{name} = "127.0.0.1:0"', text, flags=re.M)
    if pg is None:
        text = text.replace('postgres = "127.0.0.1:0"', 'postgres = ""')
    text += _DEMO_CONFIG.format(
        alice_sha=hashlib.sha256(alice.encode()).hexdigest(),
        port=target.port,
        key_file=target.client_key,
        host_key=target.host_key_line,
    )
    if pg is not None:
        text += _PG_CONFIG.format(port=pg.port, password_env=_PG_PASSWORD_ENV)
    config.write_text(text)
    relay, listen = _start_relay(config, data, relay_env)
    stack.callback(_stop_relay, relay)
    api = "http://" + listen["api"]
    ssh_port = int(listen["ssh"].rsplit(":", 1)[1])
    status = 0
    pg_note = f", PostgreSQL {listen['postgres']}" if pg is not None else ""
    _say(f"relay: SSH {listen['ssh']}{pg_note}, control API {api}; target 'web' is a local shell\n")
    asyncio.run(_agent(ssh_port, res.token, api, alice))
    if pg is not None:
        try:
            _pg_agent(int(listen["postgres"].rsplit(":", 1)[1]), res.token)
        except DemoError:
            raise
        except Exception as exc:  # psycopg's errors: one line, not a traceback
            raise DemoError(f"PostgreSQL through the relay: {_line(exc)}") from None
    _sessions_settled(api, alice)  # the last cast is sealed before it is verified
    sessions = _api(api, alice, "/api/v1/sessions")["sessions"]
    _say("== castgate sessions")
    for s in sessions:
        _say(f"{s['id']}  {s['status']:<8} {s['identity']}@{s['target']}  {s.get('title') or ''}")
    _say("\n== castgate verify (hash chain and Ed25519 signature of every cast)")
    pub = load_public(data / "keys" / PUBLIC_NAME)
    for cast in sorted((data / "recordings").glob("*.cast")):
        report = verify_cast(cast, pub)
        _say(report.line())
        status |= report.verdict.exit_code
    if console and sys.stdin.isatty() and sys.stdout.isatty():
        _say("\nOpening the operator console as alice (Ctrl-Q to leave)...")
        time.sleep(1.5)
        from console.app import run as run_console

        run_console(api, alice)
    if keep:
        _keep_running(listen, config)
    stack.close()  # relay, PostgreSQL and the SSH target stop before the last words
    _say(f"\nFiles are in {base}: castgate.toml, data/recordings/*.cast, data/castgate.db")
    _say(
        f"Replay one: castgate play {next(iter(sorted((data / 'recordings').glob('*.cast'))), '')}"
    )
    return status
