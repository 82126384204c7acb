"""Giant lines and invalid UTF-8 through the relay: a 10 MB line of output over SSH exec
and in a PTY shell (where the shell-line policy model reads it), a 1 MB SQL statement,
invalid UTF-8 in SSH output, SQL text and results. The agent gets exactly what the
target sent (masked), the policy still works afterwards, and every cast verifies and is
asciicast that stock asciinema reads."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import psycopg
import pytest

from recorder.integrity import Verdict, manifest_path, verify_cast
from relay.pg.sql import MAX_PARSE_CHARS
from tests.fix_pg_relay import PgRelay
from tests.fix_relay import Relay, wait_for
from tests.integration.test_control_api import live_session

ASCIINEMA = str(Path(sys.executable).parent / "asciinema")
TEN_MB = 10 << 20


def sealed_cast(relay: Relay, needle: str) -> Path:
    """The sealed cast whose text holds ``needle``."""
    found: list[Path] = []

    def ready() -> bool:
        found[:] = [
            c
            for c in sorted(relay.recordings().glob("*.cast"))
            if manifest_path(c).exists() and needle in c.read_text(errors="replace")
        ]
        return bool(found)

    wait_for(ready, 30)
    return found[-1]


def check_cast(cast: Path) -> list[list[object]]:
    """Intact, every line valid JSON, read by stock asciinema; returns the events."""
    assert verify_cast(cast).verdict is Verdict.INTACT
    lines = cast.read_bytes().split(b"\n")
    assert lines[-1] == b""
    events = [json.loads(line) for line in lines[1:-1]]  # strict UTF-8 JSON, line by line
    assert isinstance(json.loads(lines[0]), dict)
    cat = subprocess.run([ASCIINEMA, "cat", str(cast)], capture_output=True, timeout=120)
    assert cat.returncode == 0, cat.stderr[-500:]
    return events


def output_of(events: list[list[object]]) -> str:
    return "".join(str(e[2]) for e in events if e[1] == "o")


def test_a_10_mb_line_over_exec(pg_relay: PgRelay) -> None:
    relay = pg_relay.relay
    done = relay.ssh(
        "web", "head -c 10485760 /dev/zero | tr '\\0' x; echo giant-exec-end", timeout=120
    )
    assert done.returncode == 0, done.stderr[-300:]
    assert done.stdout == b"x" * TEN_MB + b"giant-exec-end\n"
    events = check_cast(sealed_cast(relay, "giant-exec-end"))
    assert output_of(events) == "x" * TEN_MB + "giant-exec-end\n"


def test_invalid_utf8_in_exec_output(pg_relay: PgRelay) -> None:
    relay = pg_relay.relay
    done = relay.ssh("web", "printf 'bad-utf8 \\377\\376 cut \\303'; echo; echo utf8-end")
    assert done.stdout == b"bad-utf8 \xff\xfe cut \xc3\nutf8-end\n"  # byte for byte
    events = check_cast(sealed_cast(relay, "utf8-end"))
    assert "bad-utf8 \ufffd\ufffd cut \ufffd\nutf8-end\n" in output_of(events)


async def _shell(relay: Relay) -> str:
    async with asyncssh.connect(
        "127.0.0.1",
        relay.port,
        username="web",
        client_keys=[str(relay.agent_key)],
        known_hosts=relay.known_hosts_obj(),
        config=[],
        agent_path=None,
    ) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(100, 30), encoding=None)
        out = bytearray()

        async def expect(needle: bytes, timeout: float = 120, after: int = 0) -> None:
            deadline = time.monotonic() + timeout
            while needle not in out[after:]:
                assert time.monotonic() < deadline, bytes(out[-300:])
                out.extend(await asyncio.wait_for(proc.stdout.read(1 << 20), timeout))

        # Type at the first prompt, not into the login banner (typed ahead, the relay
        # reads the banner as the echoed line: unparsable, so opaque and held).
        while not bytes(out).rstrip(b" ").endswith((b"#", b"$")):
            out.extend(await asyncio.wait_for(proc.stdout.read(4096), 120))
        proc.stdin.write(b"export PS1='g''s> ' HISTFILE=/dev/null\r")
        await expect(b"gs> ")
        # One 10 MB line with no newline, then \xff: the line model takes it in bulk.
        proc.stdin.write(
            b"head -c 10485760 /dev/zero | tr '\\0' y; printf '\\377'; echo; echo shell-giant-$((6*7))\r"
        )
        await expect(b"shell-giant-42")
        # The command policy still reads the next line.
        proc.stdin.write(b"rm -rf /tmp/castgate-hostile-nope\r")
        await expect(b"blocked by rule no-rm-rf")
        # Like a person, wait for the fresh prompt (the relay discarded the line with
        # Ctrl-C) before typing: typed ahead, "exit" would share the row with "^C".
        await expect(b"gs> ", after=out.index(b"blocked by rule no-rm-rf"))
        proc.stdin.write(b"exit\r")
        await asyncio.wait_for(proc.wait(), 60)
        return out.decode("utf-8", "replace")


def test_a_10_mb_line_in_a_pty_shell(pg_relay: PgRelay) -> None:
    relay = pg_relay.relay
    seen = asyncio.run(_shell(relay))
    assert "y" * 100_000 in seen
    events = check_cast(sealed_cast(relay, "shell-giant-$((6*7))"))
    out = output_of(events)
    assert out.count("y") >= TEN_MB and "shell-giant-42" in out
    assert ["m", "blocked: no-rm-rf"] in [e[1:] for e in events]


def test_a_1_mb_statement_is_refused_only_when_a_rule_must_parse_it(pg_relay: PgRelay) -> None:
    filler = "x" * (1 << 20)
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        # "update" in the text: the no-where rule must parse it, and it is too long.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement-too-long"):
            conn.execute(f"UPDATE victims SET id = id WHERE length('{filler}') = 0")
        # Nothing a rule asks about: relayed unchecked, the result masked as usual.
        row = conn.execute(f"SELECT length('{filler}'), '4111111111111111'").fetchone()
        assert row == (1 << 20, "411111******1111")
        # Up to the limit a statement is parsed and decided by the rules.
        small = "y" * (MAX_PARSE_CHARS - 100)
        assert conn.execute(f"UPDATE victims SET id = id WHERE length('{small}') = 0").rowcount == 0
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session is still usable
    events = check_cast(sealed_cast(pg_relay.relay, "blocked: castgate:statement-too-long"))
    assert ["m", "blocked: castgate:statement-too-long"] in [e[1:] for e in events]


def test_invalid_utf8_in_sql_text_and_results(pg_relay: PgRelay) -> None:
    # The relay pins every session to UTF8 (tests/integration/test_pg_failclosed.py):
    # a switch to LATIN1 is refused and the session stays UTF-8, masked and recorded.
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET client_encoding = 'LATIN1'")
        row = conn.execute("SELECT 'café utf8 ' || '4111111111111111', 'naïve'").fetchone()
        assert row == ("café utf8 411111******1111", "naïve")
        # Invalid bytes the server itself refuses: a clean error, the session goes on.
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
            conn.execute(b"SELECT 'pg-\xff\xfe-end'")  # type: ignore[call-overload]
        assert conn.execute("SELECT 'after-bad-bytes'").fetchone() == ("after-bad-bytes",)
    cast = sealed_cast(pg_relay.relay, "after-bad-bytes")
    out = output_of(check_cast(cast))
    assert "café utf8 411111******1111" in out
    assert "4111111111111111" not in cast.read_text()


# -- a card number cut by a long escape run across two writes ---------------------------
SGR_RUN = "\x1b[38;5;196m\x1b[48;5;21m\x1b[1m\x1b[4m\x1b[0m\x1b[38;2;10;20;30m"  # 48 bytes
VISA = "4111111111111111"
_BODY = SGR_RUN.join(VISA)  # colour codes between every two digits: ~720 bytes
_CUT = _BODY.index("\x1b[48", len(_BODY) // 2) + 3  # inside an escape sequence
_MASKED = SGR_RUN.join(VISA[:6] + "******" + VISA[-4:])
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def _printf(text: str) -> str:
    return "printf '" + text.replace("\x1b", "\\033") + "'"


def _split_writes(marker: str, repeat: int, pause: str = "") -> str:
    """The target prints the number in two writes 5 ms apart (its own timing, below the
    20 ms hold deadline), the cut inside an escape sequence in the middle of the run."""
    return (
        f"for i in $(seq 1 {repeat}); do printf '%s ' {marker}-$i; {_printf(_BODY[:_CUT])}; "
        f"sleep 0.005; {_printf(_BODY[_CUT:])}; echo ' ok'; {pause} done"
    )


def test_a_number_split_by_a_long_escape_run_across_writes(pg_relay: PgRelay) -> None:
    relay = pg_relay.relay
    done = relay.ssh("web", _split_writes("splitpan", 5))
    assert done.returncode == 0, done.stderr[-300:]
    expected = "".join(f"splitpan-{i} {_MASKED} ok\n" for i in range(1, 6))
    assert done.stdout.decode() == expected  # the agent's bytes, escapes intact
    cast = sealed_cast(relay, "splitpan-$i")  # the command in the header
    out = output_of(check_cast(cast))
    assert expected in out and VISA not in _ANSI.sub("", out)
    res = relay.castgate("export", str(cast), "--format", "txt")
    assert res.returncode == 0, res.stderr
    # No PTY: bare line feeds make a staircase, the last line is whole on the screen.
    assert f"splitpan-5 {VISA[:6]}******{VISA[-4:]} ok" in res.stdout
    assert VISA not in res.stdout
    # Positive control: the same bytes without the card number pass unchanged.
    plain = relay.ssh("web", "printf '" + _printf(SGR_RUN).split("'")[1] + "' ; echo plain-ok")
    assert plain.stdout == SGR_RUN.encode() + b"plain-ok\n"


def test_a_watcher_sees_the_split_number_masked(pg_relay: PgRelay) -> None:
    relay = pg_relay.relay
    agent = subprocess.Popen(
        ["ssh", *relay.ssh_args(), "web@127.0.0.1", _split_writes("watchpan", 300, "sleep 0.05;")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sid = live_session(relay, "watchpan")
        watcher = subprocess.Popen(
            ["ssh", "-tt", *relay.ssh_args(relay.operator_key), "castgate@127.0.0.1", "watch", sid],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert watcher.stdout is not None and watcher.stdin is not None
        seen = b""
        while seen.count(b" ok") < 5:
            chunk = watcher.stdout.read1(4096)  # type: ignore[attr-defined]
            assert chunk, seen[-500:]
            seen += chunk
        watcher.stdin.write(b"q")
        watcher.stdin.flush()
        watcher.wait(15)
        watcher.stdout.close()
        watcher.stdin.close()
        text = _ANSI.sub("", seen.decode("utf-8", "replace"))
        assert f"{VISA[:6]}******{VISA[-4:]} ok" in text and VISA not in text
    finally:
        agent.kill()
        agent.wait()
