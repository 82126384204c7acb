"""recorder/re_syntax.py relies on the stdlib's private regex parser (``re._parser``,
``re._constants``). These fail when an upgrade removes or changes it: the adapter would
then quietly take its slow-but-safe side, and the masker's prefilters would be lost."""

from __future__ import annotations

import re

import pytest

from recorder import re_syntax
from recorder.masking import CustomPattern, Masker, MaskPolicy


def test_the_private_parser_is_there() -> None:
    assert re_syntax.AVAILABLE
    parsed = re._parser.parse("ab(?=c)")  # type: ignore[attr-defined]
    assert isinstance(parsed, re._parser.SubPattern)  # type: ignore[attr-defined]
    ops = [op for op, _arg in parsed]
    assert ops[:2] == [re._constants.LITERAL] * 2  # type: ignore[attr-defined]
    assert ops[2] is re._constants.ASSERT  # type: ignore[attr-defined]
    assert isinstance(parsed.state.flags, int)


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        ("sk_live_[A-Za-z0-9]{24}", "sk_live_"),
        ("^AKIA[0-9A-Z]{16}", "AKIA"),
        ("[a-z]+x", ""),
        ("(?i)secret", None),
        ("(?x) a b", None),
        ("(unclosed", None),
    ],
)
def test_leading_literal(pattern: str, literal: str | None) -> None:
    assert re_syntax.leading_literal(pattern) == literal


@pytest.mark.parametrize(
    ("pattern", "free"),
    [
        ("sk_live_[A-Za-z0-9]{24}", True),
        ("(a|b)+c", True),
        (r"\bkey\b", False),
        ("^start", False),
        ("x(?=y)", False),
        ("x(?!y)", False),
        ("(a|(b$))", False),
        ("(unclosed", False),
    ],
)
def test_context_free(pattern: str, free: bool) -> None:
    assert re_syntax.context_free(pattern) is free


def test_the_masker_uses_what_it_reads() -> None:
    """What re_syntax reads reaches the masker (block scanning), and nothing is lost."""
    free = Masker(MaskPolicy(detectors=(), patterns=(CustomPattern("k", "sk_live_[a-z]{24}"),)))
    anchored = Masker(MaskPolicy(detectors=(), patterns=(CustomPattern("k", r"\bsk_[a-z]{4}"),)))
    assert free.block_safe
    assert not anchored.block_safe
    secret = "sk_live_" + "a" * 24
    assert secret not in free.mask(f"key {secret} end")
