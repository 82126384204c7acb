"""The player's timeline: a bar with the playhead and the recording's markers, clicked
or keyed to seek."""

from __future__ import annotations

from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style as RichStyle
from textual import events
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget


def fmt_time(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS``."""
    s = int(max(seconds, 0))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Timeline(Widget):
    """One line: elapsed time, a bar (markers as ``|``, the playhead as a block) and
    the duration."""

    DEFAULT_CSS = """
    Timeline {
        height: 1;
        width: 1fr;
    }
    """

    position: reactive[float] = reactive(0.0)
    duration: reactive[float] = reactive(0.0)

    @dataclass
    class Seek(Message):
        """The operator clicked the timeline at ``seconds``."""

        timeline: Timeline
        seconds: float

        @property
        def control(self) -> Timeline:
            """The timeline that was clicked (for ``@on(Timeline.Seek, "#id")``)."""
            return self.timeline

    def __init__(
        self,
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.markers: list[float] = []

    def set_markers(self, times: list[float]) -> None:
        """The times of the recording's markers."""
        self.markers = list(times)
        self.refresh()

    def _bar(self) -> tuple[int, int]:
        left = len(fmt_time(self.duration)) + 1
        width = max(self.size.width - 2 * left, 1)
        return left, width

    def render_line(self, y: int) -> Strip:
        """The bar."""
        if y:
            return Strip.blank(self.size.width)
        left, width = self._bar()
        cells = ["─"] * width
        if self.duration > 0:
            for t in self.markers:
                cells[min(int(t / self.duration * (width - 1)), width - 1)] = "|"
            head = min(int(self.position / self.duration * (width - 1)), width - 1)
        else:
            head = 0
        base = self.rich_style
        marker = base + RichStyle(color="yellow", bold=True)
        segs = [Segment(fmt_time(self.position).rjust(left - 1) + " ", base)]
        for x, ch in enumerate(cells):
            if x == head:
                segs.append(Segment("█", base + RichStyle(color="cyan")))
            else:
                segs.append(Segment(ch, marker if ch == "|" else base))
        segs.append(Segment(" " + fmt_time(self.duration), base))
        return Strip(segs).adjust_cell_length(self.size.width, base)

    def on_click(self, event: events.Click) -> None:
        """Seek to the clicked point."""
        left, width = self._bar()
        x = event.x - left
        if 0 <= x < width and self.duration > 0:
            self.post_message(self.Seek(self, x / max(width - 1, 1) * self.duration))
