"""Approvals: the pending queue, refreshed live; ``a`` approves, ``d`` denies, ``enter``
opens the request in full (``ApprovalDetailScreen``)."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Static

from console.messages import ApprovalsChanged
from console.request_text import describe_decision
from console.screens.approval_detail import ApprovalDetailScreen
from console.screens.base import ConsoleScreen
from console.screens.live import clean
from console.screens.reason import ReasonScreen

COLUMNS = ("#", "identity", "target", "rule", "command", "requested", "expires", "decisions")


def _time(value: Any) -> str:
    return str(value or "")[11:19]


def approval_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """The table cells of one request."""
    decisions = ", ".join(
        f"{d.get('approver')} {d.get('decision')}" for d in row.get("decisions") or []
    )
    return (
        str(row["id"]),
        str(row.get("identity", "")),
        str(row.get("target", "")),
        str(row.get("rule", "")),
        str(row.get("command", "")),
        _time(row.get("requested_at")),
        _time(row.get("expires_at")),
        decisions,
    )


class ApprovalsScreen(ConsoleScreen):
    """The queue of pending approval requests."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve"),
        Binding("d", "deny", "Deny"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self._shown: list[tuple[str, ...]] = []
        self.last_decision = ""

    def compose(self) -> ComposeResult:
        """Queue and the last decision."""
        yield Header()
        yield DataTable(id="approvals", cursor_type="row", zebra_stripes=True)
        yield Static(Text("no decision yet"), id="decision")
        yield Footer()

    def on_mount(self) -> None:
        """Columns, and what the app polled last."""
        self.sub_title = "Approvals"
        table = self.query_one("#approvals", DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        table.focus()
        self.show(self.console.pending)

    def on_screen_resume(self) -> None:
        """Back on this screen: show the latest poll."""
        self.show(self.console.pending)

    def on_approvals_changed(self, message: ApprovalsChanged) -> None:
        """A new poll result."""
        self.show(message.approvals)

    def show(self, rows: list[dict[str, Any]]) -> None:
        """Fill the table, keeping the cursor on the same request."""
        self.rows = list(rows)
        shown = [approval_cells(r) for r in self.rows]
        if shown == self._shown:
            return
        self._shown = shown
        table = self.query_one("#approvals", DataTable)
        keep = self.selected_id()
        table.clear()
        for cells in shown:
            # Text, not str: a str cell is parsed as Textual markup, and the command
            # is whatever the agent typed (clean: nor may it carry escape sequences).
            table.add_row(*(Text(clean(c)) for c in cells), key=cells[0])
        for i, cells in enumerate(shown):
            if keep is not None and cells[0] == str(keep):
                table.move_cursor(row=i)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a request: what exactly it would run, with the session beside it."""
        key = event.row_key.value
        row = next((r for r in self.rows if str(r["id"]) == str(key)), None)
        if row is not None:
            self.app.push_screen(ApprovalDetailScreen(row))

    def selected_id(self) -> int | None:
        """The id of the request under the cursor."""
        table = self.query_one("#approvals", DataTable)
        if not table.row_count or table.cursor_row >= table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return int(key) if key is not None else None

    def action_approve(self) -> None:
        """Approve the selected request."""
        aid = self.selected_id()
        if aid is None:
            self.notify("no pending approval selected", severity="warning")
            return
        self.decide(aid, True, None)

    def action_deny(self) -> None:
        """Ask for a reason, then deny the selected request."""
        aid = self.selected_id()
        if aid is None:
            self.notify("no pending approval selected", severity="warning")
            return

        def done(reason: str | None) -> None:
            if reason:
                self.decide(aid, False, reason)

        self.app.push_screen(ReasonScreen(f"Deny approval #{aid}: why?"), done)

    @work(exclusive=True, group="decide", exit_on_error=False)
    async def decide(self, approval_id: int, approve: bool, reason: str | None) -> None:
        """Send the decision; show who decided and poll again at once."""
        row = await self.api.decide(approval_id, approve, reason)
        self.last_decision = clean(describe_decision(row))
        self.query_one("#decision", Static).update(Text(self.last_decision))
        self.notify(self.last_decision, title="decision recorded", markup=False)
        self.console.poll_approvals()
