"""The cheap tests in front of RE2 (recorder/masking.py): a custom pattern's required
literal never hides a match, and only anchor-free patterns are scanned across values."""

from __future__ import annotations

import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from recorder import panscan
from recorder.masking import (
    CustomPattern,
    Masker,
    MaskPolicy,
    _context_free,
    _required_literal,
)

ATOMS = ["a", "b", "k_", "[0-9]", "[^x]", "\\d", ".", "(ab|c)", "x*", "y+", "z?", "\\b", "^", "$"]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(ATOMS), min_size=1, max_size=6))
    flags = draw(st.sampled_from(["", "(?i)", "(?s)"]))
    return flags + "".join(parts)


@settings(max_examples=300, deadline=None)
@given(pattern=patterns(), text=st.text(alphabet="abk_xyz0123 \n", max_size=30))
def test_the_literal_prefilter_never_hides_a_match(pattern: str, text: str) -> None:
    data = text.encode()
    masker = Masker(MaskPolicy(detectors=(), patterns=[CustomPattern("p", pattern)]))
    assert masker.custom_in(data) == (re2.compile(pattern.encode()).search(data) is not None)
    lit = _required_literal(pattern)
    if lit is not None and re2.compile(pattern.encode()).search(data):
        assert lit in data


def test_required_literals() -> None:
    assert _required_literal("sk_live_[A-Za-z0-9]{24}") == b"sk_live_"
    assert _required_literal(r"\bsecret=\w+") == b"secret="
    assert _required_literal("abc*x") == b"ab"  # 'c' is optional
    for pattern in ("(?i)sk_live", "ab|cd", "x{,3}", r"\Qab\E", "a", "(?x)ab"):
        assert _required_literal(pattern) is None, pattern


def test_only_anchor_free_patterns_are_scanned_across_values() -> None:
    assert _context_free("sk_live_[A-Za-z0-9]{24}")
    assert _context_free("[^x]+y")
    for pattern in ("^x", "x$", r"\bkey", r"(a|\bb)+", r"\Ax", r"\Qx\E"):
        assert not _context_free(pattern), pattern
    assert not Masker(MaskPolicy(patterns=[CustomPattern("p", "^k")])).block_safe
    assert Masker(MaskPolicy(patterns=[CustomPattern("p", "k_[0-9]+")])).block_safe


@settings(max_examples=500)
@given(text=st.text(alphabet="0123456789 \t-./", min_size=1, max_size=60))
def test_the_plain_tokeniser_reads_as_the_full_one(text: str) -> None:
    data = b"x" + text.encode()
    for start in range(1, len(data)):
        if data[start : start + 1].isdigit():
            assert panscan.scan(data, start, len(data)) == panscan._scan(data, start, len(data))
            break


def test_block_scan_does_not_join_numeric_columns_across_length_fields() -> None:
    m = Masker()
    # Three int columns of one DataRow: 15 digits with only NUL-led length fields between.
    row = b"D\x00\x00\x00\x1f\x00\x03" + b"".join(
        b"\x00\x00\x00\x05" + v for v in (b"12345", b"67890", b"11111")
    )
    assert m.hit_spans(row * 3) == []
    # A value holding a card number split by an invisible control is still found.
    pan = b"4111\x011111\x071111\x0e1111"
    assert m.hit_spans(row + b"\x00\x00\x00\x13" + pan)
    assert m.mask_bytes(pan) == b"4111\x0111**\x07****\x0e1111"
