"""Fuzzing what watchers print (relay/live.py Neutraliser): whatever a session prints,
cut into events however it likes, nothing that acts on the operator's terminal gets
through: no OSC (title, OSC 52 clipboard, OSC 8 hyperlink), DCS, APC, PM or SOS string,
no 8-bit C1 control, no window operation, no ENQ; colours and cursor movement pass."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.live import Neutraliser, neutralise, printable, render_event

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ATTACKS = [
    "\x1b]52;c;cm0gLXJmIC8=\x07",  # OSC 52: write the operator's clipboard
    "\x1b]0;pwned-title\x1b\\",  # window title
    "\x1b]2;pwned-title\x07",
    "\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07",  # hyperlink
    '\x1bP$q"p\x1b\\',  # DCS: a query whose answer is typed back
    "\x1b_apc-payload\x1b\\",
    "\x1b^pm-payload\x1b\\",
    "\x1bXsos-payload\x1b\\",
    "\x9d52;c;YzE=\x9c",  # the 8-bit forms
    "\x90dcs8-payload\x9c",
    "\x9f apc8-payload\x9c",
    "\x9e pm8-payload\x9c",
    "\x98 sos8-payload\x9c",
    "\x9b8;200;200t",  # 8-bit CSI: a window operation
    "\x85",  # NEL
    "\x1b[21t",  # report the window title into the operator's input
    "\x1b[8;200;200t",  # resize the operator's window
    "\x05",  # ENQ: answerback
    "\x1b]52;c;dW5 0ZXJtaW5hdGVk",  # never terminated
]
PAYLOADS = ["cm0gLXJmIC8=", "pwned", "evil.example", "payload", "YzE=", "dW5"]
BENIGN = [
    "plain text ",
    "\x1b[31mred\x1b[0m",
    "\x1b[2J\x1b[H",
    "\x1b[?1049h",
    "\x1b[10;20H",
    "\x1b(B",
    "\x9b1;6H",  # 8-bit CSI (avt's screen dumps use it)
    "\r\n",
    "\t",
    "\x07",
    "中文 ",
    "é",
]
HOSTILE = re.compile(r"\x1b[\]PX^_]|[\x80-\x9f\x05]|\x1b\[[0-?]*[ -/]*t")


def assert_safe(text: str, payloads: bool = True) -> None:
    """No hostile sequence in ``text``, nor (``payloads``) what one carried."""
    assert not HOSTILE.search(text), repr(text)
    for p in PAYLOADS if payloads else []:
        assert p not in text, (p, text)


def cut(text: str, points: list[int]) -> list[str]:
    marks = sorted({p % (len(text) + 1) for p in points})
    out, last = [], 0
    for c in [*marks, len(text)]:
        out.append(text[last:c])
        last = c
    return out


streams = st.lists(st.sampled_from(ATTACKS + BENIGN), max_size=20).map("".join)


@FAST
@given(text=streams, points=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_nothing_hostile_gets_through_however_the_output_is_cut(
    text: str, points: list[int]
) -> None:
    stream = Neutraliser()
    out = "".join(stream.feed(piece) for piece in cut(text, points))
    assert_safe(out)
    # Cutting changes nothing (a sequence cut at the very end is held, not shown).
    assert out == Neutraliser().feed(text)
    # What comes out holds nothing the neutraliser would remove.
    assert Neutraliser().feed(out) == out


@FAST
@given(text=st.text(max_size=300), points=st.lists(st.integers(min_value=0), max_size=10))
def test_arbitrary_text(text: str, points: list[int]) -> None:
    stream = Neutraliser()
    out = "".join(stream.feed(piece) for piece in cut(text, points))
    assert not re.search(r"\x1b[\]PX^_]|[\x80-\x9f\x05]", out)
    assert Neutraliser().feed(out) == out


@given(
    text=st.text(
        alphabet=st.characters(
            blacklist_characters="\x1b\x05", blacklist_categories=("Cs",)
        ).filter(lambda c: not "\x80" <= c <= "\x9f"),
        max_size=200,
    )
)
def test_text_without_escapes_passes_unchanged(text: str) -> None:
    assert neutralise(text) == text
    assert Neutraliser().feed(text) == text


def test_benign_sequences_pass_and_each_attack_is_removed() -> None:
    for seq in BENIGN:
        assert neutralise(f"a{seq}b") == f"a{seq.replace(chr(0x9B), chr(27) + '[')}b"
    for attack in ATTACKS:
        out = neutralise(f"before{attack}after")
        assert_safe(out)
        assert out.startswith("before")


def test_a_sequence_split_across_events_is_removed_whole() -> None:
    stream = Neutraliser()
    parts = [
        "ok \x1b",
        "]52;c;cm0gLXJmIC8=",
        "\x07 visible \x1b",
        "[31mred\x1b[0",
        "m \x9d",
        "0;t\x9c end",
    ]
    out = "".join(render_event({"type": "o", "data": p}, stream) for p in parts)
    assert out == "ok  visible \x1b[31mred\x1b[0m  end"
    # A stateless render of the same events would have let the halves through.
    naive = "".join(neutralise(p) for p in parts)
    assert "]52;c;" in naive


def test_markers_and_end_reasons_are_plain_text() -> None:
    line = render_event({"type": "m", "data": "approval #1 \x1b]0;x\x07\x1b[2K\r\x9b2K"})
    body = line.removeprefix("\r\n\x1b[7m castgate: ").removesuffix(" \x1b[0m\r\n")
    assert body == printable("approval #1 \x1b]0;x\x07\x1b[2K\r\x9b2K")
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", body)
    assert "\x1b]" not in render_event({"type": "end", "data": "closed\x1b]0;x\x07"})
