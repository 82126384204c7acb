"""Terminal attacks on operators: a session prints OSC 52 clipboard writes, title
changes (OSC 0/2), OSC 8 hyperlinks, DCS, APC, PM and SOS strings, 8-bit C1 controls,
window operations and ENQ, some of them cut in two by a pause, and runs commands whose
text holds escape sequences. None of it reaches the operator's terminal through
``castgate watch``, the operator entry's ``watch``, ``castgate play`` (both emulators),
``castgate sessions``/``approvals``, or the console (sessions, approvals, live watch,
player), while the visible text does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import secrets
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from fcntl import ioctl
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

from console.api import ApiClient
from console.app import ConsoleApp
from console.screens.approvals import ApprovalsScreen
from console.screens.live import LiveScreen
from console.screens.player import PlayerScreen
from recorder.integrity import manifest_path
from tests.fix_relay import CASTGATE, TOKENS, Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget
from tests.unit.test_fuzz_neutralise import assert_safe

# The output, in parts printed with pauses between them so that a sequence cut in two
# arrives in two events.
PARTS = [
    b"visible-start\r\n\x1b]52;c;cm0gLXJmIC8=\x07",
    b"\x1b",
    b"]0;pwned-title\x07\x1b]2;pwned-title\x1b\\",
    b'\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07\r\n\x1bP$q"p\x1b\\',
    b"\x1b_apc-payload\x1b\\\x1b^pm-payload\x1b\\\x1bXsos-payload\x1b\\\xc2\x9d",
    b"52;c;YzE=\xc2\x9c\xc2\x90dcs8-payload\xc2\x9c\xc2\x85\x1b[21t\x1b[8;200;200t\x05",
    b"\x1b[31mvisible-end\x1b[0m\r\n",
]
# A command whose own text would redraw the approver's line and set the title.
SNEAKY = "\x1b]0;cmd-title\x07\x1b[2K\r"


@pytest.fixture(scope="module")
def relay(sshd_target: SshTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    r = start_relay(tmp_path_factory.mktemp("hostile-term"), sshd_target)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Commands printing PARTS with pauses, from files on the target (the target is
    local). Sent as the exec command itself, not as a script file, which the relay
    would hold for approval (it cannot see what a script runs)."""
    d = tmp_path_factory.mktemp("parts")
    lines = ["sleep 3"]
    for i, part in enumerate(PARTS):
        (d / f"p{i}").write_bytes(part)
        lines += [f"cat {d / f'p{i}'}", "sleep 0.3"]
    lines.append("sleep 2")
    return "; ".join(lines)


