"""Size limits on what one client may send: SSH exec commands, environments and
subsystem names, PostgreSQL startup packets and messages. At each limit the relay gives
exactly what the target gives directly; one byte past it, a clear one-line error, an
audit event (``limit.exceeded``, counted in the metrics), and the relay (and, for SSH,
the same connection) serves the next request."""

from __future__ import annotations

import hashlib
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fix_pg_relay import APP_PASSWORD, PG_TARGETS, PgRelay, _prepare_app_db
from tests.fix_postgres import PostgresServer
from tests.fix_relay import TOKENS, Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget

MAX_COMMAND = 4096
MAX_ENV_VARS = 4
MAX_ENV_BYTES = 200
MAX_MESSAGE = 65536
LIMITS = f"""
[limits]
ssh_max_command = {MAX_COMMAND}
ssh_max_env_vars = {MAX_ENV_VARS}
ssh_max_env_bytes = {MAX_ENV_BYTES}
ssh_max_subsystem = 4
pg_max_message = "64KiB"
"""


def _files_target(t: SshTarget) -> str:
    return f"""
[[targets]]
name = "files"
kind = "ssh"
address = "{t.host}:{t.port}"
user = "{t.user}"
key_file = "{t.client_key}"
host_key = "{t.host_key_line}"
groups = ["agents"]
allow_sftp = true
"""


@pytest.fixture(scope="module")
def limited(
    sshd_target: SshTarget,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PgRelay]:
    direct = _prepare_app_db(postgres_server)
    relay = start_relay(
        tmp_path_factory.mktemp("sizes"),
        sshd_target,
        extra=PG_TARGETS.format(port=postgres_server.port) + _files_target(sshd_target) + LIMITS,
        env={"APPDB_PASSWORD": APP_PASSWORD},
    )
    try:
        yield PgRelay(relay, postgres_server, direct)
    finally:
        relay.stop()


def _limit_events(relay: Relay, key: str) -> list[dict[str, object]]:
    return [e for e in relay.logs if e.get("msg") == "limit.exceeded" and e.get("limit") == key]


