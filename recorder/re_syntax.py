"""Adapter: reads a regular expression's syntax tree with the standard library's own
parser, ``re._parser`` (with its opcodes in ``re._constants``). Neither is public API
(they were ``sre_parse``/``sre_constants`` before Python 3.11) and no public module
parses a pattern, so this is the one module that touches them.

The masker only uses what is read here to go faster (a literal to test with ``in``
before RE2, a pattern that may be scanned over many values at once); every answer has
a safe side that costs speed, never a missed match. If an upgrade removes or changes
the parser, the functions take that side (``AVAILABLE`` is then False) and
tests/unit/test_re_syntax.py fails, so the breakage is seen rather than silently slow.
"""

from __future__ import annotations

import re
from typing import Any

try:
    _parser: Any = re._parser  # type: ignore[attr-defined]
    _constants: Any = re._constants  # type: ignore[attr-defined]
    _LITERAL = _constants.LITERAL
    _AT = _constants.AT
    _ZERO_WIDTH = (_constants.AT, _constants.ASSERT, _constants.ASSERT_NOT)
    _SUBPATTERN = _parser.SubPattern
    AVAILABLE = callable(_parser.parse)
except AttributeError:  # pragma: no cover - an interpreter without the parser
    AVAILABLE = False

_UNSAFE_FLAGS = re.IGNORECASE | re.VERBOSE


def _parse(pattern: str) -> Any | None:
    if not AVAILABLE:
        return None
    try:
        return _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError, AttributeError, TypeError):
        return None


def leading_literal(pattern: str) -> str | None:
    """The literal run every match of ``pattern`` starts with (after anchors), ``""``
    when there is none, or None when the pattern could not be read or its flags
    (case-insensitive, verbose) make the text differ from what matches."""
    parsed = _parse(pattern)
    if parsed is None:
        return None
    try:
        if parsed.state.flags & _UNSAFE_FLAGS:
            return None
        lit: list[str] = []
        for op, arg in parsed:
            if op is _LITERAL:
                lit.append(chr(arg))
            elif op is not _AT:
                break
    except (AttributeError, TypeError, ValueError):
        return None
    return "".join(lit)


def context_free(pattern: str) -> bool:
    """True when a match of ``pattern`` inside a value is also a match inside any longer
    text holding that value: no anchors, word boundaries or lookarounds anywhere. False
    when unsure."""
    parsed = _parse(pattern)
    if parsed is None:
        return False
    try:
        return not _has_zero_width(parsed)
    except (AttributeError, TypeError, ValueError):
        return False


def _has_zero_width(node: object) -> bool:
    if isinstance(node, _SUBPATTERN):
        return any(op in _ZERO_WIDTH or _has_zero_width(arg) for op, arg in node)
    if isinstance(node, list | tuple):
        return any(_has_zero_width(x) for x in node)
    return False
