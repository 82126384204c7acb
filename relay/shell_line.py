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
        """The first keystroke of a new command is being sent: the prompt ends here."""
        if self._base is None:
            self._base = self._pos
            self._unsure = False

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

    def take(self) -> tuple[str, bool]:
        """(line, reliable); resets."""
        line, ok = "".join(self._buf).strip(), self.reliable
        self._buf.clear()
        self.reliable = True
        return line, ok
