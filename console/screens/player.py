"""Recording player: a past session's cast, downloaded from the API, scrubbed through
replay's seek index so that any moment shows at once."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Label, OptionList, Static
from textual.widgets.option_list import Option

from console.screens.base import ConsoleScreen
from console.screens.live import clean
from console.widgets.terminal_view import TerminalView
from console.widgets.timeline import Timeline, fmt_time
from replay.seekindex import Playhead, SeekIndex, advance, apply_event, open_index

TICK = 1 / 30
SEEK_STEP = 5.0
SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


class PlayerScreen(ConsoleScreen):
    """Play, pause, step, seek and jump between markers in one recording."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "play_pause", "Play/Pause"),
        Binding("full_stop", "step", "Step"),
        Binding("left", "seek(-5)", "-5s"),
        Binding("right", "seek(5)", "+5s"),
        Binding("left_square_bracket", "marker(-1)", "Prev marker"),
        Binding("right_square_bracket", "marker(1)", "Next marker"),
        Binding("plus", "speed(1)", "Faster", show=False),
        Binding("minus", "speed(-1)", "Slower", show=False),
        Binding("escape,q", "app.pop_screen", "Back"),
    ]

    def __init__(self, session: dict[str, Any], cast_path: Path | None = None) -> None:
        super().__init__()
        self.session = session
        self.session_id = str(session["id"])
        self._cast_path = cast_path
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.index: SeekIndex | None = None
        self.head: Playhead | None = None
        self.position = 0.0
        self.playing = False
        self.speed = 1.0
        self._last_tick = 0.0

    def compose(self) -> ComposeResult:
        """Terminal, markers, timeline, status."""
        yield Header()
        with Horizontal(id="player-body"):
            yield TerminalView(id="term", show_cursor=False)
            with Vertical(id="side"):
                yield Label("Markers", classes="side-title")
                yield OptionList(id="markers")
        yield Timeline(id="timeline")
        yield Static(Text("loading the recording…"), id="status")
        yield Footer()

    def on_mount(self) -> None:
        """Download, index, show the first frame."""
        self.sub_title = f"Recording: {self.session.get('identity')}@{self.session.get('target')}"
        self.load()
        self.set_interval(TICK, self._tick)

    def on_unmount(self) -> None:
        """The downloaded cast goes with the screen."""
        if self._tmp is not None:
            self._tmp.cleanup()

    @work(exclusive=True, group="player-load", exit_on_error=False)
    async def load(self) -> None:
        """Fetch the cast into a temporary directory and open its seek index."""
        path = self._cast_path
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="castgate-console-")
            path = await self.api.download_cast(
                self.session_id, Path(self._tmp.name) / "session.cast"
            )
        # A downloaded cast is read once: the index stays in memory, never written.
        self.index = await asyncio.to_thread(open_index, path, write=False)
        markers = self.query_one("#markers", OptionList)
        for i, m in enumerate(self.index.markers):
            markers.add_option(Option(Text(f"{fmt_time(m.time)} {clean(m.label)}"), id=f"m{i}"))
        timeline = self.query_one("#timeline", Timeline)
        timeline.duration = self.index.duration
        timeline.set_markers([m.time for m in self.index.markers])
        self.seek(0.0)

    def seek(self, t: float) -> None:
        """Show the screen at ``t`` (clamped to the recording)."""
        index = self.index
        if index is None:
            return
        t = min(max(t, 0.0), index.duration)
        view = self.query_one("#term", TerminalView)
        if self.head is None or t < self.head.time:
            self.head = index.seek(t)
            view.terminal = self.head.terminal
        else:
            advance(self.head, index.cast, t)
        view.sync()
        if view.terminal is not None and view.size.width != view.terminal.size[0]:
            view.refresh(layout=True)
        self.position = t
        self._show_position()

    def _show_position(self) -> None:
        index = self.index
        if index is None:
            return
        self.query_one("#timeline", Timeline).position = self.position
        last = [m.label for m in index.markers if m.time <= self.position]
        state = "playing" if self.playing else "paused"
        self.query_one("#status", Static).update(
            Text(
                f"{state}  {fmt_time(self.position)} / {fmt_time(index.duration)}  "
                f"x{self.speed:g}  " + (f"last marker: {clean(last[-1])}" if last else "")
            )
        )

    def _tick(self) -> None:
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        if not self.playing or self.index is None:
            return
        target = self.position + min(elapsed, 0.5) * self.speed
        if target >= self.index.duration:
            self.playing = False
            target = self.index.duration
        self.seek(target)

    def action_play_pause(self) -> None:
        """Play or pause (from the start again at the end)."""
        if self.index is None:
            return
        if not self.playing and self.position >= self.index.duration:
            self.seek(0.0)
        self.playing = not self.playing
        self._last_tick = time.monotonic()
        self._show_position()

    def action_step(self) -> None:
        """Pause and apply the next event."""
        self.playing = False
        index, head = self.index, self.head
        if index is None or head is None:
            return
        for pos, ev in index.cast.events(head.position, head.time):
            apply_event(head.terminal, ev)
            head.position, head.time = pos, ev.time
            head.events += 1
            break
        self.query_one("#term", TerminalView).sync()
        self.position = head.time
        self._show_position()

    def action_seek(self, delta: float) -> None:
        """Seek relative to the playhead."""
        self.seek(self.position + delta)

    def action_marker(self, direction: int) -> None:
        """Next marker, or the previous one (the one before when just past a marker)."""
        if self.index is None:
            return
        times = [m.time for m in self.index.markers]
        if direction > 0:
            later = [t for t in times if t > self.position + 1e-6]
            if later:
                self.seek(later[0])
        else:
            earlier = [t for t in times if t < self.position - 0.5]
            self.seek(earlier[-1] if earlier else 0.0)

    def action_speed(self, direction: int) -> None:
        """Faster or slower."""
        i = min(range(len(SPEEDS)), key=lambda k: abs(SPEEDS[k] - self.speed))
        self.speed = SPEEDS[min(max(i + direction, 0), len(SPEEDS) - 1)]
        self._show_position()

    @on(Timeline.Seek, "#timeline")
    def _clicked(self, event: Timeline.Seek) -> None:
        self.seek(event.seconds)

    @on(OptionList.OptionSelected, "#markers")
    def _marker_chosen(self, event: OptionList.OptionSelected) -> None:
        if self.index is not None and event.option.id:
            self.seek(self.index.markers[int(event.option.id[1:])].time)
