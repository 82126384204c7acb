"""The player's state machine without a terminal: keys, markers, timing with speed and
idle limit, and what it draws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replay.player import Options, Player, fmt_time, parse_keys, render_row
from replay.seekindex import build_index
from replay.terminal import AvtTerminal


def make(tmp_path: Path, options: Options | None = None) -> Player:
    path = tmp_path / "p.cast"
    lines = [json.dumps({"version": 2, "width": 20, "height": 3})]
    for s in range(60):
        lines.append(json.dumps([float(s), "o", f"\x1b[H\x1b[2JT={s:02d}"]))
    lines.insert(21, json.dumps([20.5, "m", "first"]))
    lines.insert(42, json.dumps([40.5, "m", "second"]))
    path.write_text("\n".join(lines) + "\n")
    return Player(build_index(path, write=False), options or Options(), wall=100.0)


def shown(p: Player) -> str:
    return p.terminal.lines()[0]


def test_parse_keys() -> None:
    assert parse_keys(b" .q") == ["space", "step", "quit"]
    assert parse_keys(b"\x1b[C\x1b[D\x1bOC") == ["right", "left", "right"]
    assert parse_keys(b"][\x03x\x1b[A") == ["next-marker", "prev-marker", "quit"]


def test_clock_follows_wall_time_with_speed(tmp_path: Path) -> None:
    p = make(tmp_path, Options(speed=2.0, start=10))
    assert shown(p) == "T=10"
    p.tick(100.0 + 2.6)  # 5.2 s of recording
    assert shown(p) == "T=15" and p.now == pytest.approx(15.2)
    assert p.due_in(102.6) == pytest.approx(0.4)


def test_pause_step_seek_and_markers(tmp_path: Path) -> None:
    p = make(tmp_path, Options(start=10.5))
    p.key("space", 100.0)
    p.tick(200.0)
    assert p.paused and shown(p) == "T=10"
    p.key("step", 200.0)
    assert shown(p) == "T=11"
    p.key("right", 200.0)
    assert shown(p) == "T=16"
    p.key("left", 200.0)
    p.key("left", 200.0)
    assert shown(p) == "T=06"
    p.key("next-marker", 200.0)
    assert p.now == 20.5 and shown(p) == "T=20" and p.message == "marker: first"
    p.key("next-marker", 200.0)
    assert p.now == 40.5 and p.message == "marker: second"
    p.key("next-marker", 200.0)
    assert p.message == "no next marker"
    p.key("prev-marker", 200.0)
    assert p.now == 20.5
    p.key("prev-marker", 200.0)
    assert p.message == "no previous marker"
    p.key("left", 200.0)
    p.key("left", 200.0)
    assert p.now == pytest.approx(10.5)
    assert p.key("quit", 200.0) is False


def test_idle_limit_shortens_long_pauses(tmp_path: Path) -> None:
    path = tmp_path / "idle.cast"
    rows = [{"version": 2, "width": 10, "height": 2}, [1, "o", "a"], [1001, "o", "b"]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = Player(build_index(path, write=False), Options(idle_limit=2.0), wall=0.0)
    p.tick(1.0)
    assert shown(p) == "a"
    assert p.due_in(1.0) == pytest.approx(2.0)
    p.tick(2.0)
    assert p.now == pytest.approx(501.0)  # halfway through the shortened pause
    p.tick(3.01)
    assert shown(p) == "ab"
    p.tick(3.02)
    assert p.finished


def test_frame_draws_changed_rows_and_status(tmp_path: Path) -> None:
    p = make(tmp_path, Options(start=5))
    first = p.frame(40, 10)
    assert "\x1b[2J" in first and "T=05" in first and "00:05 / 00:59" in first
    again = p.frame(40, 10)
    assert "T=05" not in again  # unchanged rows are not redrawn
    # A viewer smaller than the recording: the status line takes the last row.
    small = p.frame(10, 3, full=True)
    assert "\x1b[3;1H" in small
    # A fresh pty reports 0x0: still one row and the status line, no crash.
    tiny = p.frame(0, 0, full=True)
    assert "\x1b[1;1H" in tiny and "\x1b[2;1H" in tiny


def test_render_row_styles_and_clipping() -> None:
    term = AvtTerminal(10, 1)
    term.feed("\x1b[31mab\x1b[0m中c")
    row = term.cells()[0]
    assert render_row(row, 10) == "\x1b[0;31mab\x1b[0m中c"
    assert render_row(row, 3) == "\x1b[0;31mab\x1b[0m"  # the wide character does not fit


def test_fmt_time() -> None:
    assert fmt_time(5) == "00:05"
    assert fmt_time(3725) == "1:02:05"
