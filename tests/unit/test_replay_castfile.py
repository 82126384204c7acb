"""Reading casts from any recorder: v2, v3 (intervals, comments, exit events), v1,
torn last lines, and files that are not casts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replay.castfile import CastFile, CastFormatError, Event, parse_size, read_events


def test_v2_absolute_times_never_go_backwards(tmp_path: Path) -> None:
    path = tmp_path / "a.cast"
    path.write_text(
        '{"version": 2, "width": 80, "height": 24, "title": "t", "env": {"TERM": "xterm"}}\n'
        '[0.5, "o", "a"]\n[0.25, "o", "b"]\n[1.0, "r", "100x30"]\n[2, "m", "mark"]\n'
    )
    header, events = read_events(path)
    assert (header.version, header.width, header.height, header.title) == (2, 80, 24, "t")
    assert header.term_type == "xterm"
    assert events == [
        Event(0.5, "o", "a"),
        Event(0.5, "o", "b"),
        Event(1.0, "r", "100x30"),
        Event(2.0, "m", "mark"),
    ]


def test_v3_intervals_comments_and_exit(tmp_path: Path) -> None:
    path = tmp_path / "b.cast"
    path.write_text(
        '{"version": 3, "term": {"cols": 90, "rows": 30, "type": "xterm-256color"},'
        ' "timestamp": 1504467315, "idle_time_limit": 2}\n'
        "# event stream follows the header\n"
        '[0.248, "o", "Hello"]\n[1.001, "o", " world"]\n\n'
        '[2.05, "r", "100x40"]\n[0.5, "x", "0"]\n'
    )
    cast = CastFile(path)
    assert (cast.version, cast.header.width, cast.header.height) == (3, 90, 30)
    assert cast.header.idle_time_limit == 2
    events = [ev for _, ev in cast.events()]
    assert [e.code for e in events] == ["o", "o", "r", "x"]
    assert events[1].time == pytest.approx(1.249)
    assert events[3].time == pytest.approx(3.799)
    # Resuming from a position continues the intervals from the time given.
    positions = [pos for pos, _ in cast.events()]
    rest = [ev for _, ev in cast.events(positions[1], events[1].time)]
    assert rest == events[2:]


def test_v1_frames(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    doc = {
        "version": 1,
        "width": 40,
        "height": 10,
        "duration": 1.5,
        "stdout": [[0.25, "one\r\n"], [1.25, "two"]],
    }
    path.write_text(json.dumps(doc, indent=2))
    header, events = read_events(path)
    assert header.version == 1
    assert events == [Event(0.25, "o", "one\r\n"), Event(1.5, "o", "two")]


def test_torn_last_line_ends_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "d.cast"
    path.write_text('{"version": 2, "width": 8, "height": 2}\n[0.1, "o", "ok"]\n[0.2, "o", "cu')
    cast = CastFile(path)
    assert [ev.data for _, ev in cast.events()] == ["ok"]
    assert cast.torn
    # A complete last line without its newline is not torn.
    path.write_text('{"version": 2, "width": 8, "height": 2}\n[0.1, "o", "ok"]')
    cast = CastFile(path)
    assert [ev.data for _, ev in cast.events()] == ["ok"] and not cast.torn


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("hello\n", "not an asciicast"),
        ('{"version": 5, "width": 1, "height": 1}\n', "unsupported asciicast version"),
        ('{"version": 2, "height": 1}\n', "terminal size"),
        ('{"version": 3, "term": {"cols": 0, "rows": 3}}\n', "not positive"),
        ('{"version": 2, "width": 8, "height": 2}\nnot json\n[1, "o", "x"]\n', "byte 40"),
    ],
)
def test_not_a_cast_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.cast"
    path.write_text(content)
    with pytest.raises(CastFormatError, match=message) as info:
        read_events(path)
    assert "\n" not in str(info.value)


def test_parse_size() -> None:
    assert parse_size("120x40") == (120, 40)
    assert parse_size("0x40") is None
    assert parse_size("wide") is None
