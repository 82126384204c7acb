"""Reconstruct the command line a user submits in an interactive shell from what the
shell echoed, not from raw keystrokes, so editing keys, completion and history recall
cannot disguise a command from the policy.

Between the first keystroke of a command and its Enter, the shell's line editor only
draws that one logical line, which may wrap over several rows. The model keeps it as a
flat buffer of ``width`` cells per row, starting at the row where input began: printable
characters overwrite at the cursor; CR, LF, BS and the CSI sequences line editors use
(cursor up/down/left/right/column, erase in line and display, delete and insert
characters) move or edit. ``mark_input_start`` is called when the first keystroke of a
command is sent, so the prompt ends at the cursor; at Enter, ``submitted`` returns what
follows it. Anything the model cannot follow (absolute cursor positioning, clearing the
screen, moving above the start row, a resize) makes it say it is unsure, and the relay
fails closed.

Escape strings (OSC titles, DCS, APC, PM, SOS) are skipped up to their terminator even
across chunks, and a sequence cut by a chunk waits for the next one, so how the output
is chunked never changes what the model reads.

Output can be huge (a 10 MB line of `cat`): the model costs linear time with a small
constant (one regex scan tokenises each chunk, runs of printable characters are placed
in bulk, outside a command only the text after the last CR LF matters and only the last
row of a long run is kept) and bounded memory (``_MAX_CELLS`` cells; a command line
longer than that is unreadable, so the relay refuses it).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Literal

from relay.shell_parse import analyze

# Printable characters (everything but C0 controls and DEL), and SGR (colour) sequences
# among them, which move nothing: one run, placed in bulk.
_RUN = re.compile(r"(?:[^\x00-\x1f\x7f]+|\x1b\[[0-9;:]*m)(?:\x1b\[[0-9;:]*m|[^\x00-\x1f\x7f]+)*")
_SGR = re.compile(r"\x1b\[[0-9;:]*m")
_TOKEN = re.compile(
    "(?P<run>" + _RUN.pattern + ")"
    r"|(?P<csi>\x1b\[(?P<params>[0-?]*)[ -/]*(?P<final>[@-~]))"
    # OSC, DCS, SOS, PM, APC: a string ended by BEL, or by the ESC that starts the next
    # sequence (ESC \ is the string terminator), or not yet (at the end of the chunk).
    r"|(?P<str>\x1b[\]PX^_][^\x07\x1b]*)(?P<bel>\x07)?"
    r"|(?P<bs>\x08+)|(?P<cr>\r)|(?P<lf>\n)"
    # A sequence cut by the end of the chunk: kept for the next one.
    r"|(?P<part>\x1b\[?[ -?]*\Z)"
    r"|(?P<esc>\x1b[ -/]*[0-~])"
    # ESC before a control character: dropped; the control character still acts.
    r"|\x1b"
    r"|[\x00-\x1f\x7f]"
)
_STRING_START = re.compile(r"\x1b[\]PX^_]")
_STRING_END = re.compile(r"[\x07\x1b]")
_MAX_PART = 4096
_MAX_CELLS = 16384
# Larger counts in CSI parameters mean the same as this one (no line is this long);
# parsing them as given would let `ESC [ 999999999 @` allocate gigabytes.
_MAX_PARAM = 65535


def _num(params: str, default: int = 1) -> int:
    head = params.split(";")[0].lstrip("?")
    if not head.isascii() or not head.isdigit():
        return default
    # int() of thousands of digits is slow (and refused past 4300): a long run is huge.
    value = int(head) if len(head) <= 6 else _MAX_PARAM
    return min(value, _MAX_PARAM) if value > 0 else default


class ShellLine:
    """The logical line the shell is drawing, for a terminal ``width`` columns wide."""

    def __init__(self, width: int = 80) -> None:
        self.width = max(1, min(width, _MAX_CELLS))
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self._in_string = False
        # Outside a command only the current row is kept; inside, all rows from the one
        # where input began, as one flat buffer.
        self._cells: list[str] = []
        self._pos = 0
        self._base: int | None = None
        self._unsure = False
        self._break_pending = False

    def resize(self, width: int) -> None:
        """The terminal changed width: a line being typed is redrawn unpredictably."""
        self.width = max(1, min(width, _MAX_CELLS))
        if self._base is not None:
            self._unsure = True

    @property
    def awaiting(self) -> bool:
        """True between the first keystroke of a command and its submission."""
        return self._base is not None

    def mark_input_start(self) -> None:
        """The first keystroke of a new command is being sent: the prompt ends here.
        Sent before the shell answered the last submission with a line break, the
        keystroke is typeahead: where the next prompt ends is unknown, so is the line."""
        if self._base is None:
            self._base = self._pos
            self._unsure = self._break_pending

    def expect_break(self) -> None:
        """A line was submitted or discarded: until the shell's output shows a line
        break, the shell may still be on it (the key was rebound, Ctrl-C ignored)."""
        self._break_pending = True

    @property
    def break_pending(self) -> bool:
        """True while the line break ``expect_break`` waits for has not been seen."""
        return self._break_pending

    def mark_unsure(self) -> None:
        """The line can no longer be read (a key the model cannot follow was sent)."""
        if self._base is not None:
            self._unsure = True

    def peek(self) -> str | None:
        """The command being typed, as ``submitted`` would return it, without ending
        it; None when the model cannot tell."""
        if self._base is None:
            return ""
        if self._unsure:
            return None
        return "".join(self._cells[self._base :]).strip()

    def submitted(self) -> str | None:
        """The command after the prompt, or None when the model cannot tell."""
        base, self._base = self._base, None
        unsure, self._unsure = self._unsure, False
        if unsure:
            self._in_string = False  # output was skipped: string state is unknown
        text = "".join(self._cells[base:]) if base is not None else ""
        self._row_only()
        if base is None:
            return ""
        return None if unsure else text.strip()

    def abandon(self) -> None:
        """The line was discarded (Ctrl-C, Ctrl-D)."""
        self._base = None
        self._unsure = False
        self._row_only()

    def _row_only(self) -> None:
        start = (self._pos // self.width) * self.width
        self._cells = self._cells[start : start + self.width]
        self._pos -= start

    # -- output ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Process shell output."""
        text = self._pending + self._dec.decode(data)
        self._pending = ""
        if self._break_pending and self._base is None and "\n" in text:
            self._break_pending = False
        if self._base is not None and self._unsure:
            return  # this command line is unreadable whatever follows: save the work
        if self._in_string:
            end = _STRING_END.search(text)
            if end is None:
                return  # still inside the string
            self._in_string = False
            text = text[end.end() :] if end.group() == "\x07" else text[end.start() :]
        if self._base is None:
            # Outside a command nothing survives CR LF (the row is emptied, the cursor
            # at column 0): start after the last one, unless an escape string (which
            # may hold a CR LF) starts before it.
            cut = text.rfind("\r\n")
            if cut >= 0 and not _STRING_START.search(text, 0, cut):
                self._cells = []
                self._pos = 0
                text = text[cut + 2 :]
        # One C-level scan splits the text into tokens; Python runs once per token.
        for m in _TOKEN.finditer(text):
            kind = m.lastgroup
            if kind == "run":
                chars = m.group()
                self._put_run(_SGR.sub("", chars) if "\x1b" in chars else chars)
            elif kind == "csi":
                self._csi(m.group("params"), m.group("final"))
            elif kind == "bs":
                self._pos = max(self._row_start(), self._pos - (m.end() - m.start()))
            elif kind == "cr":
                self._pos = self._row_start()
            elif kind == "lf":
                self._line_feed()
            elif kind == "str":
                self._in_string = m.end() == len(text)
            elif kind == "esc":
                self._esc(m.group()[-1])
            elif kind == "part" and m.end() - m.start() <= _MAX_PART:
                self._pending = m.group()
            # Complete strings ("bel") and other control characters change nothing.

    def _esc(self, final: str) -> None:
        """A two-character escape sequence (charset choices and the like change
        nothing here)."""
        if final == "E":  # next line
            self._pos = self._row_start()
            self._line_feed()
        elif final == "D":  # index: down one row
            self._line_feed()
        elif final in "M8c" and self._base is not None:
            self._unsure = True  # reverse index, restore cursor, reset: position lost

    def _row_start(self) -> int:
        return (self._pos // self.width) * self.width

    def _line_feed(self) -> None:
        if self._base is None:
            col = self._pos % self.width
            self._cells = []
            self._pos = col
        else:
            self._pos += self.width
            if self._row_start() >= len(self._cells):
                # A line editor moves down only within the rows its line occupies; a
                # line feed onto a row the line never reached is output (a background
                # job, an accepted line, a completion list): from here the model cannot
                # tell the shell's line from what else was printed.
                self._unsure = True

    def _put_run(self, run: str) -> None:
        """Printable characters at the cursor, as a terminal with autowrap draws them."""
        width = self.width
        if self._base is None:
            # Outside a command only the current row is kept: when the run wraps, the
            # rows it fills completely are overwritten anyway; skip straight to its last
            # row (full rows only, so the result is the same as drawing every row).
            if self._pos >= width:
                self._cells = []
                self._pos %= width
            room = width - self._pos
            if len(run) > room:
                self._write(run[:room])
                rest = run[room:]
                keep = (len(rest) - 1) % width + 1
                self._cells = []
                self._pos = 0
                run = rest[len(rest) - keep :]
            self._write(run)
            return
        room = _MAX_CELLS - self._pos
        if len(run) > room:
            # Longer than the model keeps: this command line cannot be read.
            self._unsure = True
            run = run[: max(room, 0)]
        self._write(run)

    def _write(self, run: str) -> None:
        pos = min(self._pos, _MAX_CELLS)
        if not run or pos >= _MAX_CELLS:
            return
        cells = self._cells
        if pos > len(cells):
            cells.extend(" " * (pos - len(cells)))
        cells[pos : pos + len(run)] = run
        self._pos = pos + len(run)

    def _csi(self, params: str, final: str) -> None:
        row = self._row_start()
        col = self._pos - row
        if final == "C":
            self._pos = row + min(self.width - 1, col + _num(params))
        elif final == "D":
            self._pos = row + max(0, col - _num(params))
        elif final == "G":
            self._pos = row + min(self.width - 1, _num(params) - 1)
        elif final == "A":
            if self._base is not None:
                self._pos -= self.width * _num(params)
                if self._pos < (self._base // self.width) * self.width:
                    self._unsure = True  # above the row where the command began
                    self._pos = max(self._pos, 0)
        elif final == "B":
            self._pos += self.width * _num(params) if self._base is not None else 0
        elif final == "K":
            mode = _num(params, 0) if params else 0
            end = row + self.width
            if mode == 0:
                lo, hi = self._pos, end
            elif mode == 1:
                lo, hi = row, self._pos + 1
            else:
                lo, hi = row, end
            hi = min(hi, len(self._cells))
            if hi > lo:
                self._cells[lo:hi] = " " * (hi - lo)
        elif final == "J":
            mode = _num(params, 0) if params else 0
            if mode == 0:
                del self._cells[self._pos :]
            elif self._base is not None:
                self._unsure = True
        elif final == "P":
            end = min(row + self.width, len(self._cells))
            k = _num(params)
            seg = self._cells[self._pos : end]
            self._cells[self._pos : end] = seg[k:] + [" "] * min(k, len(seg))
        elif final == "@":
            end = min(row + self.width, len(self._cells))
            seg = [" "] * min(_num(params), self.width) + self._cells[self._pos : end]
            # Characters pushed past the right margin are lost, as on a terminal (and
            # the model never grows past _MAX_CELLS).
            margin = min(row + self.width, _MAX_CELLS)
            self._cells[self._pos : end] = seg[: max(margin - self._pos, 0)]
        elif final in "Hf" and self._base is not None:
            self._unsure = True  # absolute positioning: the model loses the line


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|\x1b")
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TypedLine:
    """Fallback when nothing was echoed: the line as typed, with backspace and Ctrl-U
    applied. ``reliable`` is false once cursor or history keys were used."""

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.reliable = True

    def feed(self, data: bytes) -> None:
        """Process keystrokes (without the Enter)."""
        text = self._dec.decode(data)
        if not _ANY_CONTROL.search(text):
            self._append(text)  # plain typing or a paste: no per-character work
            return
        for ch in text:
            if ch in "\x7f\b":
                if self._buf:
                    self._buf.pop()
            elif ch == "\x15":
                self._buf.clear()
            elif ch == "\t" or _CONTROL.match(ch):
                self.reliable = False  # completion, history, cursor keys
            else:
                self._append(ch)

    def _append(self, text: str) -> None:
        room = _MAX_CELLS - len(self._buf)
        if len(text) > room:
            # A line longer than the echo model keeps is not read either.
            self.reliable = False
            text = text[: max(room, 0)]
        self._buf.extend(text)

    def peek(self) -> tuple[str, bool]:
        """(line, reliable), without resetting."""
        return "".join(self._buf).strip(), self.reliable

    def take(self) -> tuple[str, bool]:
        """(line, reliable); resets."""
        line, ok = "".join(self._buf).strip(), self.reliable
        self._buf.clear()
        self.reliable = True
        return line, ok


# -- keystrokes ----------------------------------------------------------------------

KeyKind = Literal["edit", "accept", "operate", "eof", "interrupt", "other", "execute"]

# Keys that only edit the line in place in every line editor castgate models (readline
# in emacs mode, zle, a cooked tty): the echo shows their effect, nothing runs.
_EDIT_CONTROLS = frozenset(b"\x01\x02\x05\x06\x08\x09\x0b\x0c\x0e\x10\x15\x17\x19\x7f")
_EDIT_CSI = re.compile(rb"\x1b\[(?:1;[2-8])?[ABCDHF]|\x1b\[[1-8](?:;[2-8])?~")
_EDIT_SS3 = frozenset(b"ABCDHF")
_KEY = re.compile(
    rb"(?P<paste>\x1b\[20[01]~)"
    rb"|(?P<csi>\x1b\[[0-?]*[ -/]*[@-~])"
    rb"|(?P<ss3>\x1bO[\x20-\x7e])"
    # An escape sequence cut by the end of the chunk: completed by the next one.
    rb"|(?P<part>\x1b(?:\[[0-?]*[ -/]*|O)?\Z)"
    rb"|(?P<meta>\x1b[\x00-\xff])"
    rb"|(?P<text>[^\x00-\x1f\x7f]+)"
    rb"|(?P<ctl>[\x00-\x1f\x7f])",
    re.S,
)


def _char_len(data: bytes) -> int:
    """Length of the first UTF-8 character of ``data`` (1 for an invalid byte)."""
    lead = data[0]
    size = 2 if lead >= 0xC0 else 1
    size = 3 if lead >= 0xE0 else size
    size = 4 if lead >= 0xF0 else size
    return min(size, len(data))


def _partial_char(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:  # a lead byte: complete if the character fits
            return back if _char_len(data[-back:] + b"\x80\x80\x80") > back else 0
    return 0


@dataclass(frozen=True)
class Key:
    """One keystroke (or a run of printable ones) and what it may do to the line."""

    kind: KeyKind
    data: bytes
    unsure: bool = False
    """After this key the model cannot follow the line (a newline inserted literally)."""


class KeyReader:
    """Sorts an interactive shell's keystrokes by what they can do: ``edit`` keys
    (printable text, BS/DEL, Tab, arrows, Home/End, Ctrl-A/B/E/F/K/L/N/P/U/W/Y) only
    change the line in place and pass unchecked; ``accept`` (CR, Ctrl-J, keypad Enter)
    runs it; ``operate`` (Ctrl-O, operate-and-get-next) runs it and draws the next
    history line; ``eof`` (Ctrl-D) exits on an empty line; ``interrupt`` (Ctrl-C)
    discards it; ``execute`` (Ctrl-X Ctrl-E, and ``v`` after an Escape: edit and
    execute) runs what an editor makes of it. Every other key is ``other``: a key the
    relay does not model might run the line (a binding, Meta-Enter, a vi-mode
    command), so the line is checked before it is sent. After a bare Escape or a Meta
    key the editor may be in vi command mode, where letters are commands: until the
    line ends, printable keys are ``other`` too."""

    def __init__(self) -> None:
        self._pending = b""
        self._paste = False
        self._vi = False
        self._prefix: bytes | None = None

    def line_ended(self) -> None:
        """The line was submitted or discarded: a new one starts in insert mode."""
        self._vi = False
        self._prefix = None

    def feed(self, data: bytes) -> list[Key]:
        """Split keystrokes; a sequence cut at the end waits for the next call."""
        data, self._pending = self._pending + data, b""
        keys: list[Key] = []
        for m in _KEY.finditer(data):
            kind = m.lastgroup
            raw = m.group()
            if kind == "text" and m.end() == len(data):
                cut = _partial_char(raw)
                if cut:
                    # A character cut by the end of the chunk: completed by the next one.
                    self._pending, raw = raw[-cut:], raw[:-cut]
                    if not raw:
                        continue
            if kind == "text" and self._prefix is not None and len(raw) > 1:
                # Only the first character belongs to the prefix key.
                first = _char_len(raw)
                keys.append(self._after_prefix(self._classify(kind, raw[:first]), raw[:first]))
                raw = raw[first:]
                if not raw:
                    continue
            if kind == "text" and self._vi and len(raw) > 1 and b"v" in raw:
                # vi command mode: each letter is a command, and ``v`` executes.
                for part in re.split(rb"(v)", raw):
                    if part:
                        keys.append(self._after_prefix(self._classify(kind, part), part))
                continue
            if kind == "part":
                if len(raw) < 64:
                    self._pending = raw
                else:
                    keys.append(Key("other", raw))
                continue
            keys.append(self._after_prefix(self._classify(kind, raw), raw))
        return keys

    def _after_prefix(self, key: Key, raw: bytes) -> Key:
        prefix, self._prefix = self._prefix, None
        if key.kind == "other" and raw in (b"\x18", b"\x16"):
            self._prefix = raw  # Ctrl-X, Ctrl-V: the next key is theirs
        if prefix is None:
            return key
        if prefix == b"\x18" and raw == b"\x05":
            return Key("execute", raw)
        if key.kind == "execute":
            return key
        # Whatever follows a prefix is a command of its own (Ctrl-V inserts it
        # literally: a newline so inserted is not a submission).
        return Key("other", raw, unsure=prefix == b"\x16")

    def _classify(self, kind: str | None, raw: bytes) -> Key:
        if kind == "paste":
            self._paste = raw == b"\x1b[200~"
            return Key("edit", raw)
        if kind == "text":
            if not self._vi:
                return Key("edit", raw)
            return Key("execute" if b"v" in raw else "other", raw)
        if kind == "ctl":
            return self._control(raw)
        if kind == "csi":
            return Key("edit" if _EDIT_CSI.fullmatch(raw) else "other", raw)
        if kind == "ss3":
            final = raw[2]
            if final in _EDIT_SS3:
                return Key("edit", raw)
            return Key("accept" if final == ord("M") else "other", raw)
        # A Meta key or a bare Escape: vi command mode may follow (Escape then ``v``
        # is edit-and-execute there).
        self._vi = True
        return Key("execute" if raw[1:] == b"v" else "other", raw)

    def _control(self, raw: bytes) -> Key:
        byte = raw[0]
        if self._paste:
            # Pasted text is inserted literally; a pasted newline does not run the line
            # but makes it a multi-line buffer the model cannot read.
            if raw in (b"\r", b"\n"):
                return Key("other", raw, unsure=True)
            return Key("edit", raw)
        if raw in (b"\r", b"\n"):
            return Key("accept", raw)
        if byte in _EDIT_CONTROLS:
            return Key("edit", raw)
        if raw == b"\x0f":
            return Key("operate", raw)
        if raw == b"\x04":
            return Key("eof", raw)
        if raw == b"\x03":
            return Key("interrupt", raw)
        return Key("other", raw)


# -- stdin of a shell without a PTY --------------------------------------------------

UnitKind = Literal["command", "blank", "opaque", "continuation"]
MAX_UNIT_LINES = 1000
MAX_UNIT_BYTES = 256 << 10


@dataclass(frozen=True)
class ScriptUnit:
    """What a shell reading commands from its stdin parses and runs as one piece."""

    kind: UnitKind
    data: bytes
    """The bytes to forward to the shell if the unit is allowed, newlines included."""
    reason: str | None = None
    """Why the unit is opaque."""

    @property
    def text(self) -> str:
        """The unit as text, without its final newline."""
        return self.data.decode("utf-8", "replace").removesuffix("\n")


class StdinScript:
    """Cuts the stdin of a shell without a PTY into the units the shell runs: complete
    lines, joined while ``analyze`` says more lines would complete them (an open
    quote, ``for ... do`` without ``done``, a here-document's body up to its
    delimiter, so the body is never checked as commands). Bounded: a unit past
    ``max_lines`` lines or ``max_bytes`` bytes is opaque, and the rest of its last line
    follows it as a ``continuation`` (the same decision applies)."""

    def __init__(self, max_lines: int = MAX_UNIT_LINES, max_bytes: int = MAX_UNIT_BYTES) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._unit = bytearray()
        self._lines = 0
        self._partial = bytearray()
        self._rest_of_line = False

    def feed(self, data: bytes) -> list[ScriptUnit]:
        """Take stdin bytes; returns the units they complete, in order."""
        out: list[ScriptUnit] = []
        if self._rest_of_line:
            nl = data.find(b"\n")
            rest, data = (data, b"") if nl < 0 else (data[: nl + 1], data[nl + 1 :])
            if rest:
                out.append(ScriptUnit("continuation", rest))
            if nl < 0:
                return out
            self._rest_of_line = False
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            self._partial += data[start : nl + 1]
            start = nl + 1
            self._line_done(out)
        self._partial += data[start:]
        if len(self._unit) + len(self._partial) > self.max_bytes:
            out.append(self._opaque(f"a line longer than {self.max_bytes} bytes"))
            self._rest_of_line = True
        return out

    def finish(self) -> list[ScriptUnit]:
        """End of input: what is left is a unit of its own (a last line without a
        newline runs too); still incomplete, it is opaque."""
        if not (self._unit or self._partial):
            return []
        data = bytes(self._unit + self._partial)
        self._unit.clear()
        self._partial.clear()
        self._lines = 0
        text = data.decode("utf-8", "replace")
        if not text.strip():
            return [ScriptUnit("blank", data)]
        if analyze(text).incomplete:
            return [ScriptUnit("opaque", data, "incomplete at the end of the input")]
        return [ScriptUnit("command", data)]

    def _line_done(self, out: list[ScriptUnit]) -> None:
        self._unit += self._partial
        self._partial.clear()
        self._lines += 1
        text = self._unit.decode("utf-8", "replace")
        if self._lines == 1 and not text.strip():
            out.append(ScriptUnit("blank", bytes(self._unit)))
            self._unit.clear()
            self._lines = 0
            return
        if not analyze(text.removesuffix("\n")).incomplete:
            out.append(ScriptUnit("command", bytes(self._unit)))
            self._unit.clear()
            self._lines = 0
        elif self._lines >= self.max_lines or len(self._unit) > self.max_bytes:
            out.append(self._opaque(f"a construct longer than {self.max_lines} lines"))

    def _opaque(self, reason: str) -> ScriptUnit:
        unit = ScriptUnit("opaque", bytes(self._unit + self._partial), reason)
        self._unit.clear()
        self._partial.clear()
        self._lines = 0
        return unit
