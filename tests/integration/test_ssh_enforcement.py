"""No command reaches an SSH target unchecked, unrecorded or unmasked (issue 15).

Each way round the line checks an agent could try, with the real OpenSSH client (``ssh
-T`` with commands on stdin, ``ssh -tt`` for a PTY fed keystrokes from a pipe, ``scp
-O``, sftp) against the real sshd target, with a victim file on the target: a blocked
command never runs (the file is still there), an approval rule holds it, the command
log and the cast hold it, and a card number printed on the target reaches neither the
agent nor the cast raw. Positive controls beside them: the legitimate thing still works
byte for byte.

Targets: ``web`` (rules apply, so what the relay cannot follow is held for approval),
``locked`` (``opaque = "block"``: refused outright), ``strict`` (no-PTY shells and
interpreters refused), ``files`` (``allow_scp``, ``allow_sftp``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recorder.config import load_config
from recorder.integrity import manifest_path
from recorder.masking import luhn_complete
from recorder.store import Store
from tests.fix_relay import TOKENS, Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget

VISA = luhn_complete("411111111111111")
MASKED = f"{VISA[:6]}******{VISA[-4:]}"


def _target(name: str, t: SshTarget, settings: str) -> str:
    return f"""
[[targets]]
name = "{name}"
kind = "ssh"
address = "{t.host}:{t.port}"
user = "{t.user}"
key_file = "{t.client_key}"
host_key = "{t.host_key_line}"
groups = ["agents"]
{settings}
"""


@pytest.fixture(scope="module")
def relay(sshd_target: SshTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    extra = (
        _target("locked", sshd_target, 'opaque = "block"')
        + _target("strict", sshd_target, 'shell_without_pty = "refuse"\ninterpreters = "refuse"')
        + _target("files", sshd_target, "allow_scp = true\nallow_sftp = true")
    )
    r = start_relay(tmp_path_factory.mktemp("enforce"), sshd_target, extra=extra)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.mkdir()
    (path / "keep").write_text("keep")
    return path


# -- helpers -----------------------------------------------------------------------


def sealed_cast(relay: Relay, text: str) -> Path:
    """The one sealed cast holding ``text``."""

    def found() -> list[Path]:
        return [
            p
            for p in relay.recordings().glob("*.cast")
            if text in p.read_text() and manifest_path(p).exists()
        ]

    wait_for(lambda: len(found()) == 1, 20)
    return found()[0]


def events(cast: Path) -> list[list[Any]]:
    return [json.loads(line) for line in cast.read_text().splitlines()[1:]]


def inputs(cast: Path) -> list[str]:
    return [str(e[2]) for e in events(cast) if e[1] == "i"]


def commands(relay: Relay, cast: Path) -> list[dict[str, Any]]:
    session = json.loads(cast.read_text().splitlines()[0])["castgate"]["session"]
    store = Store.open(load_config(relay.config).store_url())
    try:
        return store.list_commands(session)
    finally:
        store.close()


def logged(relay: Relay, cast: Path, text: str) -> dict[str, Any]:
    """The command log row whose text holds ``text`` (written asynchronously)."""
    rows: list[dict[str, Any]] = []

    def find() -> bool:
        rows[:] = [c for c in commands(relay, cast) if text in c["text"]]
        return bool(rows)

    wait_for(find, 20)
    return rows[0]


def approve(relay: Relay, approval: int) -> None:
    res = relay.castgate("approve", str(approval), "--token", TOKENS["alice"])
    assert res.returncode == 0, res.stderr


_RUNNING: list[Proc] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """Clients a failed test left running are ended with it."""
    yield
    while _RUNNING:
        p = _RUNNING.pop()
        if p.proc.poll() is None:
            p.proc.kill()
        p.finish()


class Proc:
    """A real ``ssh`` client process through the relay, stdin a pipe, its output read
    as it comes."""

    def __init__(self, relay: Relay, args: list[str]) -> None:
        _RUNNING.append(self)
        self.proc = subprocess.Popen(
            ["ssh", *args[:-1], *relay.ssh_args(), *args[-1:]]
            if args and args[0] == "-tt"
            else ["ssh", *relay.ssh_args(), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = b""
        self.err = b""
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, name: str) -> None:
        while chunk := stream.read1(65536):
            with self._cond:
                setattr(self, name, getattr(self, name) + chunk)
                self._cond.notify_all()

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def expect(self, text: bytes, *, err: bool = False, count: int = 1) -> None:
        """Wait until ``text`` was seen ``count`` times on stdout (or stderr)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (self.err if err else self.out).count(text) >= count, 30
            )
        assert ok, (text, self.out[-600:], self.err[-600:])

    def ran(self, mark: bytes) -> None:
        """Wait until ``mark`` was printed as a line of output (not the echo of the
        command that prints it)."""
        pattern = re.compile(rb"[\r\n]" + re.escape(mark) + rb"\r\n")
        with self._cond:
            ok = self._cond.wait_for(lambda: pattern.search(self.out) is not None, 30)
        assert ok, (mark, self.out[-600:], self.err[-600:])

    def approval_id(self) -> int:
        pattern = re.compile(rb"approval #(\d+) required")
        with self._cond:
            self._cond.wait_for(lambda: pattern.search(self.out + self.err) is not None, 30)
        m = pattern.search(self.out + self.err)
        assert m is not None, (self.out[-600:], self.err[-600:])
        return int(m.group(1))

    def finish(self) -> int:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        code = self.proc.wait(60)
        for t in self._threads:
            t.join(10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        if self in _RUNNING:
            _RUNNING.remove(self)
        return code


class Tty(Proc):
    """``ssh -tt TARGET@relay [COMMAND]``: a PTY on the target, keystrokes from a pipe
    (sent as they are: the local side has no terminal to put in raw mode)."""

    def __init__(self, relay: Relay, target: str = "web", command: str | None = None) -> None:
        super().__init__(relay, ["-tt", f"{target}@127.0.0.1", *([command] if command else [])])

    def bash_prompt(self) -> None:
        self.send(b"export PS1='c''g> ' HISTFILE=/dev/null\r")
        self.expect(b"cg> ")

    def exit(self) -> int:
        self.send(b"\x03exit\r")
        return self.finish()


# -- class 1: shells without a PTY ---------------------------------------------------


def test_a_shell_without_a_pty_checks_each_stdin_line(relay: Relay, victim: Path) -> None:
    script = (
        f"echo no-pty-start\nrm -rf {victim}\necho card {VISA}\n"
        "echo 'two\nlines'\necho no-pty-end\nexit 3\n"
    )
    p = Proc(relay, ["-T", "web@127.0.0.1"])
    p.send(script.encode())
    code = p.finish()
    assert code == 3
    assert victim.exists()
    assert p.out == f"no-pty-start\ncard {MASKED}\ntwo\nlines\nno-pty-end\n".encode()
    assert f"castgate: blocked by rule no-rm-rf: rm -rf {victim}".encode() in p.err
    cast = sealed_cast(relay, "no-pty-start")
    text = cast.read_text()
    assert VISA not in text
    assert inputs(cast) == [
        "echo no-pty-start\n",
        f"rm -rf {victim}\n",
        f"echo card {MASKED}\n",
        "echo 'two\nlines'\n",
        "echo no-pty-end\n",
        "exit 3\n",
    ]
    outputs = "".join(str(e[2]) for e in events(cast) if e[1] == "o")
    assert "no-pty-start" in outputs and MASKED in outputs
    assert "blocked: no-rm-rf" in [e[2] for e in events(cast) if e[1] == "m"]
    row = logged(relay, cast, f"rm -rf {victim}")
    assert (row["action"], row["rule"]) == ("block", "no-rm-rf")
    assert logged(relay, cast, "echo no-pty-end")["action"] == "allow"


@pytest.mark.parametrize("command", ["bash -s", "sh", "bash"])
def test_an_exec_shell_reading_a_script_from_stdin(
    relay: Relay, victim: Path, command: str
) -> None:
    heredoc = "cat <<'EOF'\nhere-doc body line\nEOF\n"
    script = f"echo {command}-start\n{heredoc}rm -rf {victim}\necho {command}-end\nexit 7\n"
    res = relay.ssh("web", command, input=script.encode())
    assert res.returncode == 7, res.stderr
    assert victim.exists()
    assert res.stdout == f"{command}-start\nhere-doc body line\n{command}-end\n".encode()
    assert b"blocked by rule no-rm-rf" in res.stderr


def test_a_line_waiting_for_approval_holds_what_follows(relay: Relay) -> None:
    p = Proc(relay, ["-T", "web@127.0.0.1"])
    p.send(b"echo held-start\nsystemctl restart castgate-none 2>/dev/null; echo held-ran\n")
    p.send(b"echo held-after\n")
    approval = p.approval_id()
    p.expect(b"held-start\n")
    assert b"held-ran" not in p.out and b"held-after" not in p.out
    approve(relay, approval)
    p.expect(b"held-after\n")
    assert p.finish() == 0
    assert p.out == b"held-start\nheld-ran\nheld-after\n"
    cast = sealed_cast(relay, "held-start")
    markers = [str(e[2]) for e in events(cast) if e[1] == "m"]
    assert any("granted by alice" in m for m in markers)


def test_an_incomplete_last_line_is_opaque(relay: Relay, victim: Path) -> None:
    res = relay.ssh("locked", "bash -s", input=f"echo 'unclosed\nrm -rf {victim}\n".encode())
    assert victim.exists()
    assert b"blocked by rule castgate:opaque (incomplete at the end of the input)" in res.stderr


def test_shells_without_a_pty_can_be_refused(relay: Relay) -> None:
    for args in (["-T", "strict@127.0.0.1"], ["strict@127.0.0.1", "bash -s"]):
        p = Proc(relay, args)
        p.send(b"echo refused-shell-ran\n")
        assert p.finish() == 126
        assert b"refused-shell-ran" not in p.out
        assert b"is not allowed on target strict" in p.err


# -- class 2: interpreters started by exec --------------------------------------------


@pytest.mark.parametrize("command", ["bash -i", "sh", "script -q /dev/null"])
def test_an_exec_interpreter_with_a_pty_is_line_checked(
    relay: Relay, victim: Path, command: str
) -> None:
    tty = Tty(relay, command=command)
    tty.bash_prompt()
    tty.send(f"rm -rf {victim}\r".encode())
    tty.expect(b"blocked by rule no-rm-rf")
    assert victim.exists()
    mark = "interp-ok-" + command.split()[0]
    tty.send(f"echo {mark} {VISA}\r".encode())
    tty.expect(f"{mark} {MASKED}".encode())
    tty.exit()
    assert victim.exists()
    assert VISA.encode() not in tty.out
    cast = sealed_cast(relay, mark)
    assert VISA not in cast.read_text()
    assert f"rm -rf {victim}\n" in inputs(cast)
    assert logged(relay, cast, f"rm -rf {victim}")["action"] == "block"


@pytest.mark.parametrize("command", ["python3", "perl"])
def test_other_interpreters_are_opaque(relay: Relay, command: str) -> None:
    program = f"print('{command}-' . 'ran')\n" if command == "perl" else "print('python3-ran')\n"
    res = relay.ssh("locked", command, input=program.encode())
    assert res.returncode == 126
    assert f"{command}-ran".encode() not in res.stdout
    assert f"castgate: blocked by rule castgate:opaque (starts {command}".encode() in res.stderr


def test_an_approved_interpreter_is_fully_recorded(relay: Relay) -> None:
    p = Proc(relay, ["web@127.0.0.1", "python3"])
    approval = p.approval_id()
    approve(relay, approval)
    p.send(f"print('py-card', {VISA})\n".encode())
    assert p.finish() == 0
    assert p.out == f"py-card {MASKED}\n".encode()
    cast = sealed_cast(relay, "py-card")
    assert VISA not in cast.read_text()
    assert f"print('py-card', {MASKED})\n" in inputs(cast)


def test_interpreters_can_be_refused(relay: Relay) -> None:
    res = relay.ssh("strict", "python3", input=b"print('refused-py-ran')\n")
    assert res.returncode == 126
    assert b"refused-py-ran" not in res.stdout
    assert b"starting an interactive interpreter is not allowed on target strict" in res.stderr


# -- class 3: keys that run a line ------------------------------------------------------

# Each key the line editor may take as "run this line", with what the test types.
ACCEPT_KEYS = {
    "ctrl-m": b"\r",
    "ctrl-j": b"\n",
    "ctrl-o": b"\x0f",
    "keypad-enter": b"\x1bOM",
    "meta-enter": b"\x1b\r",
    "ctrl-d": b"\x04",
    "ctrl-x": b"\x18",
}


@pytest.mark.parametrize("key", list(ACCEPT_KEYS))
def test_every_key_that_can_run_a_line_checks_it_first(
    relay: Relay, victim: Path, key: str
) -> None:
    tty = Tty(relay)
    tty.bash_prompt()
    # Ctrl-D used to reset the line model: a space typed after it was taken for the
    # whole line, and Enter ran what the shell held.
    tty.send(f"rm -rf {victim}".encode() + ACCEPT_KEYS[key] + b" \r")
    tty.expect(b"blocked by rule no-rm-rf")
    tty.send(b"echo key-" + key.encode() + b"-done\r")
    tty.ran(b"key-" + key.encode() + b"-done")
    tty.exit()
    assert victim.exists()


def test_approval_rule_holds_a_line_run_by_ctrl_o(relay: Relay) -> None:
    tty = Tty(relay)
    tty.bash_prompt()
    tty.send(b"systemctl restart castgate-none 2>/dev/null; echo ctrl-o-approved\x0f")
    approve(relay, tty.approval_id())
    tty.ran(b"ctrl-o-approved")
    tty.exit()


@pytest.fixture
def editor(tmp_path: Path, victim: Path) -> Path:
    """An $EDITOR that rewrites whatever line it is given into the blocked command."""
    path = tmp_path / "editor.sh"
    path.write_text(f'#!/bin/sh\necho "rm -rf {victim}" > "$1"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("mode", ["emacs", "vi"])
def test_edit_and_execute_is_opaque(relay: Relay, victim: Path, editor: Path, mode: str) -> None:
    tty = Tty(relay, "locked")
    tty.bash_prompt()
    tty.send(f"export VISUAL={editor}; set -o {mode}\r".encode())
    tty.expect(b"cg> ", count=2)
    keys = b"\x18\x05" if mode == "emacs" else b"\x1bv"
    tty.send(b"echo harmless" + keys)
    tty.expect(b"blocked by rule castgate:opaque (edit-and-execute")
    tty.send(b"\x03echo after-edit\r")
    tty.ran(b"after-edit")
    tty.exit()
    assert victim.exists()


def test_zsh_meta_enter_makes_a_multi_line_buffer_opaque(relay: Relay, victim: Path) -> None:
    tty = Tty(relay, "locked", "zsh -f")
    tty.send(b"PS1='c''g> '\r")
    tty.expect(b"cg> ")
    # zsh inserts a newline at Meta-Enter; the buffer runs as two lines at Enter.
    tty.send(f"echo zsh-one\x1b\rrm -rf {victim}\r".encode())
    tty.expect(b"blocked by rule castgate:opaque")
    tty.send(b"echo zsh-ok\r")
    tty.ran(b"zsh-ok")
    tty.exit()
    assert victim.exists()


@pytest.mark.parametrize("shell", ["zsh -f", "dash"])
def test_other_shells_check_their_lines(relay: Relay, victim: Path, shell: str) -> None:
    tty = Tty(relay, "web", shell)
    tty.send(b"PS1='c''g> '\r")
    tty.expect(b"cg> ")
    tty.send(f"rm -rf {victim}\x04\r".encode())
    tty.expect(b"blocked by rule no-rm-rf")
    tty.send(b"echo shell-edit-ok\x7f\x7fOK\r")
    tty.ran(b"shell-edit-OK")
    tty.exit()
    assert victim.exists()


# -- class 5: typeahead and output while typing ------------------------------------------


@pytest.mark.parametrize("newline", [True, False])
def test_output_while_typing_makes_the_line_opaque(
    relay: Relay, victim: Path, tmp_path: Path, newline: bool
) -> None:
    go = tmp_path / "go"
    tick = "printf 'tick\\r\\n'" if newline else "printf tick"
    tty = Tty(relay, "locked")
    tty.bash_prompt()
    tty.send(f"(while [ ! -e {go} ]; do sleep 0.02; done; {tick}) &\r".encode())
    tty.expect(b"cg> ", count=2)
    tty.send(b"rm -r")
    tty.expect(b"cg> rm -r")
    go.touch()
    tty.expect(b"tick")
    tty.send(f"f {victim}\r".encode())
    tty.expect(b"blocked by rule castgate:opaque")
    tty.send(b"echo after-tick\r")
    tty.ran(b"after-tick")
    tty.exit()
    assert victim.exists()


def test_keys_sent_in_one_burst(relay: Relay, victim: Path) -> None:
    tty = Tty(relay)
    tty.bash_prompt()
    tty.send(f"echo burst-one\rrm -rf {victim}\recho burst-two\r".encode())
    tty.ran(b"burst-two")
    tty.exit()
    assert victim.exists()
    assert b"blocked by rule no-rm-rf" in tty.out
    assert re.search(rb"\rburst-one\r\n", tty.out)


REBINDS = [
    "stty intr undef",
    """bind '"\\C-m": "\\C-a rm -rf x; \\C-j"'""",
    "bindkey -s '^M' x",
]


@pytest.mark.parametrize("line", REBINDS)
def test_lines_that_rebind_keys_are_opaque(relay: Relay, line: str) -> None:
    tty = Tty(relay, "locked")
    tty.bash_prompt()
    tty.send(line.encode() + b"\r")
    tty.expect(b"blocked by rule castgate:opaque (")
    tty.send(b"stty sane\r")  # resetting the settings is fine
    tty.expect(b"cg> ", count=2)
    tty.send(b"echo rebind-ok\r")
    tty.ran(b"rebind-ok")
    tty.exit()


def test_an_ignored_discard_does_not_let_enter_run_the_line(relay: Relay, victim: Path) -> None:
    tty = Tty(relay)  # web: stty intr undef is held for approval
    tty.bash_prompt()
    tty.send(b"stty intr undef\r")
    approve(relay, tty.approval_id())
    tty.expect(b"cg> ", count=2)
    tty.send(f"rm -rf {victim}\r".encode())
    tty.expect(b"blocked by rule no-rm-rf")
    tty.send(b"\r")  # the relay's Ctrl-C did not discard the line
    tty.expect(b"(rule castgate:opaque), waiting (the shell did not answer")
    tty.proc.terminate()
    tty.finish()
    assert victim.exists()
    assert not re.search(rb"\rafter-undef\r\n", tty.out)


def test_history_expansion_is_opaque(relay: Relay, victim: Path) -> None:
    tty = Tty(relay, "locked", "bash -i")
    tty.bash_prompt()
    tty.send(f"history -s 'rm -rf {victim}'\r".encode())
    tty.expect(b"cg> ", count=2)
    tty.send(b"!!\r")
    tty.expect(b"blocked by rule castgate:opaque (history expansion")
    tty.exit()
    assert victim.exists()


def test_interactive_editing_and_history_still_work(relay: Relay) -> None:
    tty = Tty(relay)
    tty.bash_prompt()
    tty.send(b"echo edit-xx\x7f\x7fok\r")
    tty.ran(b"edit-ok")
    tty.send(b"\x1b[A\x01\x1b[C\x1b[C\x1b[C\x1b[C\x1b[C\x1b[3~\x05-again\r")
    tty.ran(b"dit-ok-again")
    tty.send(b"echo one; \x17two\r")
    tty.ran(b"two")
    tty.send(b"exit 5\r")
    assert tty.finish() == 5
    assert b"castgate:" not in tty.out


# -- class 4: binary channels only for exact commands ------------------------------------


@pytest.fixture
def pan_file(tmp_path: Path) -> Path:
    path = tmp_path / "cards.txt"
    path.write_text(f"card {VISA}\n")
    return path


def test_a_git_command_with_more_is_a_normal_command(relay: Relay, pan_file: Path) -> None:
    res = relay.ssh("web", f"git-upload-pack /nonexistent 2>/dev/null; cat {pan_file}")
    assert res.stdout == f"card {MASKED}\n".encode()
    cast = sealed_cast(relay, f"git-upload-pack /nonexistent 2>/dev/null; cat {pan_file}")
    text = cast.read_text()
    assert VISA not in text and MASKED in text
    assert "binary stream" not in text


@pytest.mark.parametrize(
    "command",
    ["scp -f {f}", "scp -v -f {f}", "scp -f '{f}'"],
)
def test_legacy_scp_is_refused_where_not_allowed(
    relay: Relay, pan_file: Path, command: str
) -> None:
    res = relay.ssh("web", command.format(f=pan_file), input=b"\x00\x00\x00")
    assert res.returncode == 126
    assert VISA.encode() not in res.stdout
    assert b"the legacy scp protocol is not enabled for target web" in res.stderr


def test_scp_with_more_is_a_normal_masked_command(relay: Relay, pan_file: Path) -> None:
    res = relay.ssh("files", f"scp -f {pan_file}; cat {pan_file}", input=b"\x00\x00\x00")
    assert VISA.encode() not in res.stdout
    assert f"card {MASKED}\n".encode() in res.stdout


def _scp_opts(relay: Relay) -> list[str]:
    """The relay's client options for scp and sftp, which spell the port -P."""
    return ["-P", str(relay.port), *relay.ssh_args()[2:]]


def _scp(relay: Relay, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["scp", "-O", "-q", *_scp_opts(relay), *args],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_scp_and_sftp_where_allowed_are_byte_exact(relay: Relay, tmp_path: Path) -> None:
    blob = os.urandom(200_000) + f"\ncard {VISA}\n".encode()
    src = tmp_path / "src.bin"
    src.write_bytes(blob)
    up = tmp_path / "uploaded.bin"
    res = _scp(relay, str(src), f"files@127.0.0.1:{up}")
    assert res.returncode == 0, res.stderr
    assert up.read_bytes() == blob
    down = tmp_path / "downloaded.bin"
    res = _scp(relay, f"files@127.0.0.1:{up}", str(down))
    assert res.returncode == 0, res.stderr
    assert down.read_bytes() == blob
    sftp_down = tmp_path / "sftp.bin"
    res = subprocess.run(
        ["sftp", "-q", *_scp_opts(relay), "-b", "-", "files@127.0.0.1"],
        input=f"get {up} {sftp_down}\n".encode(),
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert sftp_down.read_bytes() == blob
    cast = sealed_cast(relay, f"scp -f {up}")
    text = cast.read_text()
    assert VISA not in text
    assert not [e for e in events(cast) if e[1] in "io"]
    assert any("binary stream, not recorded" in str(e[2]) for e in events(cast))


def test_scp_client_where_legacy_scp_is_not_allowed(
    relay: Relay, pan_file: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "fetched.txt"
    res = _scp(relay, f"web@127.0.0.1:{pan_file}", str(dest))
    assert res.returncode != 0
    assert not dest.exists()
    assert b"the legacy scp protocol is not enabled for target web" in res.stderr
