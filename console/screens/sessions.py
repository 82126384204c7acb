"""Sessions: live and recent sessions in a table, filtered as you type."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Input

from console.messages import ApprovalsChanged
from console.screens.base import ConsoleScreen
from console.screens.live import clean
from console.widgets.timeline import fmt_time

COLUMNS = ("identity", "target", "protocol", "started", "duration", "status", "pending", "title")


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def session_cells(row: dict[str, Any], pending: int, now: datetime) -> tuple[str, ...]:
    """The table cells of one session."""
    started = _parse(row.get("started_at"))
    ended = _parse(row.get("ended_at"))
    duration = ""
    if started is not None:
        duration = fmt_time(((ended or now) - started).total_seconds())
    return (
        str(row.get("identity", "")),
        str(row.get("target", "")),
        str(row.get("protocol", "")),
        started.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if started else "",
        duration,
        str(row.get("status", "")),
        str(pending) if pending else "",
        str(row.get("title") or ""),
    )


class SessionsScreen(ConsoleScreen):
    """Every session the API lists, newest first; Enter opens the live watch of a
    live session or the player of a finished one."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("ctrl+r", "reload", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self._shown: list[tuple[str, tuple[str, ...]]] = []

    def compose(self) -> ComposeResult:
        """Filter over the table."""
        yield Header()
        yield Input(placeholder="filter: identity, target, status, command…", id="filter")
        yield DataTable(id="sessions", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        """Columns, first load, and a refresh every couple of seconds."""
        self.sub_title = "Sessions"
        table = self.query_one("#sessions", DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        table.focus()
        self.reload()
        self.set_interval(self.console.sessions_interval, self._reload_tick)

    def _reload_tick(self) -> None:
        # Under a live watch or the player this screen is hidden: polling it there
        # would spend the watch's frames on a table nobody sees.
        if self.app.screen is not self:
            return
        if not any(w.group == "sessions" and w.is_running for w in self.workers):
            self.reload()

    def on_screen_resume(self) -> None:
        """Back from another screen: show the current list at once."""
        if self.is_mounted and self.rows:
            self.reload()

    def action_reload(self) -> None:
        """Load the sessions again now."""
        self.reload()

    @work(exclusive=True, group="sessions", exit_on_error=False)
    async def reload(self) -> None:
        """Fetch the session list."""
        self.rows = await self.api.sessions()
        self.fill()

    def fill(self) -> None:
        """Show the rows that match the filter (only when something changed)."""
        words = self.query_one("#filter", Input).value.lower().split()
        pending: dict[str, int] = {}
        for a in self.console.pending:
            sid = str(a.get("session_id", ""))
            pending[sid] = pending.get(sid, 0) + 1
        now = self.console.now()
        shown: list[tuple[str, tuple[str, ...]]] = []
        for row in self.rows:
            sid = str(row["id"])
            cells = session_cells(row, pending.get(sid, 0), now)
            text = " ".join((sid, *cells)).lower()
            if all(w in text for w in words):
                shown.append((sid, cells))
        if shown == self._shown:
            return
        before, self._shown = self._shown, shown
        table = self.query_one("#sessions", DataTable)
        if table.row_count == len(before) and [s for s, _ in before] == [s for s, _ in shown]:
            # The usual refresh (the same rows, durations ticking): update the cells
            # that changed rather than rebuild and re-measure every row.
            for (sid, cells), (_, old) in zip(shown, before, strict=True):
                for name, new, was in zip(COLUMNS, cells, old, strict=True):
                    if new != was:
                        table.update_cell(
                            sid, name, Text(new), update_width=cell_len(new) > cell_len(was)
                        )
            return
        keep = None
        if table.row_count and table.cursor_row < table.row_count:
            keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear()
        for sid, cells in shown:
            # Text, not str: a str cell is parsed as Textual markup, and titles are
            # whatever the agent typed.
            table.add_row(*(Text(clean(c)) for c in cells), key=sid)  # titles: no escapes
        if keep is not None:
            for i, (sid, _) in enumerate(shown):
                if sid == keep:
                    table.move_cursor(row=i)
                    break

    @on(Input.Changed, "#filter")
    def _filter_changed(self) -> None:
        self.fill()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        table = self.query_one("#sessions", DataTable)
        if table.row_count:
            self.open(self._shown[min(table.cursor_row, len(self._shown) - 1)][0])

    @on(DataTable.RowSelected, "#sessions")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.open(event.row_key.value)

    def on_approvals_changed(self, message: ApprovalsChanged) -> None:
        """Pending counts per session."""
        self.fill()

    def action_focus_filter(self) -> None:
        """Type to filter."""
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        """Empty the filter and go back to the table."""
        self.query_one("#filter", Input).value = ""
        self.query_one("#sessions", DataTable).focus()

    def open(self, session_id: str) -> None:
        """Live watch for a live session, the player for a finished one."""
        row = next((r for r in self.rows if str(r["id"]) == session_id), None)
        if row is None:
            return
        # Any relay's API streams any live session (it proxies one held by another).
        if row.get("status") == "live":
            from console.screens.live import LiveScreen

            self.app.push_screen(LiveScreen(row))
        else:
            from console.screens.player import PlayerScreen

            self.app.push_screen(PlayerScreen(row))
