"""The terminal model replay runs casts through: one small interface, two backends.

``AvtTerminal`` wraps pyavt (bindings to avt, the Rust emulator asciinema's player and
agg use): about 100 MB/s on coloured output here, alternate screen, wide characters and
VS16 emoji. ``PyteTerminal`` is the fallback (pyte 0.8.2, about 0.5 MB/s) with the gaps
DESIGN.md lists filled in: alternate screen (modes 47/1047/1049) and zero-width joiners
or variation selectors that no longer drop the rest of a chunk.

A snapshot (``snapshot()`` / ``restore()``) is everything needed to continue feeding as
if nothing had happened. What avt's ``dump()`` preserves and what it does not was
established by randomised comparison (tests/unit/test_replay_terminal.py):

- kept: both buffers, cursor and its visibility, pen, saved cursors, charsets, tab
  stops, scroll region, origin/auto-wrap/insert/new-line/cursor-key modes, pending
  wrap, and which lines are soft-wrapped;
- lost, so stored alongside the dump or avoided:
  * scrollback. The model keeps none (``scrollback_limit=0``): replay shows the screen,
    and a dump then holds the whole buffer;
  * the size of the inactive primary buffer. avt resizes only the active buffer and
    reflows the other one when it comes back, so a resize during a full-screen app
    leaves the primary screen at the old size; the snapshot records that size and
    restores the primary part of the dump at it;
  * the parser's position inside an escape sequence cut by an event boundary. A
    snapshot is only taken in the parser's ground state (``snapshot_ok``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from recorder.errors import CastgateError

Color = int | tuple[int, int, int] | None


class TerminalError(CastgateError):
    """A terminal backend that is missing or a snapshot that cannot be restored."""


@dataclass(frozen=True, slots=True)
class Style:
    """Graphic rendition of a cell; colours are None (default), 0-255 or (r, g, b)."""

    fg: Color = None
    bg: Color = None
    bold: bool = False
    faint: bool = False
    italic: bool = False
    underline: bool = False
    strikethrough: bool = False
    blink: bool = False
    inverse: bool = False

    def sgr(self) -> str:
        """The SGR sequence that sets this style from a reset pen."""
        parts = ["0"]
        for flag, code in (
            (self.bold, "1"),
            (self.faint, "2"),
            (self.italic, "3"),
            (self.underline, "4"),
            (self.blink, "5"),
            (self.inverse, "7"),
            (self.strikethrough, "9"),
        ):
            if flag:
                parts.append(code)
        for color, base in ((self.fg, 38), (self.bg, 48)):
            if isinstance(color, tuple):
                parts.append(f"{base};2;{color[0]};{color[1]};{color[2]}")
            elif isinstance(color, int):
                if color < 8:
                    parts.append(str(base - 8 + color))
                elif color < 16:
                    parts.append(str(base + 52 + color - 8))
                else:
                    parts.append(f"{base};5;{color}")
        return "\x1b[" + ";".join(parts) + "m"


DEFAULT_STYLE = Style()


@dataclass(frozen=True, slots=True)
class Cell:
    """One screen cell: its text (a character, maybe with combining marks), the
    number of columns it covers (0 for the right half of a wide character) and style."""

    text: str
    width: int
    style: Style


@dataclass(frozen=True, slots=True)
class Cursor:
    """Cursor position (0-based) and visibility."""

    row: int
    col: int
    visible: bool


# --- the escape-sequence parser's state, for choosing snapshot points -------------
#
# A mirror of avt's parser (Paul Williams' DEC ANSI parser) that tracks only the state,
# not parameters. It runs over the end of each chunk only: the characters that move
# the parser "from anywhere" (ESC, CAN, SUB, C1) reset it whatever its state, so the
# state after a chunk depends only on the text from the last such character on, and
# once that text is back in the ground state it stays there.

GROUND, ESCAPE, ESC_INT, CSI_ENTRY, CSI_PARAM, CSI_INT, CSI_IGNORE = range(7)
DCS_ENTRY, DCS_PARAM, DCS_INT, DCS_PASS, DCS_IGNORE, OSC, SOS = range(7, 14)

_ANYWHERE = re.compile("[\x18\x1a\x1b\x80-\x9f]")


def _c0(c: int) -> bool:
    return c <= 0x17 or c == 0x19 or 0x1C <= c <= 0x1F


def _step(state: int, c: int) -> int:
    """One transition of the parser state on code point ``c``, in avt's rule order."""
    if c >= 0xA0:
        c = 0x41
    if state == GROUND and (0x20 <= c <= 0x7F or _c0(c)):
        return GROUND
    if state == CSI_PARAM and 0x30 <= c <= 0x3B:
        return CSI_PARAM
    if c == 0x1B:
        return ESCAPE
    if c in (0x18, 0x1A) or 0x80 <= c <= 0x8F or 0x91 <= c <= 0x97 or c in (0x99, 0x9A):
        return GROUND
    if c in (0x98, 0x9E, 0x9F):
        return SOS
    if c == 0x9C:
        return GROUND
    if c == 0x9D:
        return OSC
    if c == 0x90:
        return DCS_ENTRY
    if c == 0x9B:
        return CSI_ENTRY
    return _STEP_BY_STATE[state](c)


