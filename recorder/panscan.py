"""The card-number shape: what a terminal shows as a digit, what draws nothing between
digits, which separators join groups, and how groups lay out as a card number. No I/O.

The shape (README "Masking" says the same for users):

- A *digit* is any Unicode decimal digit (category Nd: ASCII, full-width, Arabic-Indic,
  Devanagari, ... every script ``unicodedata.decimal`` knows), in UTF-8.
- Between two digits anything that draws nothing is skipped: escape sequences (CSI,
  ESC 7/8 and other ESC sequences, OSC/DCS/APC/PM/SOS strings), 8-bit C1 controls both
  as raw bytes and as U+0080-U+009F, C0 controls that do not move the cursor (NUL, BEL,
  SO, SI, ...), DEL, zero-width characters (ZWSP, ZWJ, ZWNJ, word joiner, BOM, soft
  hyphen, bidi marks) and combining marks.
- A *separator* is one of: a single space, two spaces, a tab, ``-``, ``.``, ``/``,
  NBSP, the Unicode spaces U+2000-U+200A, U+202F, U+205F, U+3000, the hyphens and dashes
  U+2010-U+2013, U+2212 and the full-width hyphen, full stop and solidus. Anything else visible (a letter, a
  comma, three spaces, a line break, a backspace) ends the number.
- Digits with only skipped bytes between them form a *group*. A single group of 13-19
  digits is a candidate; a group of 20+ digits is a long number, never a card number.
- Several groups form a card number only when joined by the same separator throughout
  and laid out as cards are printed: a first group of four, then either groups of four
  and a last group of three to six (4-4-4-4, 4-4-4-3, 4-4-4-4-3, 4-4-5, ...), or one
  group of six and a last of three to six (4-6-5 Amex, 4-6-4 Diners). Joined by tabs or
  two spaces (how columns are aligned), the groups must be the whole row: four columns
  out of a longer row of numbers are not a card number; nor is any part of a run of six
  or more groups of four with one separator (a list of numbers, hexdump words).
- Every candidate must be Luhn-valid, holding 13-19 digits. Groups are taken left to
  right, each number ends where its grouping ends, and numbers never overlap: each keeps
  its own first six and last four digits.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

import re2


class Digit(NamedTuple):
    """One digit of a scanned run: where it is, its value and what masks it."""

    pos: int
    value: int
    star: bytes  # same UTF-8 length and the same display width as the digit


# What masks a digit: same UTF-8 length (the PostgreSQL relay rewrites values in place)
# and same display width (layouts do not move). A full-width digit becomes a full-width
# asterisk rather than two '*': one character for one, three bytes for three, two cells.
_STAR_BY_LEN = {
    1: b"*",
    2: "\u066d".encode(),  # ARABIC FIVE POINTED STAR, one cell
    3: "\u2217".encode(),  # ASTERISK OPERATOR, one cell
    4: "\U0001f7b6".encode(),  # MEDIUM SIX SPOKED ASTERISK, one cell
}
_WIDE_STAR = "\uff0a".encode()  # FULLWIDTH ASTERISK, two cells


def _star_for(ch: str) -> bytes:
    if unicodedata.east_asian_width(ch) in ("W", "F"):
        return _WIDE_STAR
    return _STAR_BY_LEN[len(ch.encode())]


# Code points by role (ASCII handled apart).
# The zero of every run of ten Nd digits past ASCII (Unicode 14). Scanning all code
# points at import took 160 ms; test_every_unicode_digit_has_a_star_of_its_length_and_width
# checks against the running unicodedata, so a newer Unicode's new digits show up there.
_ND_ZEROS = (
    0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66,
    0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80,
    0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50,
    0xABF0, 0xFF10, 0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450,
    0x114D0, 0x11650, 0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60,
    0x16AC0, 0x16B50, 0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950,
    0x1FBF0,
)  # fmt: skip


def _nd_digits() -> list[int]:
    return [z + k for z in _ND_ZEROS for k in range(10) if unicodedata.category(chr(z + k)) == "Nd"]


_SEP_POINTS = [0xA0, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000]
_SEP_POINTS += [*range(0x2010, 0x2014), 0x2212, 0xFF0D, 0xFF0E, 0xFF0F]
_INVISIBLE_POINTS = [
    0xAD,  # soft hyphen
    0x34F,  # combining grapheme joiner
    0x180E,
    *range(0x200B, 0x2010),  # ZWSP, ZWNJ, ZWJ, LRM, RLM
    *range(0x202A, 0x202F),  # bidi embeddings and overrides
    *range(0x2060, 0x2065),  # word joiner, invisible operators
    *range(0x2066, 0x2070),  # bidi isolates, deprecated format controls
    0xFEFF,  # BOM / zero-width no-break space
    *range(0x0300, 0x0370),  # combining marks: they draw on the digit, which stays a digit
    *range(0x1AB0, 0x1B00),
    *range(0x1DC0, 0x1E00),
    *range(0x20D0, 0x2100),
    *range(0xFE00, 0xFE10),  # variation selectors
    *range(0xFE20, 0xFE30),
    *range(0xE0000, 0xE0080),  # tags
    *range(0xE0100, 0xE01F0),
]

DIGITS: dict[bytes, Digit] = {}  # UTF-8 of a non-ASCII digit -> (value, star); pos unused
for _cp in _nd_digits():
    _ch = chr(_cp)
    DIGITS[_ch.encode()] = Digit(0, unicodedata.decimal(_ch), _star_for(_ch))
SEPARATORS = {chr(cp).encode() for cp in _SEP_POINTS}
INVISIBLES = {chr(cp).encode() for cp in _INVISIBLE_POINTS}
# A joint between groups: one separator, or two spaces.
JOINTS = {b" ", b"  ", b"\t", b"-", b".", b"/"} | SEPARATORS
_ASCII_STARS = [b"*"] * 10


def _byte_alternation(encodings: set[bytes] | list[bytes]) -> bytes:
    """A byte regex matching exactly these UTF-8 sequences, grouped by prefix."""
    by_prefix: dict[bytes, list[int]] = {}
    for e in encodings:
        by_prefix.setdefault(e[:-1], []).append(e[-1])
    parts = []
    for prefix, lasts in sorted(by_prefix.items()):
        lasts.sort()
        ranges = []
        lo = prev = lasts[0]
        for b in lasts[1:]:
            if b != prev + 1:
                ranges.append((lo, prev))
                lo = b
            prev = b
        ranges.append((lo, prev))
        cls = b"".join(b"\\x%02x" % a if a == z else b"\\x%02x-\\x%02x" % (a, z) for a, z in ranges)
        parts.append(b"".join(b"\\x%02x" % c for c in prefix) + b"[" + cls + b"]")
    return b"(?:" + b"|".join(parts) + b")"


# -- escape sequences and strings (bytes) ----------------------------------------------
# String bodies: whole UTF-8 characters first, so a 0x9c continuation byte (as in "Ü")
# does not end the string the way a lone 0x9c (8-bit ST) does.
_BODY = (
    rb"(?:[\xc3-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
    rb"|\xc2[\x80-\x9b\x9d-\xbf]|[^\x07\x18\x1a\x1b\x9c])"
)
_ST = rb"(?:\x07|\x1b\\|\x9c|\xc2\x9c)"
_CSI_INTRO = rb"(?:\x1b\[|\x9b|\xc2\x9b)"
_STR_INTRO = rb"(?:\x1b[\]PX^_]|[\x90\x98\x9d-\x9f]|\xc2[\x90\x98\x9d-\x9f])"
# An unterminated string is one until the next ESC, CAN or SUB, which draw nothing either.
SEQ = (
    rb"(?:" + _CSI_INTRO + rb"[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    rb"|" + _STR_INTRO + _BODY + rb"*" + _ST + rb"?"
    rb"|\x1b[\x20-\x2f]*[\x30-\x4f\x51-\x57\x59\x5a\x5c\x60-\x7e]"
    rb"|[\x80-\x8f\x91-\x97\x99\x9a\x9c]|\xc2[\x80-\x8f\x91-\x97\x99\x9a\x9c])"
)
# What an escape sequence cut by the end of the buffer can look like.
PARTIAL = (
    rb"(?:\x1b[\x20-\x2f]*|" + _CSI_INTRO + rb"[\x30-\x3f]*[\x20-\x2f]*"
    rb"|" + _STR_INTRO + _BODY + rb"*(?:\x1b|\xc2)?|[\xc2-\xf4][\x80-\xbf]{0,2})"
)
# C0 controls that move nothing (NUL..BEL, SO, SI, DLE..US but ESC) and DEL.
_C0_INVISIBLE = rb"[\x00-\x07\x0e-\x1a\x1c-\x1f\x7f]"
INVISIBLE = rb"(?:" + SEQ + rb"|" + _C0_INVISIBLE + rb"|" + _byte_alternation(INVISIBLES) + rb")"
SEPARATOR = rb"(?:[ \t\-./]|" + _byte_alternation(SEPARATORS) + rb")"
DIGIT = rb"(?:[0-9]|" + _byte_alternation(list(DIGITS)) + rb")"
# Up to two separator characters (two spaces is a joint); Python decides the joint.
GAP = rb"(?:" + INVISIBLE + rb"*(?:" + SEPARATOR + INVISIBLE + rb"*){0,2})"
# Runs of 13 or more digits with gaps between them: the only text that reaches Python.
# One alternative per class of separator, since a number keeps one separator throughout:
# columns joined by two spaces and decimals by dots (`ps`) stay short of 13 digits.
_SEP_CLASSES = [
    rb" ",
    rb"\t",
    rb"-",
    rb"\.",
    rb"/",
    _byte_alternation([chr(cp).encode() for cp in _SEP_POINTS if cp not in range(0x2010, 0x2014)]),
    _byte_alternation([chr(cp).encode() for cp in range(0x2010, 0x2014)]),
]


def _candidate(invisible: bytes) -> bytes:
    gap = invisible + rb"*(?:(?:%s)" + invisible + rb"*){0,2}"
    return (
        rb"(?:"
        + rb"|".join(DIGIT + rb"(?:" + gap % k + DIGIT + rb"){12,}" for k in _SEP_CLASSES)
        + rb")"
    )


CANDIDATE = _candidate(INVISIBLE)
# For a block of PostgreSQL DataRows (``Masker.hit_spans``): NUL is not skipped, since
# text values never hold one and the frame's length fields are mostly NULs: numeric
# columns of a row do not join into one candidate across their length fields.
BLOCK_CANDIDATE = _candidate(INVISIBLE.replace(rb"[\x00-\x07", rb"[\x01-\x07", 1))
# The run touching the end of the buffer, possibly followed by a gap or a cut sequence.
TAIL = DIGIT + rb"(?:" + GAP + DIGIT + rb")*" + GAP + PARTIAL + rb"?\z"


def re2_options() -> re2.Options:
    """RE2 options for the patterns above: they are written byte by byte (Latin-1), so
    RE2 must not read them as UTF-8."""
    opts = re2.Options()
    opts.encoding = re2.Options.Encoding.LATIN1
    opts.max_mem = 64 << 20
    return opts


_SEQ_AT = re.compile(SEQ)
_PARTIAL_AT = re.compile(PARTIAL + rb"\Z")
_MOVES = frozenset(b"\x08\x0a\x0b\x0c\x0d")  # BS, LF, VT, FF, CR: the cursor moves
_C0_SKIP = frozenset(range(0x20)) - _MOVES - {0x09, 0x1B} | {0x7F}
_ASCII_SEP = frozenset(b" \t-./")
_UTF8_LEN = [0] * 0xC2 + [2] * 30 + [3] * 16 + [4] * 5 + [0] * 11  # by lead byte


def utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence ``lead`` begins (0: not a lead byte)."""
    return _UTF8_LEN[lead] if lead < 0xF5 else 0


