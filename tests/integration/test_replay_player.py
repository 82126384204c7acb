"""``castgate play`` as a person uses it: in tmux, keys sent with send-keys, the screen
read with capture-pane."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CASTGATE = str(Path(sys.executable).parent / "castgate")


def write_clock_cast(path: Path, seconds: int = 120) -> None:
    """One full screen per second: ``T=0042`` and a line of wide text; markers at
    30.5 s and 80.5 s."""
    lines = [json.dumps({"version": 2, "width": 60, "height": 12, "title": "clock"})]
    for s in range(seconds):
        screen = f"\x1b[H\x1b[2J\x1b[1;33mT={s:04d}\x1b[0m\r\nsecond {s} 中文 \u2764\ufe0f\r\n"
        lines.append(json.dumps([float(s), "o", screen]))
        if s == 30:
            lines.append(json.dumps([30.5, "m", "deploy approved"]))
        if s == 80:
            lines.append(json.dumps([80.5, "m", "blocked: drop"]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class Tmux:
    """A private tmux server (own socket) running one window; killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.socket = f"castgate-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.tmp = tmp

    def run(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        ).stdout

    def start(self, command: str) -> None:
        env = f"TERM=xterm-256color CASTGATE_HOME={self.tmp}"
        script = f"env {env} {command}; echo PLAYER-EXITED; sleep 60"
        self.run("new-session", "-d", "-s", "t", "-x", "100", "-y", "30", script)

    def screen(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "t").splitlines()

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def wait(self, pred: Callable[[list[str]], bool], what: str, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        screen = self.screen()
        while not pred(screen):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; screen:\n" + "\n".join(screen))
            time.sleep(0.05)
            screen = self.screen()
        return screen

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=20)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.kill()


def clock(screen: list[str]) -> int | None:
    for line in screen:
        if line.startswith("T="):
            return int(line[2:6])
    return None


def status(screen: list[str]) -> str:
    return next((line for line in screen if " / 01:59" in line), "")


def test_pause_seek_markers_step_and_quit(tmux: Tmux, tmp_path: Path) -> None:
    cast = tmp_path / "clock.cast"
    write_clock_cast(cast)
    tmux.start(f"{CASTGATE} play {cast} --from 10")
    screen = tmux.wait(lambda s: clock(s) is not None, "the first frame")
    assert clock(screen) in (10, 11)
    assert "second" in screen[1] and "中文" in screen[1]
    # The status line sits under the 12-row recording.
    assert "playing" in screen[12] and "q quit" in screen[12]

    # Playing: the clock moves.
    start = clock(screen)
    assert start is not None
    tmux.wait(lambda s: (clock(s) or 0) >= start + 1, "playback to advance")

    # space pauses: the frame stays put.
    tmux.keys("Space")
    screen = tmux.wait(lambda s: "paused" in status(s), "paused")
    paused_at = clock(screen)
    assert paused_at is not None
    time.sleep(1.3)
    assert clock(tmux.screen()) == paused_at

    # right/left seek 5 s.
    tmux.keys("Right")
    screen = tmux.wait(lambda s: clock(s) == paused_at + 5, "+5 s")
    assert "paused" in status(screen)
    tmux.keys("Left")
    tmux.wait(lambda s: clock(s) == paused_at, "-5 s")

    # ] and [ jump between markers.
    tmux.keys("]")
    screen = tmux.wait(lambda s: clock(s) == 30, "the first marker")
    assert "deploy approved" in status(screen)
    tmux.keys("]")
    screen = tmux.wait(lambda s: clock(s) == 80, "the second marker")
    assert "blocked: drop" in status(screen)
    tmux.keys("]")
    tmux.wait(lambda s: "no next marker" in status(s), "no next marker")
    tmux.keys("[")
    screen = tmux.wait(lambda s: clock(s) == 30, "back to the first marker")
    assert "deploy approved" in status(screen)

    # . steps one event (the next second).
    tmux.keys(".")
    tmux.wait(lambda s: clock(s) == 31, "one step")
    tmux.keys(".")
    tmux.wait(lambda s: clock(s) == 32, "another step")

    # space resumes.
    tmux.keys("Space")
    tmux.wait(lambda s: (clock(s) or 0) >= 33 and "playing" in status(s), "playing again")

    # q quits and gives the terminal back as it was.
    tmux.keys("q")
    screen = tmux.wait(lambda s: any("PLAYER-EXITED" in line for line in s), "the player to exit")
    assert clock(screen) is None
    assert tmux.run("display", "-p", "-t", "t", "#{alternate_on} #{cursor_flag}").split() == [
        "0",
        "1",
    ]


def test_speed_and_idle_limit_reach_the_end(tmux: Tmux, tmp_path: Path) -> None:
    cast = tmp_path / "idle.cast"
    events = [
        [0.5, "o", "before the pause\r\n"],
        [3600.0, "o", "an hour later\r\n"],
        [3601.0, "o", "done\r\n"],
    ]
    header = {"version": 2, "width": 40, "height": 5}
    cast.write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n")
    began = time.monotonic()
    tmux.start(f"{CASTGATE} play {cast} --idle-limit 0.5 --speed 2")
    tmux.wait(lambda s: any("PLAYER-EXITED" in line for line in s), "the end", timeout=15)
    # 0.5 + 0.5 + 0.5 seconds of recording at 2x, plus start-up: far less than an hour.
    assert time.monotonic() - began < 10


def test_ctrl_c_restores_the_terminal(tmux: Tmux, tmp_path: Path) -> None:
    cast = tmp_path / "clock.cast"
    write_clock_cast(cast)
    tmux.start(f"{CASTGATE} play {cast}")
    tmux.wait(lambda s: clock(s) is not None, "the first frame")
    assert tmux.run("display", "-p", "-t", "t", "#{alternate_on}").strip() == "1"
    tmux.keys("C-c")
    tmux.wait(lambda s: any("PLAYER-EXITED" in line for line in s), "the player to exit")
    assert tmux.run("display", "-p", "-t", "t", "#{alternate_on} #{cursor_flag}").split() == [
        "0",
        "1",
    ]


def test_play_refuses_a_missing_recording(tmp_path: Path) -> None:
    res = subprocess.run(
        [CASTGATE, "play", str(tmp_path / "nope.cast")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "no such file" in res.stderr
