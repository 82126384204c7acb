"""The terminal model: what avt's dump keeps and what the snapshot adds, the parser
state that decides where snapshots may be taken, and the pyte fallback's fixes."""

from __future__ import annotations

import avt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.terminal import (
    GROUND,
    AvtTerminal,
    PyteTerminal,
    Style,
    Terminal,
    backend_class,
    parser_state_after,
)

BACKENDS: list[type[Terminal]] = [AvtTerminal, PyteTerminal]

# Pieces of terminal output that exercise every kind of state a snapshot must carry.
PIECES = [
    "hello",
    "$ make\r\nbuilding target one\r\nbuilding target two\r\n",
    "wide 中文字",
    "emoji \u2764\ufe0f \U0001f469\u200d\U0001f4bb x",
    "e\u0301",
    "\r\n",
    "\n",
    "\r",
    "\t",
    "\b",
    "\x1b[1;31;44m",
    "\x1b[38;5;208m",
    "\x1b[48;2;1;2;3m",
    "\x1b[0m",
    "\x1b[J",
    "\x1b[1J",
    "\x1b[2J",
    "\x1b[K",
    "\x1b[1K",
    "\x1b[H",
    "\x1b[3;5H",
    "\x1b[8;2H",
    "\x1b[2;6r",
    "\x1b[r",
    "\x1b[?6h",
    "\x1b[?6l",
    "\x1b[?7l",
    "\x1b[?7h",
    "\x1b[4h",
    "\x1b[4l",
    "\x0e",
    "\x0f",
    "\x1b(0",
    "\x1b(B",
    "\x1b)0",
    "lqqk",
    "\x1bH",
    "\x1b[3g",
    "\x1b7",
    "\x1b8",
    "\x1b[?47h",
    "\x1b[?47l",
    "\x1b[?1047h",
    "\x1b[?1047l",
    "\x1b[?1049h",
    "\x1b[?1049l",
    "\x1b[?25l",
    "\x1b[?25h",
    "\x1bM",
    "\x1b[2L",
    "\x1b[2M",
    "\x1b[3@",
    "\x1b[2P",
    "\x1b[4X",
    "\x1b[S",
    "\x1b[T",
    "\x1b[3b",
    "x" * 30,
    "\x1b]0;title\x07",
]

piece = st.sampled_from(PIECES).map(lambda s: ("o", s))
resize = st.tuples(st.integers(2, 30), st.integers(2, 12)).map(lambda s: ("r", s))
# A full-screen app that the window is resized under: the case avt's dump alone gets
# wrong, made common enough for the search to hit.
scene = st.tuples(
    st.sampled_from(
        [("\x1b[?1049h", "\x1b[?1049l"), ("\x1b[?1047h", "\x1b[?1047l"), ("\x1b[?47h", "\x1b[?47l")]
    ),
    st.lists(st.one_of(piece, resize), max_size=6),
).map(lambda s: [("o", s[0][0]), *s[1], ("o", s[0][1])])
ops = st.lists(
    st.one_of(piece.map(lambda p: [p]), resize.map(lambda r: [r]), scene),
    min_size=1,
    max_size=30,
).map(lambda groups: [op for group in groups for op in group])


def apply(term: Terminal, seq: list[tuple[str, object]]) -> None:
    for kind, data in seq:
        if kind == "o":
            assert isinstance(data, str)
            term.feed(data)
        else:
            assert isinstance(data, tuple)
            term.resize(*data)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.backend)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=ops, size=st.tuples(st.integers(2, 30), st.integers(2, 12)), data=st.data())
def test_snapshot_then_rest_equals_feeding_everything(
    backend: type[Terminal],
    seq: list[tuple[str, object]],
    size: tuple[int, int],
    data: st.DataObject,
) -> None:
    cut = data.draw(st.integers(0, len(seq)), label="cut")
    whole = backend(*size)
    apply(whole, seq)
    head = backend(*size)
    apply(head, seq[:cut])
    if not head.snapshot_ok():
        return
    resumed = type(head).restore(head.snapshot())
    assert resumed.screen() == head.screen()
    apply(resumed, seq[cut:])
    assert resumed.screen() == whole.screen()


