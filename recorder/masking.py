"""Streaming masker for card numbers, track data and custom secrets.

The masker works on bytes and owns no I/O and no clock: ``StreamMasker.feed`` takes a
chunk and returns what may be released now; the caller's event loop calls ``flush``
once ``hold_deadline`` has passed without new data. Masking replaces each digit by a
star of the same UTF-8 length and display width (``recorder.panscan``), so the output
has the same length and width as the input and terminal layouts do not move.

PAN detection (PCI DSS 3.4.1): ``recorder.panscan`` defines the card-number shape
(Unicode digits, what draws nothing between them, separators, group layouts). RE2 finds
*candidates* (13+ digits with gaps) in one C pass; Python tokenises only those.

Streaming: the masker holds back the digits of the run touching the end of the buffer
that could still become (part of) a card number, however many escape bytes sit between
them, and keeps the run's already released part as *context*, so digits that arrive
after a deadline release still complete the number: those later digits are masked
(the earlier ones were sent already), and a complete number is never shown raw.

Scanning uses RE2 (linear time, DFA speed) so ordinary output costs one C pass; Python
only looks at candidates of 13+ digits. Custom patterns use RE2 too, so a user's regex
cannot cause catastrophic backtracking inside the relay.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import re2
import regex

from recorder import panscan, re_syntax
from recorder.errors import CastgateError
from recorder.panscan import Digit

_CANDIDATE = panscan.CANDIDATE
# End-anchored, so RE2 runs it backwards from the end: its cost is the tail's length.
_TAIL = re2.compile(panscan.TAIL, panscan.re2_options())
# Digits inside a UUID or a long hex string (hashes, commit ids) are not card numbers:
# a SHA-1 holds a 13-digit run now and then, and a UUID's last blocks can join into 15.
# RE2: `re` tries {32,} at every hex character of the window, RE2 runs one DFA pass.
_HEXY = re2.compile(
    rb"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
    rb"|[0-9A-Fa-f]{32,}"
)
_HEX_LETTER = re.compile(rb"[A-Fa-f]")
# A string's opening: ESC form, UTF-8 C1, or a raw C1 byte that is not inside a character.
_STRING_INTRO = re.compile(
    rb"\x1b[\]PX^_]|\xc2[\x90\x98\x9d-\x9f]|(?<![\x80-\xff])[\x90\x98\x9d-\x9f]"
)
_HEX_CONTEXT = 80

# Track 2: ;PAN=YYMM SSS discretionary? ; Track 1: %BPAN^NAME^YYMM SSS discretionary?
_TRACK2 = rb";?([0-9]{13,19})=([0-9]{7}[0-9]{0,30})\??"
_TRACK1 = rb"%?B([0-9]{13,19})\^([^^\r\n\x1b]{2,26})\^([0-9]{7}[^?\r\n\x1b]{0,79})\??"
_TRACK_TAIL = re2.compile(
    rb"(?:%|%?B[0-9]{0,19}|%?B[0-9]{13,19}\^[^^\r\n\x1b]{0,26}(?:\^[^?\r\n\x1b]{0,86})?"
    rb"|;?[0-9]{13,19}=[0-9]{0,37})\z"
)

# A held tail longer than this is released anyway (a string that never ends): memory
# stays bounded, and the context still masks the digits that complete the number.
MAX_HOLD = 16 << 10
# Released context longer than this is compacted (escape sequences dropped, at most
# the last 40 digits kept): what it holds is digits, separators and open state.
_CTX_CAP = 4 << 10
# How far back a partial track is looked for (a track is at most ~120 bytes).
_TRACK_WINDOW = 320
# A custom pattern may hold back at most this much before it is released anyway.
_MAX_CUSTOM_HOLD = 1024

STYLES = ("bin6-last4", "full")


def luhn_valid(digits: bytes | str) -> bool:
    """Luhn check of an ASCII digit string."""
    total = 0
    parity = len(digits) % 2
    for i, ch in enumerate(digits.encode() if isinstance(digits, str) else digits):
        d = ch - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    """Append the Luhn check digit to ``prefix`` (used by demos so no PAN is a literal)."""
    for check in "0123456789":
        if luhn_valid(prefix + check):
            return prefix + check
    raise AssertionError("unreachable: one check digit always fits")


@dataclass(frozen=True)
class CustomPattern:
    """A named secret pattern from ``[masking].patterns``."""

    name: str
    regex: str


@dataclass
class MaskPolicy:
    """What the masker looks for and how it masks.

    Args:
        detectors: built-in detectors to run, ``pan`` and/or ``track``.
        style: ``bin6-last4`` (PCI DSS 3.4.1 display masking) or ``full``.
        patterns: custom secret patterns, masked whole.
    """

    detectors: Sequence[str] = ("pan", "track")
    style: str = "bin6-last4"
    patterns: Sequence[CustomPattern] = ()

    def __post_init__(self) -> None:
        unknown = set(self.detectors) - {"pan", "track"}
        if unknown:
            raise ValueError(f"unknown detector(s): {', '.join(sorted(unknown))}")
        if self.style not in STYLES:
            raise ValueError(f"unknown masking style {self.style!r}")


class PatternError(CastgateError, ValueError):
    """A custom pattern that RE2 cannot compile."""


def compile_check(pattern: str) -> None:
    """Raise PatternError unless ``pattern`` compiles for both scanning and hold-back."""
    _compile(MaskPolicy(detectors=(), patterns=(CustomPattern("pattern", pattern),)))


@dataclass
class _Compiled:
    candidate: object  # re2 pattern
    block_candidate: object
    track2: object | None
    track1: object | None
    customs: list[tuple[str, object, regex.Pattern[bytes]]] = field(default_factory=list)
    # Per custom pattern: bytes any match contains (None: no cheap test).
    literals: list[bytes | None] = field(default_factory=list)
    # Every custom pattern is context-free (see ``Masker.hit_spans``).
    block_safe: bool = True


def _required_literal(pattern: str) -> bytes | None:
    """Bytes every match of ``pattern`` must contain (its leading literal run), or None.

    RE2 costs ~0.7 us a call whatever the input's length, so short values (a DataRow
    field, a statement) are first checked with ``in``. Python's parser reads the
    pattern (recorder/re_syntax.py); where its reading could differ from RE2's (flags,
    escapes it rejects) the run is empty and RE2 alone decides."""
    lit = re_syntax.leading_literal(pattern)
    if lit is None:
        return None
    raw = lit.encode("utf-8", "surrogateescape")
    return raw if len(raw) >= 2 else None


def _holds(data: bytes | bytearray, lit: bytes, end: int | None = None) -> bool:
    """``lit in data[:end]``, first by memchr of its first byte: ``in`` itself skips
    through a buffer without that byte ten times slower."""
    return lit[:1] in data and data.find(lit, 0, len(data) if end is None else end) >= 0


def _context_free(pattern: str) -> bool:
    """True when a match of ``pattern`` inside a value is also a match inside any longer
    text holding that value: no anchors or word boundaries anywhere (RE2 has no
    lookaround). Such patterns may be scanned over a block of many values at once."""
    return re_syntax.context_free(pattern)


def _compile(policy: MaskPolicy) -> _Compiled:
    opts = re2.Options()
    opts.max_mem = 64 << 20
    c = _Compiled(
        candidate=re2.compile(_CANDIDATE, panscan.re2_options()),
        block_candidate=re2.compile(panscan.BLOCK_CANDIDATE, panscan.re2_options()),
        track2=re2.compile(_TRACK2, opts) if "track" in policy.detectors else None,
        track1=re2.compile(_TRACK1, opts) if "track" in policy.detectors else None,
    )
    for p in policy.patterns:
        raw = p.regex.encode()
        try:
            full = re2.compile(raw, opts)
            # RE2 has no partial matching; the `regex` module finds a match still in
            # progress at the end of a chunk so the masker knows what to hold back.
            partial = regex.compile(raw)
        except Exception as exc:
            raise PatternError(f"invalid pattern for {p.name!r}: {exc}") from None
        c.customs.append((p.name, full, partial))
        c.literals.append(_required_literal(p.regex))
        c.block_safe = c.block_safe and _context_free(p.regex)
    return c


Star = tuple[int, bytes]  # position, the bytes that replace what is there


class Masker:
    """A compiled masking policy; ``mask`` handles whole strings, ``stream`` makes a
    ``StreamMasker`` for a byte stream. One Masker serves any number of streams."""

    def __init__(self, policy: MaskPolicy | None = None) -> None:
        self.policy = policy or MaskPolicy()
        self._c = _compile(self.policy)
        self._pan = "pan" in self.policy.detectors
        self._full = self.policy.style == "full"

    def stream(self, hold_deadline: float = 0.020) -> StreamMasker:
        """A masker for one byte stream (one direction of one session)."""
        return StreamMasker(self, hold_deadline)

    @property
    def custom_names(self) -> tuple[str, ...]:
        """Names of the custom secret patterns (the detectors besides ``pan``/``track``)."""
        return tuple(name for name, _f, _p in self._c.customs)

    def custom_in(self, data: bytes) -> bool:
        """True when a custom pattern matches somewhere in ``data``."""
        c = self._c
        for (_n, full, _p), lit in zip(c.customs, c.literals, strict=True):
            if (lit is None or _holds(data, lit)) and full.search(data):  # type: ignore[attr-defined]
                return True
        return False

    @property
    def block_safe(self) -> bool:
        """True when ``hit_spans`` may scan a block of many values at once."""
        return self._c.block_safe

    def hit_spans(self, data: bytes) -> list[tuple[int, int]]:
        """Spans of ``data`` where masking could change something: PAN candidates (which
        every track match holds) and custom matches. A value holding such a match also
        yields a span overlapping it when scanned inside a larger block, provided
        ``block_safe``: the PostgreSQL relay scans a whole run of DataRows this way and
        decodes only the rows a span touches."""
        c = self._c
        spans = (
            [m.span() for m in c.block_candidate.finditer(data)]  # type: ignore[attr-defined]
            if digits_possible(data)
            else []
        )
        for (_n, full, _p), lit in zip(c.customs, c.literals, strict=True):
            if lit is None or _holds(data, lit):
                spans.extend(
                    m.span()
                    for m in full.finditer(data)  # type: ignore[attr-defined]
                    if m.end() > m.start()
                )
        return spans

    def mask_bytes(
        self, data: bytes, counts: Counter[str] | None = None, *, customs: bool = True
    ) -> bytes:
        """Mask a complete byte string (nothing is held back). ``customs=False`` tells
        that no custom pattern can match (the caller checked a larger buffer). The
        result has the same length in bytes (and in UTF-8 characters)."""
        # Card numbers and track data need 13 digits: most strings are done here.
        if not digits_possible(data) and (
            not customs or not self._c.customs or not self.custom_in(data)
        ):
            return data
        stars, _later = self._find(data, 0, len(data), set(), counts)
        if not stars:
            return data
        buf = bytearray(data)
        _apply(buf, stars, 0)
        return bytes(buf)

    def mask(self, text: str, counts: Counter[str] | None = None) -> str:
        """Mask a complete string (query text, log fields, approval requests). Same
        length in characters, same display width."""
        raw = text.encode("utf-8", "surrogateescape")
        masked = self.mask_bytes(raw, counts)
        return text if masked == raw else masked.decode("utf-8", "surrogateescape")

    # -- detection ---------------------------------------------------------------

    def _find(
        self,
        buf: bytes,
        base: int,
        hold: int,
        released_stars: set[int],
        counts: Counter[str] | None,
        left: bytes = b"",
    ) -> tuple[list[Star], list[Star]]:
        """Stars for ``buf[base:hold]`` (what is released now; ``buf[:base]`` is context
        already released, ``buf[hold:]`` is held back), and the stars past ``hold`` of
        track and custom matches decided now. ``released_stars`` are the positions of
        the context that were masked when released."""
        stars: list[Star] = []
        later: list[Star] = []
        track_spans: list[tuple[int, int]] = []
        c = self._c
        end = len(buf)
        candidates = [
            (m.start(), m.end())
            for m in c.candidate.finditer(buf)  # type: ignore[attr-defined]
            if m.end() > base
        ]
        for tpat in (c.track2, c.track1) if candidates else ():
            if tpat is None:
                continue
            for m in tpat.finditer(buf, base, end):  # type: ignore[attr-defined]
                if m.start() >= hold:
                    break
                pan_s, pan_e = m.span(1)
                if not luhn_valid(buf[pan_s:pan_e]):
                    continue
                digits = [Digit(i, buf[i] - 48, b"*") for i in range(pan_s, pan_e)]
                hits = [(d.pos, d.star) for d in self._wanted(digits)]
                # Everything after the PAN's field separator is sensitive authentication
                # data (PCI DSS 3.3.1.1) except the end sentinel.
                rest_end = m.end() - (1 if buf[m.end() - 1 : m.end()] == b"?" else 0)
                hits.extend((i, b"*") for i in range(pan_e + 1, rest_end) if buf[i] != 0x5E)
                for st in hits:
                    (stars if st[0] < hold else later).append(st)
                track_spans.append((m.start(), m.end()))
                if counts is not None:
                    counts["track"] += 1
        if self._pan:
            seen: set[int] = set()
            todo = candidates
            while todo:
                more: list[tuple[int, int]] = []
                for s, e in todo:
                    self._pans(
                        buf,
                        s,
                        e,
                        base,
                        hold,
                        released_stars,
                        stars,
                        counts,
                        track_spans,
                        left,
                        seen,
                    )
                    # The body of a string (a window title, DCS data) is skipped between
                    # digits but is text too: numbers inside it are read on their own.
                    for intro in _STRING_INTRO.finditer(buf, s, e):
                        body_end = panscan.sequence_end(buf, intro.start())
                        more.extend(
                            m.span()
                            for m in c.candidate.finditer(buf, intro.end(), body_end)  # type: ignore[attr-defined]
                        )
                todo = more
        for (name, full, _partial), lit in zip(c.customs, c.literals, strict=True):
            if lit is not None and not _holds(buf, lit, end):
                continue
            for m in full.finditer(buf, base, end):  # type: ignore[attr-defined]
                if m.start() >= hold:
                    break
                if m.end() > m.start():
                    for i in range(m.start(), m.end()):
                        (stars if i < hold else later).append((i, b"*"))
                    if counts is not None:
                        counts[name] += 1
        return stars, later

    def _wanted(self, digits: list[Digit]) -> list[Digit]:
        return digits if self._full else digits[6:-4]

    def _pans(
        self,
        buf: bytes,
        start: int,
        end: int,
        base: int,
        hold: int,
        released_stars: set[int],
        stars: list[Star],
        counts: Counter[str] | None,
        track_spans: list[tuple[int, int]],
        left: bytes,
        seen: set[int],
    ) -> None:
        sc = panscan.scan(buf, start, end)
        blocked = None
        hexy = _hex_positions(buf, start, end, left) if _hex_possible(buf, start, end) else ()
        if hexy:
            blocked = {k for k, g in enumerate(sc.groups) if any(d.pos in hexy for d in g)}
        for digits in panscan.card_numbers(sc, blocked):
            last = digits[-1].pos
            if last < base or digits[0].pos in seen:
                continue  # decided when it was released, or found already
            seen.add(digits[0].pos)
            wanted = self._wanted(digits)
            if all(d.pos in released_stars for d in wanted if d.pos < base):
                hit = [d for d in wanted if d.pos >= base]
            else:
                # Part of what should have been masked was released before the number
                # was complete (a deadline passed): hide every digit still here.
                hit = [d for d in digits if d.pos >= base]
            stars.extend((d.pos, d.star) for d in hit)
            in_track = any(s <= digits[0].pos < e for s, e in track_spans)
            if counts is not None and last < hold and not in_track:
                counts["pan"] += 1

    # -- hold-back -----------------------------------------------------------------

    def _hold_from(self, buf: bytes, base: int, digit: bool = True) -> tuple[int, int]:
        """Where the held tail starts (>= ``base``) and where the run touching the end
        starts (the context to keep once released; ``len(buf)`` if there is none).
        ``digit``: False when ``buf`` has no byte that could belong to a digit."""
        n = len(buf)
        hold = n
        tail = n
        # (No digit anywhere, context included: no run can be open. The memchr test
        # spares bulk output without digits an RE2 pass over every chunk.)
        if digit and (self._pan or self._c.track1 is not None):
            m = _TAIL.search(buf)
            if m:
                tail = m.start()
                # Only the last groups decide the hold: a run longer than the hold cap
                # (`seq | paste -sd ' '`) is read from a later digit RE2 vouches for.
                far = _TAIL.search(buf, n - MAX_HOLD) if n - tail > MAX_HOLD else m
                sc = panscan.scan(buf, far.start() if far else tail, n)
                # Keep the last groups whose digits (19 at most) could still form a PAN
                # or change one: earlier groups can no longer join a future match.
                total = 0
                k = len(sc.groups)
                while k > 0 and total + len(sc.groups[k - 1]) <= 19:
                    if k < len(sc.groups) and sc.joints[k - 1] is None:
                        break
                    total += len(sc.groups[k - 1])
                    k -= 1
                if k < len(sc.groups):
                    hold = max(base, sc.groups[k][0].pos)
        # A character cut by the chunk may be a digit of a number: the next chunk must
        # see it whole.
        cut = _char_cut(buf, base)
        hold = min(hold, cut)
        tail = min(tail, cut)
        if self._c.track1 is not None:
            lo = max(base, n - _TRACK_WINDOW)
            window = buf[lo:]
            last = buf[-1] if n else 0
            if (
                last == 0x25
                or buf.find(b"B", max(lo, n - 21)) >= 0
                or b"=" in window
                or b"^" in window
            ):
                t = _TRACK_TAIL.search(window)
                if t:
                    hold = min(hold, lo + t.start())
        for (_name, _full, partial), lit in zip(self._c.customs, self._c.literals, strict=True):
            lo = max(base, n - _MAX_CUSTOM_HOLD)
            cw = buf[lo:]
            if lit is not None and lit[:1] not in cw:
                continue  # every match starts with its literal: none can be in progress
            for pm in partial.finditer(cw, partial=True):
                if pm.partial and pm.end() > pm.start():
                    hold = min(hold, lo + pm.start())
                    break
        return hold, tail


def _char_cut(buf: bytes, base: int) -> int:
    """Where an incomplete UTF-8 character at the end of ``buf`` starts (``len`` if none)."""
    n = len(buf)
    for k in (1, 2, 3):
        b = buf[n - k] if n - k >= base else 0
        if b >= 0xC0:
            return n - k if panscan.utf8_length(b) > k else n
        if b < 0x80:
            break
    return n


_HEX_OR_DASH = frozenset(b"0123456789abcdefABCDEF-")


def _hex_possible(buf: bytes, start: int, end: int) -> bool:
    """False when no UUID or hex string can overlap ``buf[start:end]``: one would need
    a hex letter or four dashes, and a candidate holds neither unless a hex character
    or dash touches it from outside (or it lies at an edge of what is known)."""
    if start == 0 or end >= len(buf):
        return True
    if buf[start - 1] in _HEX_OR_DASH or buf[end] in _HEX_OR_DASH:
        return True
    seg = buf[start:end]
    return seg.count(b"-") >= 4 or _HEX_LETTER.search(seg) is not None


def _hex_positions(buf: bytes, start: int, end: int, left: bytes) -> set[int]:
    """Positions of ``buf[start:end]`` that lie in a UUID or a long hex string, looking
    a little beyond the candidate (and into already released bytes, ``left``)."""
    lo = max(0, start - _HEX_CONTEXT)
    hi = min(len(buf), end + _HEX_CONTEXT)
    prefix = left if lo == 0 else b""
    ctx = prefix + buf[lo:hi]
    shift = lo - len(prefix)
    found: set[int] = set()
    for m in _HEXY.finditer(ctx):
        if m.group().count(b"-") == 4 or _HEX_LETTER.search(m.group()):
            a, b = max(m.start() + shift, start), min(m.end() + shift, end)
            if a < b:
                found.update(range(a, b))
    return found


def _apply(buf: bytearray, stars: Iterable[Star], offset: int) -> None:
    for i, rep in stars:
        j = i - offset
        if j >= 0 and j + len(rep) <= len(buf):
            buf[j : j + len(rep)] = rep


# ASCII digits and every byte of a multi-byte character (a non-ASCII digit is one).
_DIGITISH = bytes(range(48, 58)) + bytes(range(0x80, 0x100))


def digits_possible(data: bytes) -> bool:
    """False when ``data`` cannot hold a card number or track: fewer than 13 bytes that
    could belong to a digit. Ten times cheaper than the RE2 scan."""
    return len(data) - len(data.translate(None, _DIGITISH)) >= 13


_DIGITS = tuple(bytes([d]) for d in b"0123456789")


def _has_digit(buf: bytes) -> bool:
    """True when ``buf`` may hold a digit: an ASCII digit (ten memchr passes, some 20
    times faster than one RE2 scan) or any non-ASCII byte."""
    return any(map(buf.__contains__, _DIGITS)) or not buf.isascii()


def _custom_possible(m: Masker, buf: bytes) -> bool:
    """False when no custom pattern can match in ``buf``: each has a required literal
    whose first byte is absent (memchr; ``lit in buf`` itself skips through a buffer
    without that byte at a tenth of memchr's speed)."""
    return any(lit is None or lit[:1] in buf for lit in m._c.literals)


class StreamMasker:
    """Masks one byte stream chunk by chunk, holding back only what could still
    become a match.

    ``feed`` returns the bytes that are safe to release. While ``pending`` is true the
    caller should call ``flush`` once ``hold_deadline`` seconds have passed without new
    data, so interactive echo is never delayed by more than that.

    What is guaranteed: a card number whose bytes all arrive within ``hold_deadline`` of
    each other (and whose held part stays under ``MAX_HOLD``) is masked exactly as
    ``mask_bytes`` masks it. When a pause longer than the deadline (or the cap) cuts it,
    the bytes before the pause were released as they stood; every digit of the number
    after the pause is masked, so the complete number is never shown.
    """

    def __init__(self, masker: Masker, hold_deadline: float = 0.020) -> None:
        self.masker = masker
        self.hold_deadline = hold_deadline
        self.counts: Counter[str] = Counter()
        self._held = b""
        self._held_stars: list[Star] = []  # relative to the start of _held
        # Released bytes of the run still open at the end of the stream, and which of
        # its positions were masked: new digits are judged together with them.
        self._ctx = b""
        self._ctx_stars: set[int] = set()
        self._left = b""
        self._kept = False  # the last flush kept a cut character back

    @property
    def pending(self) -> int:
        """Number of bytes held back."""
        return len(self._held)

    def feed(self, data: bytes) -> bytes:
        """Add a chunk; return the masked bytes that can be released now."""
        if not data:
            return b""
        self._kept = False
        return self._process(data, final=False)

    def flush(self) -> bytes:
        """Release everything held (deadline passed or stream ended), masked."""
        if not self._held:
            return b""
        return self._process(b"", final=True)

    def _process(self, data: bytes, final: bool) -> bytes:
        m = self.masker
        ctx = self._ctx
        base = len(ctx)
        buf = ctx + self._held + data if (ctx or self._held) else data
        n = len(buf)
        digit = _has_digit(buf)
        hold, tail = m._hold_from(buf, base, digit)
        if final:
            # A deadline does not release a character cut by the chunk (the terminal
            # cannot show it before its last byte anyway): it may be a digit, the first
            # of a number (a full-width one), which could not be masked once its first
            # byte is out. A second flush in a row (the stream ended) releases it.
            cut = _char_cut(buf, base)
            hold = cut if cut < n and not self._kept else n
            self._kept = hold < n
        elif n - hold > MAX_HOLD:
            hold = n
        if digit or (_custom_possible(m, buf) and m.custom_in(buf)):
            stars, later = m._find(buf, base, hold, self._ctx_stars, self.counts, self._left)
        else:
            # Every built-in detector needs digits: a chunk without any (binary zeros,
            # plain text) skips the RE2 scan, the masker's largest cost on bulk output.
            stars, later = [], []
        held_stars = [(i + base, r) for i, r in self._held_stars]
        if stars or held_stars:
            out = bytearray(buf[base:hold])
            _apply(out, stars, base)
            _apply(out, held_stars, base)
            released = bytes(out)
        else:
            released = buf[base:hold]  # nothing to mask: no copy
        self._held_stars = [(i - hold, r) for i, r in later + held_stars if i >= hold]
        self._held = buf[hold:]
        # The context: the released part of the run still open at the end.
        start = min(tail, hold)
        if start < hold:
            starred = {i for i in self._ctx_stars if i >= start}
            starred.update(i for i, _r in stars if start <= i < hold)
            starred.update(i for i, _r in held_stars if start <= i < hold)
            self._ctx, self._ctx_stars = buf[start:hold], {i - start for i in starred}
            if len(self._ctx) > _CTX_CAP:
                self._ctx, self._ctx_stars = _compact(self._ctx, self._ctx_stars)
        else:
            self._ctx, self._ctx_stars = b"", set()
        if start:
            self._left = (self._left + buf[max(0, start - _HEX_CONTEXT) : start])[-_HEX_CONTEXT:]
        return released


def _compact(ctx: bytes, starred: set[int]) -> tuple[bytes, set[int]]:
    """The same open run with what draws nothing dropped and at most its last 40
    digits: bounded memory however long the run's escape sequences are."""
    start = 0
    if ctx.isascii() and b"\x1b" not in ctx:
        # No string can be open: reading from a digit near the end gives the same groups.
        m = _TAIL.search(ctx, len(ctx) - _CTX_CAP)
        start = m.start() if m else 0
    sc = panscan.scan(ctx, start, len(ctx))
    out = bytearray()
    stars: set[int] = set()
    groups = sc.groups
    total = 0
    k = len(groups)
    while k > 0 and total < 40:
        total += len(groups[k - 1])
        k -= 1
    for gi in range(k, len(groups)):
        if gi > k:
            out += sc.joints[gi - 1] or b"x"
        g = groups[gi][-40:]
        for d in g:
            if d.pos in starred:
                stars.add(len(out))
            out += ctx[d.pos : d.pos + len(d.star)]
    if groups and sc.trail:
        out += sc.trail
    cut = ctx[sc.cut :]
    if cut:
        # An open sequence keeps its opening and its last byte (which may begin the
        # terminator): enough for the next chunk to be read the same way.
        out += _open_prefix(cut)
    return bytes(out), stars


def _open_prefix(cut: bytes) -> bytes:
    """A short stand-in for a sequence cut by the end of the buffer."""
    if len(cut) <= 16:
        return cut
    intro = cut[:2] if cut[:1] == b"\x1b" or cut[:1] == b"\xc2" else cut[:1]
    return intro + cut[-1:] if cut[-1:] in (b"\x1b", b"\xc2") else intro