class Scan(NamedTuple):
    """A tokenised run: digit groups, the joint after each group but the last (a
    separator string, or None where something visible ends the number), and where an
    escape sequence or character cut by the end of the buffer starts (``len`` if none)."""

    groups: list[list[Digit]]
    joints: list[bytes | None]
    cut: int
    trail: bytes | None  # the separator after the last digit (None: something visible)


_new = tuple.__new__  # a NamedTuple without the Python-level __new__: 3x faster

# Digits kept of a group longer than this (it is a long number either way).
LONG = 21
_PLAIN = bytes(range(48, 58)) + b" \t-./"
_PLAIN_TOKENS = re.compile(rb"[0-9]+|[^0-9]+")


def scan(buf: bytes, start: int, end: int) -> Scan:
    """Tokenise ``buf[start:end]`` into digit groups and the joints between them."""
    seg = buf[start:end]
    if not seg.translate(None, _PLAIN) and seg[:1].isdigit():
        return _scan_plain(seg, start)
    return _scan(buf, start, end)


def _scan_plain(seg: bytes, start: int) -> Scan:
    """The common case: ASCII digits and ASCII separators only."""
    groups: list[list[Digit]] = []
    joints: list[bytes | None] = []
    sep = b""
    for m in _PLAIN_TOKENS.finditer(seg):
        tok = m.group()
        if 48 <= tok[0] <= 57:
            if groups:
                joints.append(sep if sep in JOINTS else None)
            pos = start + m.start()
            if len(tok) > LONG:
                # A long number: its first digit and last ones are all anyone needs.
                keep = [(0, tok[0]), *((k, tok[k]) for k in range(len(tok) - LONG, len(tok)))]
                groups.append([_new(Digit, (pos + k, b - 48, b"*")) for k, b in keep])
            else:
                groups.append([_new(Digit, (pos + k, b - 48, b"*")) for k, b in enumerate(tok)])
        else:
            sep = tok
    ends_in_sep = not seg[-1:].isdigit()
    return Scan(groups, joints, start + len(seg), sep if ends_in_sep else b"")