def _exceeded_metric(relay: Relay) -> int:
    req = urllib.request.Request(
        f"{relay.api}/metrics", headers={"Authorization": f"Bearer {TOKENS['alice']}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith('castgate_events_total{kind="limit.exceeded",outcome="failure"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _refused_once(relay: Relay, key: str, before: int, metric_before: int) -> None:
    """One audit event for the refusal, its size but nothing of its content, counted."""
    wait_for(lambda: len(_limit_events(relay, key)) == before + 1, 30)
    event = _limit_events(relay, key)[-1]
    assert set(event) >= {"size", "max", "actor", "origin"}, event
    assert "x" * 64 not in str(event)
    assert _exceeded_metric(relay) == metric_before + 1


# -- SSH ---------------------------------------------------------------------------------

# No system ssh_config: its SendEnv would add the test runner's LANG and LC_* variables.
_PLAIN = ["-F", "/dev/null"]


def _ssh(
    args: list[str], env: list[tuple[str, str]] | None = None
) -> subprocess.CompletedProcess[bytes]:
    if env is not None:
        # SendEnv, not SetEnv: a multiplexing client passes on only the former.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
        return subprocess.run(
            ["ssh", "-o", "SendEnv=LC_*", *args],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env={**base, **dict(env)},
        )
    return subprocess.run(["ssh", *args], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


def _direct(
    t: SshTarget, command: str, env: list[tuple[str, str]] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return _ssh([*_PLAIN, *t.ssh_args(), f"{t.user}@{t.host}", command], env)


def _relayed(
    relay: Relay,
    *args: str,
    target: str = "web",
    env: list[tuple[str, str]] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return _ssh([*_PLAIN, *relay.ssh_args(), *args[:-1], f"{target}@127.0.0.1", args[-1]], env)


def _command(size: int) -> str:
    """``printf`` of a run of x, ``size`` bytes in all."""
    head = "printf %s "
    return head + "x" * (size - len(head))


@pytest.fixture
def master(limited: PgRelay, tmp_path: Path) -> Iterator[list[str]]:
    """One SSH connection to the relay (an OpenSSH multiplexing master) that the
    sessions of a test share: a refused request must leave it serving."""
    relay = limited.relay
    sock = tmp_path / "mux"
    opts = [*_PLAIN, *relay.ssh_args(), "-S", str(sock)]
    subprocess.run(
        ["ssh", *opts, "-M", "-f", "-N", "-o", "ControlPersist=yes", "web@127.0.0.1"],
        check=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    try:
        yield ["-S", str(sock), "-o", "ControlMaster=no"]
    finally:
        subprocess.run(
            ["ssh", "-S", str(sock), "-O", "exit", "web@127.0.0.1"],
            timeout=60,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )


def test_an_exec_command_at_the_limit_runs_and_one_byte_more_is_refused(
    limited: PgRelay, sshd_target: SshTarget, master: list[str]
) -> None:
    relay = limited.relay
    at_limit = _command(MAX_COMMAND)
    assert len(at_limit.encode()) == MAX_COMMAND
    direct = _direct(sshd_target, at_limit)
    res = _relayed(relay, *master, at_limit)
    assert res.returncode == direct.returncode == 0, res.stderr
    assert res.stdout == direct.stdout == b"x" * (MAX_COMMAND - len("printf %s "))
    before, metric = len(_limit_events(relay, "ssh_max_command")), _exceeded_metric(relay)
    res = _relayed(relay, *master, _command(MAX_COMMAND + 1))
    assert res.returncode == 255 and res.stdout == b""
    assert (
        b"castgate: command of 4097 bytes exceeds the limit of 4096 bytes "
        b"(limits.ssh_max_command)\r\n" in res.stderr
    ), res.stderr
    _refused_once(relay, "ssh_max_command", before, metric)
    # The same connection serves the next session.
    again = _relayed(relay, *master, "echo still-serving")
    assert again.returncode == 0 and again.stdout == b"still-serving\n", again.stderr


_SHOW_ENV = "env | grep '^LC_' | sort"


# Separate connections: OpenSSH's multiplexing clients do not pass environments on.


def test_as_many_environment_variables_as_allowed_reach_the_target_and_one_more_is_refused(
    limited: PgRelay, sshd_target: SshTarget
) -> None:
    relay = limited.relay
    env = [(f"LC_V{chr(65 + i)}", str(i)) for i in range(MAX_ENV_VARS)]
    direct = _direct(sshd_target, _SHOW_ENV, env)
    res = _relayed(relay, _SHOW_ENV, env=env)
    assert res.returncode == direct.returncode == 0, res.stderr
    assert res.stdout == direct.stdout == b"".join(f"{k}={v}\n".encode() for k, v in env)
    before, metric = len(_limit_events(relay, "ssh_max_env_vars")), _exceeded_metric(relay)
    res = _relayed(relay, _SHOW_ENV, env=[*env, ("LC_VZ", "9")])
    assert res.returncode == 255 and res.stdout == b""
    assert (
        b"castgate: 5 environment variables exceed the limit of 4 (limits.ssh_max_env_vars)"
        in res.stderr
    ), res.stderr
    _refused_once(relay, "ssh_max_env_vars", before, metric)
    again = _relayed(relay, "echo still-serving")
    assert again.returncode == 0 and again.stdout == b"still-serving\n", again.stderr


def test_an_environment_of_the_allowed_size_reaches_the_target_and_one_byte_more_is_refused(
    limited: PgRelay, sshd_target: SshTarget
) -> None:
    relay = limited.relay
    # Names and values, MAX_ENV_BYTES in all: a shell does the same with the value.
    value = "x" * (MAX_ENV_BYTES - len("LC_BIG"))
    direct = _direct(sshd_target, _SHOW_ENV, [("LC_BIG", value)])
    res = _relayed(relay, _SHOW_ENV, env=[("LC_BIG", value)])
    assert res.returncode == direct.returncode == 0, res.stderr
    assert res.stdout == direct.stdout == f"LC_BIG={value}\n".encode()
    before, metric = len(_limit_events(relay, "ssh_max_env_bytes")), _exceeded_metric(relay)
    res = _relayed(relay, _SHOW_ENV, env=[("LC_BIG", value + "x")])
    assert res.returncode == 255 and res.stdout == b""
    assert (
        b"castgate: environment of 201 bytes exceeds the limit of 200 bytes "
        b"(limits.ssh_max_env_bytes)" in res.stderr
    ), res.stderr
    _refused_once(relay, "ssh_max_env_bytes", before, metric)
    again = _relayed(relay, "echo still-serving")
    assert again.returncode == 0 and again.stdout == b"still-serving\n", again.stderr


def test_a_subsystem_name_at_the_limit_works_and_a_longer_one_is_refused(
    limited: PgRelay, sshd_target: SshTarget, tmp_path: Path
) -> None:
    relay = limited.relay
    (tmp_path / "f").write_bytes(b"sftp through the relay\n")
    batch = f"ls -1 {tmp_path}\n".encode()

    def sftp(port: int, ssh_args: list[str], user: str) -> subprocess.CompletedProcess[bytes]:
        opts = [a for a in ssh_args if a != "-p" and not a.isdigit()]
        return subprocess.run(
            ["sftp", *_PLAIN, "-P", str(port), *opts, "-b", "-", f"{user}@127.0.0.1"],
            input=batch,
            capture_output=True,
            timeout=60,
        )

    direct = sftp(sshd_target.port, sshd_target.ssh_args(), sshd_target.user)
    res = sftp(relay.port, relay.ssh_args(), "files")
    assert res.returncode == direct.returncode == 0, res.stderr
    assert res.stdout == direct.stdout and str(tmp_path / "f").encode() in res.stdout
    before, metric = len(_limit_events(relay, "ssh_max_subsystem")), _exceeded_metric(relay)
    res = _relayed(relay, "-s", "sftpx", target="files")
    assert res.returncode == 255
    assert (
        b"castgate: subsystem name of 5 bytes exceeds the limit of 4 bytes "
        b"(limits.ssh_max_subsystem)" in res.stderr
    ), res.stderr
    _refused_once(relay, "ssh_max_subsystem", before, metric)
    assert sftp(relay.port, relay.ssh_args(), "files").stdout == direct.stdout


# -- PostgreSQL --------------------------------------------------------------------------


def _serves(limited: PgRelay) -> None:
    with psycopg.connect(limited.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM cards").fetchone() == (4,)


def _psql(dsn: str, sql: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _select(size: int) -> str:
    """A statement whose Query message (type, length, text, NUL) is ``size`` bytes."""
    head, tail = "SELECT md5('", "')"
    return head + "x" * (size - 6 - len(head) - len(tail)) + tail


def test_a_query_at_the_limit_runs_and_one_byte_more_is_refused_with_54000(
    limited: PgRelay,
) -> None:
    relay = limited.relay
    sql = _select(MAX_MESSAGE)
    direct = _psql(limited.direct_dsn, sql)
    res = _psql(limited.dsn(), sql)
    assert res.returncode == direct.returncode == 0, res.stderr
    assert res.stdout == direct.stdout and len(res.stdout) == 33
    before, metric = len(_limit_events(relay, "pg_max_message")), _exceeded_metric(relay)
    res = _psql(limited.dsn(), _select(MAX_MESSAGE + 1))
    assert res.returncode != 0 and res.stdout == b""
    assert (
        b"castgate: Query message of 65537 bytes exceeds the limit of 65536 bytes "
        b"(limits.pg_max_message)" in res.stderr
    ), res.stderr
    _refused_once(relay, "pg_max_message", before, metric)
    _serves(limited)


def test_a_bind_at_the_limit_runs_and_one_byte_more_is_refused_with_54000(
    limited: PgRelay,
) -> None:
    relay = limited.relay
    # psycopg's Bind of one binary parameter: 21 bytes besides the value.
    value = bytes(range(256)) * ((MAX_MESSAGE - 21) // 256) + b"\0" * ((MAX_MESSAGE - 21) % 256)
    with psycopg.connect(limited.direct_dsn, autocommit=True) as conn:
        direct = conn.execute("SELECT md5(%b)", [value]).fetchone()
    with psycopg.connect(limited.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT md5(%b)", [value]).fetchone() == direct
        assert direct == (hashlib.md5(value).hexdigest(),)  # noqa: S324
        before, metric = len(_limit_events(relay, "pg_max_message")), _exceeded_metric(relay)
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT md5(%b)", [value + b"\0"])
    assert err.value.sqlstate == "54000", err.value
    assert "Bind message of 65537 bytes exceeds the limit of 65536 bytes" in str(err.value)
    _refused_once(relay, "pg_max_message", before, metric)
    _serves(limited)


def test_a_startup_packet_at_postgresqls_limit_is_served_and_a_longer_one_refused(
    limited: PgRelay,
) -> None:
    relay = limited.relay
    # libpq's StartupMessage: 8 bytes of header, user, database, options and a closing
    # NUL: 47 bytes besides the options through the relay (which drops them; a long
    # application_name would reach the target, whose own limit it would then break).
    opts = "x" * (10_000 - 47)
    with psycopg.connect(limited.dsn(), options=opts, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    before, metric = len(_limit_events(relay, "pg_max_startup")), _exceeded_metric(relay)
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(limited.dsn(), options=opts + "x")
    assert (
        "invalid startup packet length 10001: over the limit of 10000 bytes "
        "(limits.pg_max_startup)" in str(err.value)
    ), err.value
    _refused_once(relay, "pg_max_startup", before, metric)
    _serves(limited)