def test_bare_dump_loses_the_primary_screen_size_after_a_resize_in_full_screen() -> None:
    """Why the snapshot stores more than avt's dump: a resize while a full-screen app
    runs leaves the primary buffer at its old size, which the dump cannot express."""
    seq = [("o", "lqqk"), ("o", "\x1b[?47h"), ("r", (17, 2)), ("o", "\x1b[?47l")]
    vt = avt.Vt(19, 11, scrollback_limit=0)
    vt.feed_str("lqqk\x1b[?47h")
    vt.resize(17, 2)
    bare = avt.Vt(17, 2, scrollback_limit=0)
    bare.feed_str(vt.dump())
    vt.feed_str("\x1b[?47l")
    bare.feed_str("\x1b[?47l")
    assert [line.text for line in vt.view()] != [line.text for line in bare.view()]

    head = AvtTerminal(19, 11)
    apply(head, seq[:3])
    assert head.snapshot_ok()
    resumed = AvtTerminal.restore(head.snapshot())
    whole = AvtTerminal(19, 11)
    apply(whole, seq)
    apply(resumed, seq[3:])
    assert resumed.screen() == whole.screen()


def test_no_snapshot_inside_an_escape_sequence() -> None:
    term = AvtTerminal(10, 3)
    term.feed("ab\x1b[3")
    assert not term.snapshot_ok()
    term.feed("1mc")
    assert term.snapshot_ok()
    term.feed("\x1b]0;a title that goes on")
    assert not term.snapshot_ok()
    term.feed("\x07")
    assert term.snapshot_ok()


ESCAPISH = st.text(
    alphabet=st.sampled_from(
        [
            "\x1b",
            "[",
            "]",
            "P",
            "?",
            ";",
            "1",
            "4",
            "9",
            "m",
            "h",
            "\x07",
            "\\",
            "a",
            "中",
            "\x18",
            "\x9b",
            "\x9c",
            " ",
            "\r",
            "X",
            "^",
            ":",
            "$",
            "!",
        ]
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(prefix=ESCAPISH, text=ESCAPISH)
def test_parser_state_ground_means_the_next_text_prints(prefix: str, text: str) -> None:
    """When the mirror says "ground", avt prints what follows exactly as a terminal
    restored from its dump (which starts in ground) does."""
    if parser_state_after(prefix + text) != parser_state_after(text, parser_state_after(prefix)):
        pytest.fail("state after a split differs from the state after the whole")
    term = AvtTerminal(12, 4)
    term.feed(prefix)
    term.feed(text)
    if term.snapshot_ok():
        fresh = AvtTerminal.restore(term.snapshot())
        term.feed("AB\r\nCD")
        fresh.feed("AB\r\nCD")
        assert term.screen() == fresh.screen()


def test_parser_state_examples() -> None:
    assert parser_state_after("plain") == GROUND
    assert parser_state_after("\x1b[1;3") != GROUND
    assert parser_state_after("\x1b[1;31m") == GROUND
    assert parser_state_after("\x1b]2;title\x1b\\") == GROUND
    assert parser_state_after("\x1bP1$r") != GROUND
    assert parser_state_after("x", parser_state_after("\x1b]0;t")) != GROUND
    assert parser_state_after("\x18", parser_state_after("\x1b[1")) == GROUND


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.backend)
def test_alternate_screen_restores_the_primary(backend: type[Terminal]) -> None:
    for enter, leave in (
        ("\x1b[?1049h", "\x1b[?1049l"),
        ("\x1b[?1047h", "\x1b[?1047l"),
        ("\x1b[?47h", "\x1b[?47l"),
    ):
        term = backend(20, 4)
        term.feed("$ vim notes\r\n")
        term.feed(enter + "\x1b[H\x1b[2Jfull screen app")
        assert term.lines()[0] == "full screen app"
        term.feed(leave)
        assert term.lines()[0] == "$ vim notes"


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.backend)
def test_emoji_and_wide_characters_keep_the_rest_of_the_chunk(backend: type[Terminal]) -> None:
    term = backend(40, 3)
    term.feed("a \u2764\ufe0f b \U0001f469\u200d\U0001f4bb c 中文 d\r\nnext line")
    first, second = term.lines()[:2]
    assert first.startswith("a \u2764")
    assert first.endswith("c 中文 d")
    assert second == "next line"
    wide = [c for c in term.cells()[0] if c.text == "中"]
    assert wide and wide[0].width == 2


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.backend)
def test_styles_and_cursor(backend: type[Terminal]) -> None:
    term = backend(10, 2)
    term.feed("\x1b[1;31mR\x1b[0;48;5;200mG\x1b[0m\x1b[?25l")
    cells = term.cells()[0]
    assert cells[0].style == Style(fg=1, bold=True)
    assert cells[1].style.bg in (200, None) or backend is PyteTerminal
    assert term.cursor().col == 2 and not term.cursor().visible


