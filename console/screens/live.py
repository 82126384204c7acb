"""Live watch: a session's masked output as it happens, policy markers beside it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Label, Log, Static

from console.request_text import clean
from console.screens.base import ConsoleScreen
from console.widgets.terminal_view import TerminalView
from replay.castfile import parse_size
from replay.terminal import new_terminal

__all__ = ["LiveScreen", "clean", "feed_event"]

FRAME_INTERVAL = 1 / 30


def feed_event(view: TerminalView, event: dict[str, Any]) -> bool:
    """Apply a live event that draws (``screen``, ``o``, ``r``) to ``view``'s terminal;
    False for the others (markers, the end), left to the caller."""
    kind = event.get("type")
    data = str(event.get("data", ""))
    if kind == "screen":
        term = new_terminal(int(event.get("width", 80)), int(event.get("height", 24)))
        term.feed(data)
        view.terminal = term
        return True
    if kind == "o" and view.terminal is not None:
        view.terminal.feed(data)
        return True
    if kind == "r" and view.terminal is not None:
        size = parse_size(data)
        if size is not None:
            view.terminal.resize(*size)
            view.refresh(layout=True)
        return True
    return False


class LiveScreen(ConsoleScreen):
    """Watch one live session through the API's WebSocket. The stream is fed to the
    terminal model as it arrives; the view redraws changed rows at most 30 times a
    second."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "app.pop_screen", "Back"),
    ]

    def __init__(self, session: dict[str, Any]) -> None:
        super().__init__()
        self.session = session
        self.session_id = str(session["id"])
        self.markers: list[str] = []
        self.ended: str | None = None
        self.events = 0
        self._dirty = False

    def compose(self) -> ComposeResult:
        """Terminal, marker list, status line."""
        yield Header()
        with Horizontal(id="live-body"):
            yield TerminalView(id="term")
            with Vertical(id="side"):
                yield Label("Markers", classes="side-title")
                yield Log(id="markers", auto_scroll=True)
        yield Static(Text(self._status()), id="status")
        yield Footer()

    def _status(self) -> str:
        s = self.session
        state = f"ended: {self.ended}" if self.ended is not None else "live"
        return clean(
            f"{s.get('identity')}@{s.get('target')} ({s.get('protocol')})  "
            f"session {self.session_id}  {state}"
        )

    def on_mount(self) -> None:
        """Connect, and redraw at a bounded rate."""
        self.sub_title = f"Live: {self.session.get('identity')}@{self.session.get('target')}"
        self.watch_stream()
        self.set_interval(FRAME_INTERVAL, self._flush)

    def _flush(self) -> None:
        if self._dirty:
            self._dirty = False
            self.query_one("#term", TerminalView).sync()

    @work(exclusive=True, group="live", exit_on_error=False)
    async def watch_stream(self) -> None:
        """Read the WebSocket until the session ends."""
        view = self.query_one("#term", TerminalView)
        log = self.query_one("#markers", Log)
        async for event in self.api.live(self.session_id):
            kind = event.get("type")
            data = str(event.get("data", ""))
            self.events += 1
            if feed_event(view, event):
                if kind != "screen":  # a new screen is drawn as it is set
                    self._dirty = True
            elif kind == "m":
                self.add_marker(float(event.get("t", 0.0)), data, log)
            elif kind == "end":
                self.ended = data
                self.query_one("#status", Static).update(Text(self._status()))
        self._flush()

    def add_marker(self, t: float, text: str, log: Log) -> None:
        """A policy event, stamped with its local time."""
        stamp = datetime.fromtimestamp(t).strftime("%H:%M:%S") if t else "--:--:--"
        line = f"{stamp} {clean(text)}"
        self.markers.append(line)
        log.write_line(line)