def _esc(c: int) -> int:
    if c == 0x5B:
        return CSI_ENTRY
    if c == 0x5D:
        return OSC
    if c == 0x50:
        return DCS_ENTRY
    if c in (0x58, 0x5E, 0x5F):
        return SOS
    if 0x20 <= c <= 0x2F:
        return ESC_INT
    if 0x30 <= c <= 0x7E:
        return GROUND
    return ESCAPE


def _esc_int(c: int) -> int:
    return GROUND if 0x30 <= c <= 0x7E else ESC_INT


def _csi_entry(c: int) -> int:
    if 0x40 <= c <= 0x7E:
        return GROUND
    if 0x30 <= c <= 0x39 or c == 0x3B or 0x3C <= c <= 0x3F:
        return CSI_PARAM
    if 0x20 <= c <= 0x2F:
        return CSI_INT
    if c == 0x3A:
        return CSI_IGNORE
    return CSI_ENTRY


def _csi_param(c: int) -> int:
    if 0x40 <= c <= 0x7E:
        return GROUND
    if 0x3C <= c <= 0x3F:
        return CSI_IGNORE
    if 0x20 <= c <= 0x2F:
        return CSI_INT
    return CSI_PARAM


def _csi_int(c: int) -> int:
    if 0x40 <= c <= 0x7E:
        return GROUND
    if 0x30 <= c <= 0x3F:
        return CSI_IGNORE
    return CSI_INT


def _csi_ignore(c: int) -> int:
    return GROUND if 0x40 <= c <= 0x7E else CSI_IGNORE


def _dcs_entry(c: int) -> int:
    if 0x3C <= c <= 0x3F or 0x30 <= c <= 0x39 or c == 0x3B:
        return DCS_PARAM
    if 0x20 <= c <= 0x2F:
        return DCS_INT
    if 0x40 <= c <= 0x7E:
        return DCS_PASS
    if c == 0x3A:
        return DCS_IGNORE
    return DCS_ENTRY


def _dcs_param(c: int) -> int:
    if 0x40 <= c <= 0x7E:
        return DCS_PASS
    if 0x20 <= c <= 0x2F:
        return DCS_INT
    if c == 0x3A or 0x3C <= c <= 0x3F:
        return DCS_IGNORE
    return DCS_PARAM


def _dcs_int(c: int) -> int:
    if 0x40 <= c <= 0x7E:
        return DCS_PASS
    if 0x30 <= c <= 0x3F:
        return DCS_IGNORE
    return DCS_INT


def _osc(c: int) -> int:
    return GROUND if c == 0x07 else OSC


_STEP_BY_STATE: dict[int, Callable[[int], int]] = {
    GROUND: lambda c: GROUND,
    ESCAPE: _esc,
    ESC_INT: _esc_int,
    CSI_ENTRY: _csi_entry,
    CSI_PARAM: _csi_param,
    CSI_INT: _csi_int,
    CSI_IGNORE: _csi_ignore,
    DCS_ENTRY: _dcs_entry,
    DCS_PARAM: _dcs_param,
    DCS_INT: _dcs_int,
    DCS_PASS: lambda c: DCS_PASS,
    DCS_IGNORE: lambda c: DCS_IGNORE,
    OSC: _osc,
    SOS: lambda c: SOS,
}