def _scan(buf: bytes, start: int, end: int) -> Scan:
    groups: list[list[Digit]] = []
    joints: list[bytes | None] = []
    cur: list[Digit] | None = None
    sep = b""
    broken = False
    i = start
    cut = end
    while i < end:
        b = buf[i]
        if 48 <= b <= 57:
            d = _new(Digit, (i, b - 48, b"*"))
            if cur is not None and not sep and not broken:
                cur.append(d)
                if len(cur) > 48:
                    del cur[1:28]  # a long number stays long; its digits are not needed
            else:
                if cur is not None:
                    joints.append(None if broken or sep not in JOINTS else sep)
                cur = [d]
                groups.append(cur)
                sep = b""
                broken = False
            i += 1
            continue
        if b < 0x80:
            if b in _ASCII_SEP:
                sep += buf[i : i + 1]
                i += 1
            elif b == 0x1B:
                m = _SEQ_AT.match(buf, i, end)
                if m is not None and (m.end() < end or not _open_at_end(buf, i, m.end())):
                    i = m.end()
                elif _PARTIAL_AT.match(buf, i, end):
                    cut = i
                    break
                else:
                    i += 1  # a lone ESC draws nothing
            elif b in _C0_SKIP:
                i += 1
            else:
                broken = True
                i += 1
            continue
        n = _UTF8_LEN[b]
        if n and i + n > end and _PARTIAL_AT.match(buf, i, end):
            cut = i
            break
        ch = buf[i : i + n] if n else b""
        if n and len(ch) == n and all(0x80 <= c <= 0xBF for c in ch[1:]):
            dg = DIGITS.get(ch)
            if dg is not None:
                d = Digit(i, dg.value, dg.star)
                if cur is not None and not sep and not broken:
                    cur.append(d)
                    if len(cur) > 48:
                        del cur[1:28]
                else:
                    if cur is not None:
                        joints.append(None if broken or sep not in JOINTS else sep)
                    cur = [d]
                    groups.append(cur)
                    sep = b""
                    broken = False
                i += n
            elif ch in SEPARATORS:
                sep += ch
                i += n
            elif ch in INVISIBLES:
                i += n
            elif n == 2 and b == 0xC2 and ch[1] <= 0x9F:
                i = _c1(buf, i, end)
                if i < 0:
                    cut = -i - 1
                    break
            else:
                broken = True
                i += n
        elif 0x80 <= b <= 0x9F:
            i = _c1(buf, i, end)  # a raw 8-bit C1 control
            if i < 0:
                cut = -i - 1
                break
        else:
            broken = True  # an invalid byte shows as U+FFFD
            i += 1
    for g in groups:
        if len(g) > LONG:
            g[1:] = g[-LONG:]
    return Scan(groups, joints, cut, None if broken else sep)


