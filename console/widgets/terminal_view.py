"""A terminal drawn from replay's terminal model, line by line.

The widget never parses escape sequences itself: the model (avt, or pyte) does, so OSC,
DCS and other strings a watched session prints end inside the emulator and never reach
the operator's terminal. ``sync()`` compares the model's rows with the rows drawn last
time and refreshes only the rows that changed; each drawn row is kept as a ``Strip`` in
an LRU keyed by (row, generation of that row).
"""

from __future__ import annotations

from rich.color import Color as RichColor
from rich.segment import Segment
from rich.style import Style as RichStyle
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

from replay.terminal import Cell, Color, Cursor, Style, Terminal


def _color(value: Color) -> RichColor | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return RichColor.from_rgb(*value)
    return RichColor.from_ansi(value)


_STYLES: dict[Style, RichStyle] = {}


def rich_style(style: Style) -> RichStyle:
    """The Rich style of a model cell style (memoised: styles repeat a lot)."""
    found = _STYLES.get(style)
    if found is None:
        found = RichStyle(
            color=_color(style.fg),
            bgcolor=_color(style.bg),
            bold=style.bold,
            dim=style.faint,
            italic=style.italic,
            underline=style.underline,
            strike=style.strikethrough,
            blink=style.blink,
            reverse=style.inverse,
        )
        if len(_STYLES) < 4096:
            _STYLES[style] = found
    return found


def row_segments(row: list[Cell], cursor_col: int | None = None) -> list[Segment]:
    """Segments of one screen row; runs of one style become one segment. The right
    halves of wide characters (width 0) are skipped: the left half covers two cells."""
    segments: list[Segment] = []
    text: list[str] = []
    current: Style | None = None
    for x, cell in enumerate(row):
        if cell.width == 0:
            continue
        style = cell.style
        if x == cursor_col:
            if text and current is not None:
                segments.append(Segment("".join(text), rich_style(current)))
                text = []
            cur = rich_style(style) + RichStyle(reverse=not style.inverse)
            segments.append(Segment(cell.text or " ", cur))
            current = None
            continue
        if style != current and text and current is not None:
            segments.append(Segment("".join(text), rich_style(current)))
            text = []
        current = style
        text.append(cell.text or " ")
    if text and current is not None:
        segments.append(Segment("".join(text), rich_style(current)))
    return segments


class TerminalView(Widget):
    """Shows a ``Terminal`` at its own size, top left, clipped to the widget."""

    DEFAULT_CSS = """
    TerminalView {
        width: 1fr;
        height: 1fr;
        background: black;
        color: #d0d0d0;
    }
    """

    def __init__(
        self,
        terminal: Terminal | None = None,
        *,
        show_cursor: bool = True,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._terminal = terminal
        self.show_cursor = show_cursor
        self._rows: list[list[Cell]] = []
        self._generation: list[int] = []
        self._cursor: Cursor | None = None
        self._cache: LRUCache[tuple[int, int, int], Strip] = LRUCache(1024)
        self.redrawn_rows = 0  # rows refreshed by sync(), for tests and benchmarks

    @property
    def terminal(self) -> Terminal | None:
        """The model shown."""
        return self._terminal

    @terminal.setter
    def terminal(self, terminal: Terminal | None) -> None:
        self._terminal = terminal
        self._rows, self._generation, self._cursor = [], [], None
        self._cache.clear()
        self.sync()
        self.refresh()

    def get_content_width(self, container: Size, viewport: Size) -> int:
        """The terminal's width."""
        return self._terminal.size[0] if self._terminal else container.width

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        """The terminal's height."""
        return self._terminal.size[1] if self._terminal else container.height

    def sync(self) -> int:
        """Pick up what changed in the model since the last call; refresh only those
        rows. Returns how many rows were refreshed."""
        term = self._terminal
        if term is None:
            return 0
        rows = term.cells()
        cursor = term.cursor() if self.show_cursor else None
        dirty: set[int] = set()
        if len(rows) != len(self._rows):
            self._generation = (self._generation + [0] * len(rows))[: len(rows)]
            self._rows = [[] for _ in rows]
        for y, row in enumerate(rows):
            if row != self._rows[y]:
                self._rows[y] = row
                dirty.add(y)
        if cursor != self._cursor:
            for c in (self._cursor, cursor):
                if c is not None and c.row < len(rows):
                    dirty.add(c.row)
            self._cursor = cursor
        for y in dirty:
            self._generation[y] += 1
        if dirty and self.is_mounted:
            width = max(self.size.width, 1)
            for y in dirty:
                self.refresh(Region(0, y, width, 1))
        self.redrawn_rows += len(dirty)
        return len(dirty)

    def render_line(self, y: int) -> Strip:
        """One row, from the cache when it has not changed."""
        width = self.size.width
        if y >= len(self._rows):
            return Strip.blank(width, self.rich_style)
        cursor = self._cursor
        cursor_col = cursor.col if cursor and cursor.visible and cursor.row == y else None
        key = (y, self._generation[y], width)
        strip = self._cache.get(key)
        if strip is None:
            segments = row_segments(self._rows[y], cursor_col)
            strip = Strip(segments).adjust_cell_length(width, self.rich_style)
            self._cache[key] = strip
        return strip

    def screen_text(self) -> str:
        """The model's screen as text (tests, accessibility)."""
        return self._terminal.text() if self._terminal else ""