def parser_state_after(text: str, state: int = GROUND) -> int:
    """The parser state after ``text`` when it started in ``state``."""
    last = text.rfind("\x1b")
    found = _ANYWHERE.search(text, last + 1)
    while found is not None:
        last = found.start()
        found = _ANYWHERE.search(text, last + 1)
    if last < 0:
        if state == GROUND:
            return GROUND
        start = 0
    else:
        start, state = last + 1, _step(state, ord(text[last]))
    for ch in text[start:]:
        if state == GROUND:
            break  # no "anywhere" character follows, so nothing leaves ground again
        state = _step(state, ord(ch))
    return state


# --- the interface ------------------------------------------------------------------


class Terminal(ABC):
    """A virtual terminal: feed it output, resize it, read the screen, snapshot it."""

    backend: ClassVar[str]

    def __init__(self, cols: int, rows: int) -> None:
        self._parser = GROUND

    @property
    @abstractmethod
    def size(self) -> tuple[int, int]:
        """(cols, rows)."""

    @abstractmethod
    def _feed(self, text: str) -> None: ...

    def feed(self, text: str) -> None:
        """Process terminal output."""
        if text:
            self._feed(text)
            self._parser = parser_state_after(text, self._parser)

    @abstractmethod
    def resize(self, cols: int, rows: int) -> None:
        """Change the terminal size (an ``r`` event)."""

    def feed_scrolled(self, text: str) -> list[str]:
        """``feed``, returning the text of the lines that scrolled off the top (empty
        when the backend cannot tell)."""
        self.feed(text)
        return []

    def resize_scrolled(self, cols: int, rows: int) -> list[str]:
        """``resize``, returning the text of the lines pushed off the top."""
        self.resize(cols, rows)
        return []

    @abstractmethod
    def cursor(self) -> Cursor:
        """Cursor position, clamped to the screen."""

    @abstractmethod
    def cells(self) -> list[list[Cell]]:
        """The visible screen, row by row."""

    def lines(self) -> list[str]:
        """Text of each visible row, trailing blanks removed."""
        return ["".join(c.text for c in row if c.width).rstrip() for row in self.cells()]

    def text(self) -> str:
        """The screen as text: rows joined by newlines, trailing blank rows dropped."""
        rows = self.lines()
        while rows and not rows[-1]:
            rows.pop()
        return "\n".join(rows)

    def screen(self) -> tuple[Any, ...]:
        """A comparable value of everything visible: size, cells, cursor."""
        return (self.size, tuple(tuple(r) for r in self.cells()), self.cursor())

    def snapshot_ok(self) -> bool:
        """True when ``snapshot`` would capture the whole state (the parser is between
        escape sequences and the backend knows all it needs)."""
        return self._parser == GROUND

    @abstractmethod
    def snapshot(self) -> str:
        """The terminal state as text (JSON); valid when ``snapshot_ok()``."""

    @classmethod
    @abstractmethod
    def restore(cls, state: str) -> Terminal:
        """A terminal in the state ``snapshot`` captured."""

    @classmethod
    def version(cls) -> str:
        """Backend name and version; snapshots are only valid for the same one."""
        return cls.backend


# --- avt ----------------------------------------------------------------------------

# A dump switches to the alternate buffer to restore it, or its saved cursor, and ends
# on the active buffer: the alternate buffer is active when the last switch in the
# dump enters it. Screen cells never hold C1 characters, so content cannot fake these.
_ALT_IN_DUMP = "\x9b?1047h"
_ALT_OUT_DUMP = "\x9b?1047l"
# Anything that might switch buffers (modes 47/1047/1049, RIS); false positives only
# cost a dump.
_MAYBE_SWITCH = re.compile("4[79]|\x1bc")


def _avt_color(color: Any) -> Color:
    if color is None:
        return None
    from avt._avt import Color as AvtColor

    if isinstance(color, AvtColor.RGB):
        return (int(color[0]), int(color[1]), int(color[2]))
    return int(color[0])


