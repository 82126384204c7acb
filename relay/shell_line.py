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
"""

from __future__ import annotations

import codecs
import re

_CSI = re.compile(r"\x1b\[([0-?]*)([ -/]*)([@-~])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_MAX_CELLS = 16384


def _num(params: str, default: int = 1) -> int:
    head = params.split(";")[0].lstrip("?")
    return int(head) if head.isdigit() and int(head) > 0 else default


class ShellLine:
    """The logical line the shell is drawing, for a terminal ``width`` columns wide."""

    def __init__(self, width: int = 80) -> None:
        self.width = max(1, width)
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        # Outside a command only the current row is kept; inside, all rows from the one
        # where input began, as one flat buffer.
        self._cells: list[str] = []
        self._pos = 0
        self._base: int | None = None
        self._unsure = False

    def resize(self, width: int) -> None:
        """The terminal changed width: a line being typed is redrawn unpredictably."""
        self.width = max(1, width)
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
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == "\x1b":
                m = _CSI.match(text, i)
                if m:
                    self._csi(m.group(1), m.group(3))
                    i = m.end()
                    continue
                m = _OSC.match(text, i)
                if m:
                    i = m.end()
                    continue
                if n - i < 64 and "\n" not in text[i:]:
                    self._pending = text[i:]  # an escape sequence cut by the chunk
                    return
                i += 2
                continue
            if ch == "\r":
                self._pos = self._row_start()
            elif ch == "\n":
                self._line_feed()
            elif ch == "\b":
                if self._pos > self._row_start():
                    self._pos -= 1
            elif ch >= " " and ch != "\x7f":
                self._put(ch)
            i += 1

    def _row_start(self) -> int:
        return (self._pos // self.width) * self.width

    def _line_feed(self) -> None:
        if self._base is None:
            col = self._pos % self.width
            self._cells = []
            self._pos = col
        else:
            self._pos += self.width

    def _put(self, ch: str) -> None:
        if self._pos >= _MAX_CELLS:
            self._unsure = self._base is not None
            return
        if self._base is None and self._pos >= self.width:
            # Autowrap outside a command: only the new row matters.
            self._cells = []
            self._pos %= self.width
        if self._pos < len(self._cells):
            self._cells[self._pos] = ch
        else:
            self._cells.extend(" " * (self._pos - len(self._cells)))
            self._cells.append(ch)
        self._pos += 1

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
            for k in range(lo, min(hi, len(self._cells))):
                self._cells[k] = " "
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
            seg = [" "] * _num(params) + self._cells[self._pos : end]
            # Characters pushed past the right margin are lost, as on a terminal.
            self._cells[self._pos : end] = seg[: row + self.width - self._pos]
        elif final in "Hf" and self._base is not None:
            self._unsure = True  # absolute positioning: the model loses the line


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|\x1b")


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
        for ch in text:
            if ch in "\x7f\b":
                if self._buf:
                    self._buf.pop()
            elif ch == "\x15":
                self._buf.clear()
            elif ch == "\t" or _CONTROL.match(ch):
                self.reliable = False  # completion, history, cursor keys
            else:
                self._buf.append(ch)

    def take(self) -> tuple[str, bool]:
        """(line, reliable); resets."""
        line, ok = "".join(self._buf).strip(), self.reliable
        self._buf.clear()
        self.reliable = True
        return line, ok