def api_sessions(relay: Relay, live: bool) -> list[dict[str, Any]]:
    import urllib.request

    req = urllib.request.Request(
        f"{relay.api}/api/v1/sessions" + ("?live=true" if live else ""),
        headers={"Authorization": f"Bearer {TOKENS['alice']}"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return list(json.loads(r.read())["sessions"])


def start_hostile(relay: Relay, script: str) -> tuple[subprocess.Popen[bytes], str]:
    """Run the script through the relay; returns the agent process and the session id."""
    # Letters only: a run of 13+ digits could be Luhn-valid and come back masked.
    tag = "hostile-" + secrets.token_hex(8).translate(str.maketrans("0123456789", "ghijklmnop"))
    agent = subprocess.Popen(
        ["ssh", *relay.ssh_args(), "web@127.0.0.1", f"{script} # {tag} {SNEAKY}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    found: list[str] = []

    def live() -> bool:
        found[:] = [s["id"] for s in api_sessions(relay, True) if tag in (s.get("title") or "")]
        return bool(found)

    wait_for(live, 20)
    return agent, found[0]


def assert_visible(out: str) -> None:
    assert "visible-start" in out and "visible-end" in out and "click" in out


def test_castgate_watch_and_the_operator_entry(relay: Relay, script: str) -> None:
    agent, sid = start_hostile(relay, script)
    env = {**os.environ, "CASTGATE_TOKEN": TOKENS["alice"]}
    watch = subprocess.Popen(
        [CASTGATE, "watch", sid, "-c", str(relay.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert relay.operator_key is not None
    operator = subprocess.Popen(  # stdin open: its end would stop the watch
        ["ssh", *relay.ssh_args(relay.operator_key), "castgate@127.0.0.1", f"watch {sid}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    agent_out, _ = agent.communicate(timeout=60)
    assert b"\x1b]52;c;cm0gLXJmIC8=" in agent_out  # the agent gets its bytes as they were
    for proc in (watch, operator):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        text = out.decode("utf-8", "replace")
        assert_safe(text)
        assert_visible(text)
    # The listings show the sneaky command as plain text.
    for args in (["sessions"], ["approvals", "--all"]):
        res = subprocess.run(
            [CASTGATE, *args, "-c", str(relay.config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        assert "\x1b" not in res.stdout and "\r" not in res.stdout


def _pty_run(argv: list[str], timeout: float = 60) -> str:
    """Run ``argv`` with a 100x30 terminal; returns everything it wrote."""
    master, slave = pty.openpty()
    ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break  # the child closed the terminal
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"{argv} did not finish: {bytes(out[-300:])!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(master)
    assert proc.returncode == 0, bytes(out[-500:])
    return out.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def hostile_cast(relay: Relay, script: str) -> Path:
    """The sealed recording of one hostile session."""
    agent, sid = start_hostile(relay, script)
    agent.communicate(timeout=60)
    cast = relay.recordings() / f"{sid}.cast"
    wait_for(lambda: manifest_path(cast).exists(), 20)
    return cast


@pytest.mark.parametrize("backend", ["avt", "pyte"])
def test_castgate_play(hostile_cast: Path, tmp_path: Path, backend: str) -> None:
    recorded = hostile_cast
    assert b"\\u001b]52;c;cm0gLXJmIC8=" in recorded.read_bytes()  # the cast keeps them
    # A cast from anywhere: hostile markers and title as well.
    crafted = tmp_path / "crafted.cast"
    events = [[0.1, "o", part.decode()] for part in PARTS]
    # (the marker is drawn as plain text: its payload may show, its controls may not)
    events.append([0.2, "m", "marker \x1b]52;c;bWFya2Vy\x07 \x9d0;marker-title\x9c"])
    events.append([0.3, "o", "visible-after-marker\r\n"])
    header = {"version": 2, "width": 80, "height": 20, "title": "\x1b]0;pwned-title\x07"}
    crafted.write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n")
    for cast in (recorded, crafted):
        out = _pty_run([CASTGATE, "play", str(cast), "--speed", "50", "--backend", backend])
        # pyte knows no DCS/APC/PM/SOS strings and draws their payload as text: plain
        # characters on the screen, no sequence reaches the viewer's terminal.
        assert_safe(out, payloads=backend == "avt")
        assert "visible-end" in out


SIZE = (160, 48)


async def _until(pilot: Pilot[Any], check: Callable[[], Any], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await pilot.pause(0.05)
    pytest.fail("the console did not get there in time")


def _drawn(app: ConsoleApp) -> str:
    """Everything the console would write to the terminal for its current screen."""
    update = app.screen._compositor.render_full_update()
    return update.render_segments(app.console)


def _rows(table: DataTable[Any]) -> list[str]:
    return [" ".join(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]


def test_the_console(relay: Relay, script: str) -> None:
    # A pending approval whose command carries escape sequences.
    held = subprocess.Popen(
        ["ssh", *relay.ssh_args(), "web@127.0.0.1", f"systemctl restart app {SNEAKY}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent, sid = start_hostile(relay, script)

    async def scenario() -> None:
        app = ConsoleApp(ApiClient(relay.api, TOKENS["alice"]), poll_interval=0.3)
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one("#sessions", DataTable)
            await _until(pilot, lambda: any(sid[:8] in r or "hostile-" in r for r in _rows(table)))
            assert_safe(_drawn(app))  # the sneaky command in the title column
            # The live watch of the hostile session.
            row = next(i for i, r in enumerate(_rows(table)) if "hostile-" in r and "live" in r)
            table.move_cursor(row=row)
            await pilot.press("enter")
            await _until(pilot, lambda: isinstance(app.screen, LiveScreen))
            await _until(pilot, lambda: "visible-end" in _drawn(app), 30)
            assert_safe(_drawn(app))
            await pilot.press("escape")
            # The approvals queue, and the notification of the new request.
            await pilot.press("f3")
            await _until(pilot, lambda: isinstance(app.screen, ApprovalsScreen))
            queue = app.screen.query_one("#approvals", DataTable)
            await _until(pilot, lambda: any("systemctl restart app" in r for r in _rows(queue)))
            assert_safe(_drawn(app))
            assert "\x1b[2K" not in _drawn(app)
            await pilot.press("f2")
            # The player of the finished session.
            await asyncio.to_thread(agent.communicate, None, 60)
            await asyncio.to_thread(
                wait_for, lambda: manifest_path(relay.recordings() / f"{sid}.cast").exists(), 20
            )
            table = app.screen.query_one("#sessions", DataTable)
            await _until(
                pilot,
                lambda: any("hostile-" in r and "closed" in r for r in _rows(table)),
            )
            row = next(i for i, r in enumerate(_rows(table)) if "hostile-" in r and "closed" in r)
            table.move_cursor(row=row)
            await pilot.press("enter")
            await _until(pilot, lambda: isinstance(app.screen, PlayerScreen))
            player = app.screen
            assert isinstance(player, PlayerScreen)
            await _until(pilot, lambda: player.index is not None)
            player.seek(player.index.duration if player.index else 0)
            await _until(pilot, lambda: "visible-end" in _drawn(app))
            assert_safe(_drawn(app))

    try:
        asyncio.run(scenario())
    finally:
        for proc in (held, agent):
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)
