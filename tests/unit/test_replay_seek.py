"""Seek correctness: for random times in generated casts (full-screen apps on the
alternate screen, scrolling output, resizes, wide characters and emoji, escape
sequences cut by event boundaries), the screen after a seek equals the screen after
feeding everything from the start. And the index is rebuilt, never trusted, when it
or the cast changed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.castfile import CastFile
from replay.seekindex import (
    advance,
    build_index,
    index_path,
    load_or_create_key,
    open_index,
    start,
)

WORDS = [
    "make",
    "ok",
    "中文字",
    "\u2764\ufe0f",
    "\U0001f469\u200d\U0001f4bb",
    "e\u0301",
    "\uff46\uff55\uff4c\uff4c",
]


@st.composite
def shell_output(draw: st.DrawFn) -> str:
    lines = draw(st.lists(st.lists(st.sampled_from(WORDS), max_size=12), min_size=1, max_size=8))
    color = draw(st.integers(0, 7))
    return "".join(f"\x1b[3{color}m$\x1b[0m {' '.join(words)}\r\n" for words in lines)


@st.composite
def full_screen_app(draw: st.DrawFn) -> str:
    enter, leave = draw(
        st.sampled_from(
            [
                ("\x1b[?1049h", "\x1b[?1049l"),
                ("\x1b[?1047h", "\x1b[?1047l"),
                ("\x1b[?47h", "\x1b[?47l"),
            ]
        )
    )
    frames = []
    for _ in range(draw(st.integers(1, 4))):
        row, col = draw(st.integers(1, 30)), draw(st.integers(1, 90))
        text = " ".join(draw(st.lists(st.sampled_from(WORDS), max_size=6)))
        extra = draw(st.sampled_from(["", "\x1b[2;5r\x1bM", "\x1b7\x1b[1;1H*\x1b8", "\x1b[r"]))
        frames.append(f"\x1b[{row};{col}H\x1b[1;44m{text}\x1b[0m\x1b[K{extra}")
    return enter + "\x1b[H\x1b[2J" + "".join(frames) + leave * draw(st.integers(0, 1))


chunk = st.one_of(
    shell_output(),
    full_screen_app(),
    st.sampled_from(["\x1b[?25l", "\x1b[?25h", "x" * 130, "\x1b]0;title\x07", "\r\x1b[K"]),
)

event = st.one_of(
    chunk.map(lambda text: ("o", text)),
    st.tuples(st.integers(10, 120), st.integers(3, 40)).map(lambda s: ("r", f"{s[0]}x{s[1]}")),
    st.just(("m", "approval #7 granted by alice")),
)


@st.composite
def casts(draw: st.DrawFn) -> list[tuple[float, str, str]]:
    """Events with times; output chunks are split at arbitrary points, inside escape
    sequences and between the halves of a surrogate-free character sequence alike."""
    events: list[tuple[float, str, str]] = []
    t = 0.0
    for code, data in draw(st.lists(event, min_size=1, max_size=25)):
        pieces = [data]
        if code == "o" and len(data) > 1:
            cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=3))))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        for piece in pieces:
            t += draw(st.sampled_from([0.0, 0.001, 0.05, 0.5, 3.0]))
            events.append((round(t, 6), code, piece))
    return events


def write_cast(path: Path, events: list[tuple[float, str, str]], version: int = 2) -> None:
    if version == 2:
        lines = [json.dumps({"version": 2, "width": 80, "height": 24})]
        lines += [json.dumps([t, c, d]) for t, c, d in events]
    else:
        lines = [json.dumps({"version": 3, "term": {"cols": 80, "rows": 24}}), "# comment"]
        prev = 0.0
        for t, c, d in events:
            lines.append(json.dumps([round(t - prev, 6), c, d]))
            prev = t
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def screen_from_start(path: Path, t: float, backend: str | None = None) -> object:
    cast = CastFile(path)
    head = start(cast, backend)
    advance(head, cast, until=t)
    return head.terminal.screen()


def check_seeks(path: Path, times: list[float], backend: str | None) -> None:
    index = build_index(path, backend=backend, every_bytes=300, every_events=3, every_seconds=1)
    assert len(index.keyframes) > 1 or index.events < 4
    for t in times:
        assert index.seek(t).terminal.screen() == screen_from_start(path, t, backend), t


@pytest.mark.parametrize(("backend", "examples"), [("avt", 80), ("pyte", 12)])
@pytest.mark.parametrize("version", [2, 3])
def test_seek_equals_feeding_from_the_start(backend: str, examples: int, version: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(events=casts(), data=st.data())
    def run(events: list[tuple[float, str, str]], data: st.DataObject) -> None:
        end = events[-1][0]
        times = data.draw(st.lists(st.floats(0, end + 1), min_size=1, max_size=6), label="times")
        times += [events[len(events) // 2][0], end]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.cast"
            write_cast(path, events, version)
            check_seeks(path, times, backend)

    run()


def test_keyframes_wait_for_the_end_of_an_escape_sequence(tmp_path: Path) -> None:
    path = tmp_path / "cut.cast"
    events = [(0.1 * i, "o", "\x1b[3" if i % 2 else "1mtext\r\n") for i in range(1, 40)]
    write_cast(path, events)
    index = build_index(path, every_events=1, every_bytes=1, every_seconds=1000)
    # Only after the even events (the sequence complete) may a keyframe be taken.
    assert all(k.events % 2 == 0 for k in index.keyframes)
    assert len(index.keyframes) > 10
    for t in (0.15, 1.05, 2.0, 3.95):
        assert index.seek(t).terminal.screen() == screen_from_start(path, t)


def sample_cast(path: Path) -> None:
    events = [(0.5 * i, "o", f"line {i}\r\n") for i in range(1, 200)]
    events.insert(50, (25.0, "m", "blocked: no-drop-database"))
    write_cast(path, events)


def test_index_is_reused_and_rebuilt_when_stale(tmp_path: Path) -> None:
    cast = tmp_path / "a.cast"
    sample_cast(cast)
    key = load_or_create_key(tmp_path / "keys")
    first = open_index(cast, key=key)
    assert first.rebuilt == "no index yet"
    assert index_path(cast).stat().st_mode & 0o777 == 0o600
    assert [m.label for m in first.markers] == ["blocked: no-drop-database"]
    again = open_index(cast, key=key)
    assert again.rebuilt is None
    assert again.seek(30.0).terminal.screen() == screen_from_start(cast, 30.0)
    # Same size, different bytes.
    cast.write_bytes(cast.read_bytes().replace(b"line 7\\r", b"LINE 7\\r"))
    stale = open_index(cast, key=key)
    assert stale.rebuilt is not None and "SHA-256" in stale.rebuilt
    assert stale.seek(3.6).terminal.lines()[6] == "LINE 7"
    with cast.open("ab") as fh:
        fh.write(b'[200.0, "o", "appended\\r\\n"]\n')
    grown = open_index(cast, key=key)
    assert grown.rebuilt is not None and "size" in grown.rebuilt


def test_tampered_or_foreign_index_is_rebuilt(tmp_path: Path) -> None:
    cast = tmp_path / "a.cast"
    sample_cast(cast)
    key = load_or_create_key(tmp_path / "keys")
    honest = open_index(cast, key=key)
    t = 40.0
    expected = honest.seek(t).terminal.screen()
    data = bytearray(index_path(cast).read_bytes())
    data[len(data) // 2] ^= 0x01
    index_path(cast).write_bytes(bytes(data))
    rebuilt = open_index(cast, key=key)
    assert rebuilt.rebuilt is not None and "integrity" in rebuilt.rebuilt
    assert rebuilt.seek(t).terminal.screen() == expected
    # An index built with another installation's key is not trusted either.
    build_index(cast, key=os.urandom(32))
    assert open_index(cast, key=key).rebuilt is not None
    # Nor one built without a key (a plain checksum anyone can recompute).
    build_index(cast, key=None)
    assert "integrity" in (open_index(cast, key=key).rebuilt or "")


def test_unwritable_index_location_still_seeks(tmp_path: Path) -> None:
    cast = tmp_path / "a.cast"
    sample_cast(cast)
    # A directory where the index file would go: writing fails even for root, the way
    # a read-only evidence medium makes it fail.
    index_path(cast).mkdir()
    index = open_index(cast)
    assert index.rebuilt is not None
    assert index_path(cast).is_dir()
    assert index.seek(10).terminal.lines()[0] == "line 1"


def test_index_is_small_and_seeks_use_nearby_keyframes(tmp_path: Path) -> None:
    cast = tmp_path / "big.cast"
    events = [(0.01 * i, "o", f"\x1b[3{i % 8}mrow {i} " + "x" * 100 + "\r\n") for i in range(20000)]
    write_cast(cast, events)
    index = build_index(cast, every_bytes=64 << 10)
    assert index.size_bytes < cast.stat().st_size * 0.05
    kf = index.keyframe_at(150.0)
    assert 0 < 150.0 - kf.time < 10