class AvtTerminal(Terminal):
    """The avt backend (pyavt)."""

    backend = "avt"

    def __init__(self, cols: int, rows: int) -> None:
        super().__init__(cols, rows)
        try:
            from avt._avt import Vt
        except ImportError as exc:  # pragma: no cover - pyavt is a dependency
            raise TerminalError(f"the avt terminal backend is not available: {exc}") from None
        self._vt = Vt(max(cols, 1), max(rows, 1), scrollback_limit=0)
        # Size the primary buffer still has while a full-screen app runs after a resize.
        self._inactive: tuple[int, int] | None = None
        # The primary buffer's size is unknown (a buffer switch after such a resize):
        # no snapshots until the app leaves the alternate screen.
        self._uncertain = False
        self._tail = ""
        self._gone: list[Any] = []

    @classmethod
    def version(cls) -> str:
        """``avt-`` and the pyavt version."""
        from avt._avt import __version__

        return f"avt-{__version__}"

    @property
    def size(self) -> tuple[int, int]:
        """(cols, rows)."""
        cols, rows = self._vt.size
        return int(cols), int(rows)

    def _alt_active(self) -> bool:
        dump = self._vt.dump()
        return dump.rfind(_ALT_IN_DUMP) > dump.rfind(_ALT_OUT_DUMP)

    def _feed(self, text: str) -> None:
        self._gone = self._vt.feed_str(text)[1]
        if (self._inactive is not None or self._uncertain) and _MAYBE_SWITCH.search(
            self._tail + text
        ):
            if not self._alt_active():
                # Back on the primary screen, which avt reflowed to the current size.
                self._inactive, self._uncertain = None, False
            else:
                # Either nothing switched, or the app left and re-entered the alternate
                # screen (the primary buffer now has the current size): cannot tell.
                self._uncertain = True
        self._tail = text[-8:]

    def resize(self, cols: int, rows: int) -> None:
        """Resize; remembers the primary buffer's size if a full-screen app is running."""
        cols, rows = max(cols, 1), max(rows, 1)
        if (cols, rows) == self.size:
            return
        if self._alt_active():
            if self._inactive is None and not self._uncertain:
                self._inactive = self.size
        else:
            self._inactive, self._uncertain = None, False
        self._gone = self._vt.resize(cols, rows)[1]

    def feed_scrolled(self, text: str) -> list[str]:
        """``feed``, returning the lines that scrolled off the top."""
        self._gone = []
        self.feed(text)
        return [line.text.rstrip() for line in self._gone]

    def resize_scrolled(self, cols: int, rows: int) -> list[str]:
        """``resize``, returning the lines pushed off the top."""
        self._gone = []
        self.resize(cols, rows)
        return [line.text.rstrip() for line in self._gone]

    def cursor(self) -> Cursor:
        """Cursor position, clamped to the screen (avt reports col == cols while a
        wrap is pending)."""
        c = self._vt.cursor
        cols, rows = self.size
        return Cursor(min(int(c.row), rows - 1), min(int(c.col), cols - 1), bool(c.visible))

    @staticmethod
    def _style(pen: Any) -> Style:
        return Style(
            fg=_avt_color(pen.foreground),
            bg=_avt_color(pen.background),
            bold=bool(pen.bold),
            faint=bool(pen.faint),
            italic=bool(pen.italic),
            underline=bool(pen.underline),
            strikethrough=bool(pen.strikethrough),
            blink=bool(pen.blink),
            inverse=bool(pen.inverse),
        )

    def cells(self) -> list[list[Cell]]:
        """The visible screen."""
        out: list[list[Cell]] = []
        last_pen: Any = None
        last_style = DEFAULT_STYLE
        for line in self._vt.view():
            row: list[Cell] = []
            for cell in line.cells:
                pen = cell.pen
                if pen != last_pen:
                    last_pen, last_style = pen, self._style(pen)
                row.append(Cell(cell.char, int(cell.width), last_style))
            out.append(row)
        return out

    def lines(self) -> list[str]:
        """Text of each visible row (avt's own text, wide-character padding skipped)."""
        return [line.text.rstrip() for line in self._vt.view()]

    def raw_lines(self) -> list[Any]:
        """avt's line objects (comparable by value), for renderers that cache rows."""
        return list(self._vt.view())

    def snapshot_ok(self) -> bool:
        """Ground state, and the primary buffer's size is known."""
        return self._parser == GROUND and not self._uncertain

    def snapshot(self) -> str:
        """Size, avt dump and the primary buffer's size when it differs."""
        return json.dumps(
            {
                "size": list(self.size),
                "dump": self._vt.dump(),
                "primary_size": list(self._inactive) if self._inactive else None,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def restore(cls, state: str) -> AvtTerminal:
        """Rebuild from ``snapshot()``: when the primary buffer had another size, its
        part of the dump is replayed at that size before the terminal is resized."""
        try:
            data = json.loads(state)
            cols, rows = (int(x) for x in data["size"])
            dump = str(data["dump"])
            primary = data.get("primary_size")
        except (ValueError, KeyError, TypeError) as exc:
            raise TerminalError(f"unreadable avt snapshot: {exc}") from None
        if primary:
            pc, pr = (int(x) for x in primary)
            term = cls(pc, pr)
            cut = dump.find(_ALT_IN_DUMP)
            if cut < 0:
                raise TerminalError("avt snapshot has a primary size but no alternate screen")
            cut += len(_ALT_IN_DUMP)
            term._vt.feed_str(dump[:cut])
            term._vt.resize(cols, rows)
            term._vt.feed_str(dump[cut:])
            term._inactive = (pc, pr)
        else:
            term = cls(cols, rows)
            term._vt.feed_str(dump)
        return term


# --- pyte ---------------------------------------------------------------------------


def _pyte_screen_class() -> type[Any]:
    """pyte's Screen with an alternate buffer and zero-width characters that do not
    end the chunk (built lazily so pyte is imported only when used)."""
    import pyte
    from wcwidth import wcwidth

    alt_modes = {47, 1047, 1049}

    class AltScreen(pyte.Screen):
        """pyte's screen plus the alternate buffer and whole emoji sequences."""

        def __init__(self, columns: int, lines: int) -> None:
            self.alt_active = False
            self.saved_primary: dict[int, dict[int, Any]] | None = None
            super().__init__(columns, lines)

        def reset(self) -> None:
            """RIS: also back to the primary buffer."""
            super().reset()
            self.alt_active = False
            self.saved_primary = None

        def _enter_alt(self, save_cursor: bool) -> None:
            if self.alt_active:
                return
            if save_cursor:
                self.save_cursor()
            self.saved_primary = {y: dict(line) for y, line in self.buffer.items()}
            self.buffer.clear()
            self.alt_active = True
            self.dirty.update(range(self.lines))

        def _leave_alt(self, restore_cursor: bool) -> None:
            if not self.alt_active:
                return
            self.buffer.clear()
            for y, line in (self.saved_primary or {}).items():
                self.buffer[y].update(line)
            self.saved_primary = None
            self.alt_active = False
            if restore_cursor:
                self.restore_cursor()
            self.dirty.update(range(self.lines))

        def set_mode(self, *modes: int, **kwargs: Any) -> None:
            """Modes 47/1047 enter the alternate buffer, 1049 saving the cursor first."""
            if kwargs.get("private"):
                for m in modes:
                    if m in alt_modes:
                        self._enter_alt(save_cursor=m == 1049)
                modes = tuple(m for m in modes if m not in alt_modes)
            super().set_mode(*modes, **kwargs)

        def reset_mode(self, *modes: int, **kwargs: Any) -> None:
            """Modes 47/1047 leave the alternate buffer, 1049 restoring the cursor."""
            if kwargs.get("private"):
                for m in modes:
                    if m in alt_modes:
                        self._leave_alt(restore_cursor=m == 1049)
                modes = tuple(m for m in modes if m not in alt_modes)
            super().reset_mode(*modes, **kwargs)

        def draw(self, data: str) -> None:
            """Draw text; zero-width joiners and variation selectors included."""
            # pyte stops drawing at a zero-width character that is not a combining
            # mark (ZWJ, VS16): attach such characters to the previous cell instead.
            start = 0
            for i, ch in enumerate(data):
                if wcwidth(ch) <= 0 and not unicodedata.combining(ch) and ord(ch) >= 0x20:
                    if i > start:
                        super().draw(data[start:i])
                    self._attach(ch)
                    start = i + 1
            if start < len(data):
                super().draw(data[start:])

        def _attach(self, ch: str) -> None:
            x, y = self.cursor.x, self.cursor.y
            line = self.buffer[y]
            if x >= 2 and line[x - 1].data == "":
                x -= 1  # right half of a wide character
            if x:
                last = line[x - 1]
                line[x - 1] = last._replace(data=last.data + ch)

    return AltScreen


def _char_to_json(ch: Any) -> list[Any]:
    return [
        ch.data,
        ch.fg,
        ch.bg,
        ch.bold,
        ch.italics,
        ch.underscore,
        ch.strikethrough,
        ch.reverse,
        ch.blink,
    ]


def _char_from_json(v: Sequence[Any]) -> Any:
    from pyte.screens import Char

    return Char(str(v[0]), str(v[1]), str(v[2]), *(bool(x) for x in v[3:9]))


def _buffer_to_json(buf: Any) -> dict[str, dict[str, list[Any]]]:
    return {
        str(y): {str(x): _char_to_json(ch) for x, ch in line.items()} for y, line in buf.items()
    }


_PYTE_COLORS_16 = ["black", "red", "green", "brown", "blue", "magenta", "cyan", "white"]


def _pyte_color(name: str) -> Color:
    if name == "default":
        return None
    if name in _PYTE_COLORS_16:
        return _PYTE_COLORS_16.index(name)
    if name.startswith("bright") and name[6:] in _PYTE_COLORS_16:
        return 8 + _PYTE_COLORS_16.index(name[6:])
    if len(name) == 6:
        try:
            return (int(name[0:2], 16), int(name[2:4], 16), int(name[4:6], 16))
        except ValueError:
            return None
    return None


_PYTE_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class PyteTerminal(Terminal):
    """The pyte fallback: slow, but pure Python."""

    backend = "pyte"

    def __init__(self, cols: int, rows: int) -> None:
        super().__init__(cols, rows)
        import pyte

        self._screen = _pyte_screen_class()(max(cols, 1), max(rows, 1))
        self._stream = pyte.Stream(self._screen)

    @classmethod
    def version(cls) -> str:
        """``pyte-`` and the pyte version."""
        from importlib.metadata import version

        return f"pyte-{version('pyte')}"

    @property
    def size(self) -> tuple[int, int]:
        """(cols, rows)."""
        return int(self._screen.columns), int(self._screen.lines)

    def _feed(self, text: str) -> None:
        self._stream.feed(text)

    def resize(self, cols: int, rows: int) -> None:
        """Resize the screen (pyte clips at the top and the right)."""
        self._screen.resize(max(rows, 1), max(cols, 1))

    def cursor(self) -> Cursor:
        """Cursor position, clamped to the screen."""
        c = self._screen.cursor
        cols, rows = self.size
        return Cursor(min(int(c.y), rows - 1), min(int(c.x), cols - 1), not c.hidden)

    def cells(self) -> list[list[Cell]]:
        """The visible screen."""
        from wcwidth import wcswidth

        cols, rows = self.size
        blank = self._screen.default_char
        out: list[list[Cell]] = []
        for y in range(rows):
            # .get, not [y]: the buffer is a defaultdict, and whether a row exists
            # changes what pyte's line deletion does later. Reading must not write.
            line = self._screen.buffer.get(y, {})
            row: list[Cell] = []
            for x in range(cols):
                ch = line.get(x, blank)
                width = 0 if ch.data == "" else max(wcswidth(ch.data[:1]), 1)
                # pyte keeps C1 controls (NEL, ...) as (combining) characters: drawn as
                # they are, they would act on the viewer's terminal. avt keeps none.
                text = ch.data
                if not text.isprintable():
                    text = _PYTE_CONTROLS.sub("", text)
                row.append(
                    Cell(
                        text or " ",
                        width,
                        Style(
                            fg=_pyte_color(ch.fg),
                            bg=_pyte_color(ch.bg),
                            bold=ch.bold,
                            italic=ch.italics,
                            underline=ch.underscore,
                            strikethrough=ch.strikethrough,
                            blink=ch.blink,
                            inverse=ch.reverse,
                        ),
                    )
                )
            out.append(row)
        return out

    def snapshot(self) -> str:
        """Every field of the screen, as JSON (never pickle: index files are input)."""
        from pyte import charsets

        s = self._screen
        maps = {id(v): k for k, v in charsets.MAPS.items()}

        def charset(table: Any) -> str:
            return maps.get(id(table), "B")

        def cursor(c: Any) -> list[Any]:
            return [c.x, c.y, c.hidden, _char_to_json(c.attrs)]

        state = {
            "size": [s.columns, s.lines],
            "buffer": _buffer_to_json(s.buffer),
            "cursor": cursor(s.cursor),
            "savepoints": [
                [
                    cursor(p.cursor),
                    charset(p.g0_charset),
                    charset(p.g1_charset),
                    p.charset,
                    p.origin,
                    p.wrap,
                ]
                for p in s.savepoints
            ],
            "mode": sorted(s.mode),
            "margins": list(s.margins) if s.margins else None,
            "charset": s.charset,
            "g0": charset(s.g0_charset),
            "g1": charset(s.g1_charset),
            "tabstops": sorted(s.tabstops),
            "title": s.title,
            "icon_name": s.icon_name,
            "saved_columns": s.saved_columns,
            "alt": s.alt_active,
            "primary": None
            if s.saved_primary is None
            else {
                str(y): {str(x): _char_to_json(ch) for x, ch in line.items()}
                for y, line in s.saved_primary.items()
            },
        }
        return json.dumps(state, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def restore(cls, state: str) -> PyteTerminal:
        """Rebuild from ``snapshot()``."""
        from pyte import charsets
        from pyte.screens import Cursor as PyteCursor
        from pyte.screens import Margins, Savepoint

        try:
            d = json.loads(state)
            term = cls(int(d["size"][0]), int(d["size"][1]))
            s = term._screen

            def cursor(v: Sequence[Any]) -> Any:
                c = PyteCursor(int(v[0]), int(v[1]), _char_from_json(v[3]))
                c.hidden = bool(v[2])
                return c

            def charset(name: str) -> Any:
                return charsets.MAPS.get(name, charsets.LAT1_MAP)

            s.buffer.clear()
            for y, line in d["buffer"].items():
                row = s.buffer[int(y)]
                for x, ch in line.items():
                    row[int(x)] = _char_from_json(ch)
            s.cursor = cursor(d["cursor"])
            s.savepoints = [
                Savepoint(
                    cursor(p[0]), charset(p[1]), charset(p[2]), int(p[3]), bool(p[4]), bool(p[5])
                )
                for p in d["savepoints"]
            ]
            s.mode = {int(m) for m in d["mode"]}
            s.margins = Margins(*d["margins"]) if d["margins"] else None
            s.charset = int(d["charset"])
            s.g0_charset = charset(d["g0"])
            s.g1_charset = charset(d["g1"])
            s.tabstops = {int(t) for t in d["tabstops"]}
            s.title = d["title"]
            s.icon_name = d["icon_name"]
            s.saved_columns = d["saved_columns"]
            s.alt_active = bool(d["alt"])
            s.saved_primary = (
                None
                if d["primary"] is None
                else {
                    int(y): {int(x): _char_from_json(ch) for x, ch in line.items()}
                    for y, line in d["primary"].items()
                }
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise TerminalError(f"unreadable pyte snapshot: {exc}") from None
        return term


BACKENDS: dict[str, type[Terminal]] = {"avt": AvtTerminal, "pyte": PyteTerminal}


def default_backend() -> str:
    """``avt`` when pyavt imports, else ``pyte``."""
    try:
        import avt  # noqa: F401
    except ImportError:  # pragma: no cover - pyavt is a dependency
        return "pyte"
    return "avt"


def backend_class(name: str | None = None) -> type[Terminal]:
    """The terminal class of a backend name (default: the best available)."""
    name = name or default_backend()
    try:
        return BACKENDS[name]
    except KeyError:
        raise TerminalError(
            f"unknown terminal backend {name!r} (choose {', '.join(BACKENDS)})"
        ) from None


def new_terminal(cols: int, rows: int, backend: str | None = None) -> Terminal:
    """A fresh terminal of the given size."""
    return backend_class(backend)(cols, rows)