def _open_at_end(buf: bytes, start: int, stop: int) -> bool:
    """True when the sequence ``buf[start:stop]`` reaching the end of the scan is a string
    still open (no terminator yet): more of its body may follow."""
    return _PARTIAL_AT.match(buf, start, stop) is not None and not _closed(buf, start, stop)


def _closed(buf: bytes, start: int, stop: int) -> bool:
    seq = buf[start:stop]
    if seq.endswith((b"\x07", b"\x1b\\", b"\x9c")):
        return True
    # CSI and plain ESC sequences end in their final byte; only strings stay open.
    return re.match(_STR_INTRO, seq) is None


def _c1(buf: bytes, i: int, end: int) -> int:
    """End of the C1 control (raw or UTF-8 encoded) at ``i``; ``-i-1`` when it is cut
    by the end of the buffer."""
    m = _SEQ_AT.match(buf, i, end)
    if m is not None and (m.end() < end or not _open_at_end(buf, i, m.end())):
        return m.end()
    if _PARTIAL_AT.match(buf, i, end):
        return -i - 1
    return i + 1


def sequence_end(buf: bytes, start: int) -> int:
    """End of the escape sequence or string starting at ``start``."""
    m = _SEQ_AT.match(buf, start)
    return m.end() if m is not None else start + 1