def test_style_sgr_round_trips_through_the_emulator() -> None:
    style = Style(fg=(1, 2, 3), bg=12, bold=True, italic=True, underline=True, inverse=True)
    term = AvtTerminal(4, 1)
    term.feed(style.sgr() + "x")
    assert term.cells()[0][0].style == style


def test_backend_lookup() -> None:
    assert backend_class() is AvtTerminal
    assert backend_class("pyte") is PyteTerminal
    with pytest.raises(Exception, match="unknown terminal backend"):
        backend_class("vt100")


# (state set up, probe that makes the state visible): what avt's dump() keeps.
DUMP_KEEPS = {
    "pending wrap": ("x" * 12, "Y"),
    "soft-wrapped line reflows": ("a" * 17, ("resize", 20, 4)),
    "pen": ("\x1b[1;31;48;5;17m", "P"),
    "saved cursor": ("\x1b[3;4H\x1b7\x1b[H", "\x1b8X"),
    "scroll region and origin mode": ("\x1b[2;3r\x1b[?6h", "\x1b[1;1HO\r\n1\r\n2\r\n3"),
    "auto-wrap off": ("\x1b[?7l", "z" * 15),
    "insert mode": ("abc\x1b[1G\x1b[4h", "I"),
    "new-line mode": ("\x1b[20h", "a\nb"),
    "line-drawing charset": ("\x1b)0\x0e", "lqk"),
    "tab stops": ("\x1b[3g\x1b[5G\x1bH\r", "\tT"),
    "hidden cursor": ("\x1b[?25l", ""),
    "alternate screen over the primary": ("primary\x1b[?1049h\x1b[2;2Halt", "\x1b[?1049l!"),
}


@pytest.mark.parametrize("feature", sorted(DUMP_KEEPS))
def test_avt_dump_keeps(feature: str) -> None:
    setup, probe = DUMP_KEEPS[feature]
    original = avt.Vt(12, 4, scrollback_limit=0)
    original.feed_str(setup)
    copy = avt.Vt(12, 4, scrollback_limit=0)
    copy.feed_str(original.dump())
    for vt in (original, copy):
        if isinstance(probe, tuple):
            vt.resize(probe[1], probe[2])
        else:
            vt.feed_str(probe)
    assert copy.dump() == original.dump()
    assert [line.text for line in copy.view()] == [line.text for line in original.view()]
    assert (copy.cursor.row, copy.cursor.col, copy.cursor.visible) == (
        original.cursor.row,
        original.cursor.col,
        original.cursor.visible,
    )


def test_avt_dump_loses_scrollback_hence_the_model_keeps_none() -> None:
    """With a scrollback, growing the window brings lines back that a dump does not
    hold; the model keeps no scrollback, so a dump is the whole buffer."""
    with_scrollback = avt.Vt(10, 3)
    with_scrollback.feed_str("\r\n".join(f"line{i}" for i in range(8)))
    copy = avt.Vt(10, 3)
    copy.feed_str(with_scrollback.dump())
    with_scrollback.resize(10, 6)
    copy.resize(10, 6)
    assert [x.text for x in with_scrollback.view()] != [x.text for x in copy.view()]

    model = AvtTerminal(10, 3)
    model.feed("\r\n".join(f"line{i}" for i in range(8)))
    restored = AvtTerminal.restore(model.snapshot())
    model.resize(10, 6)
    restored.resize(10, 6)
    assert model.screen() == restored.screen()