def luhn(digits: list[Digit]) -> bool:
    """Luhn check of scanned digits."""
    total = 0
    parity = len(digits) % 2
    for k, d in enumerate(digits):
        v = d.value
        if k % 2 == parity:
            v *= 2
            if v > 9:
                v -= 9
        total += v
    return total % 10 == 0


# Tabs and two spaces align columns (paste, TSV, ps): joined by them, a card number must
# be the whole row of groups, not four columns out of a longer row.
_WEAK_JOINTS = frozenset({b"\t", b"  "})
# A grouped number runs as far as its grouping goes: the longest layout is tried first
# (4-4-4-4-3 before 4-4-4-4), so its last four are those of its last group.
_PREFERENCE = (19, 18, 17, 16, 15, 14, 13)


_LONG_RUN = 6


def card_numbers(s: Scan, blocked: set[int] | None = None) -> list[list[Digit]]:
    """The card numbers of a scan, left to right, never overlapping. ``blocked`` holds
    indexes of groups that cannot take part (digits inside a hash or UUID)."""
    groups, joints = s.groups, s.joints
    out: list[list[Digit]] = []
    n = len(groups)
    i = 0
    while i < n:
        if blocked and i in blocked:
            i += 1
            continue
        g = groups[i]
        size = len(g)
        if 13 <= size <= 19 and luhn(g):
            out.append(g)
            i += 1
            continue
        if size == 4 and i + 1 < n and joints[i] is not None:
            # Six or more groups of four in a row with one separator are a list of
            # numbers (`echo {1000..1100}`, od/hexdump words), not a card number.
            j = i
            while j + 1 < n and joints[j] == joints[i] and len(groups[j + 1]) == 4:
                j += 1
            if j - i + 1 >= _LONG_RUN:
                i = j + 1
                continue
            found = _grouped(groups, joints, i, blocked)
            if found is not None:
                j, digits = found
                out.append(digits)
                i = j + 1
                continue
        i += 1
    return out


def _grouped(
    groups: list[list[Digit]], joints: list[bytes | None], i: int, blocked: set[int] | None
) -> tuple[int, list[Digit]] | None:
    """The grouped card number starting at group ``i`` (a group of four), if any:
    (index of its last group, its digits)."""
    kind = joints[i]
    options: dict[int, int] = {}  # total digits -> index of the last group
    total = 4
    j = i
    # 4-4-...-4-(3..6)
    while j + 1 < len(groups) and joints[j] == kind and not (blocked and j + 1 in blocked):
        nxt = len(groups[j + 1])
        if 3 <= nxt <= 6 and 13 <= total + nxt <= 19:
            options.setdefault(total + nxt, j + 1)
        if nxt != 4:
            break
        total += 4
        j += 1
        if total > 19:
            break
    # 4-6-(3..6)
    if (
        i + 2 < len(groups)
        and len(groups[i + 1]) == 6
        and joints[i + 1] == kind
        and 3 <= len(groups[i + 2]) <= 6
        and not (blocked and (i + 1 in blocked or i + 2 in blocked))
    ):
        options.setdefault(10 + len(groups[i + 2]), i + 2)
    weak = kind in _WEAK_JOINTS
    if weak and i > 0 and joints[i - 1] == kind:
        return None  # a column inside a row of tab- or space-aligned numbers
    for length in _PREFERENCE:
        last = options.get(length)
        if last is None:
            continue
        if weak and last + 1 < len(groups) and joints[last] == kind:
            continue
        digits = [d for g in groups[i : last + 1] for d in g]
        if luhn(digits):
            return last, digits
    return None
