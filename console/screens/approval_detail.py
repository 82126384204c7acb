"""One approval request in full: what exactly would run (``console.request_text``), the
session's live screen beside it, the time left before it expires; ``a`` approves, ``d``
denies."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Header, Label, Static

from console.messages import ApprovalsChanged
from console.request_text import clean, describe_decision, render_request, time_left
from console.screens.base import ConsoleScreen
from console.screens.live import feed_event
from console.screens.reason import ReasonScreen
from console.widgets.terminal_view import TerminalView
from replay.terminal import new_terminal


class ApprovalDetailScreen(ConsoleScreen):
    """One request: its context on the left, the session's live screen on the right."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve"),
        Binding("d", "deny", "Deny"),
        Binding("escape,q", "app.pop_screen", "Back"),
    ]

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__()
        self.row = dict(row)
        self.approval_id = int(row["id"])
        self.decided: str | None = None

    def compose(self) -> ComposeResult:
        """Request, live screen, status line."""
        yield Header()
        with Horizontal(id="detail-body"):
            with VerticalScroll(id="request-pane"):
                yield Static(render_request(self.row), id="request")
            yield TerminalView(id="term")
        yield Label(Text(self._status()), id="status")
        yield Footer()

    def _status(self) -> str:
        if self.decided is not None:
            return clean(self.decided)
        return clean(
            f"session {self.row.get('session_id')}  {self.row.get('status', 'pending')}  "
            f"{time_left(self.row, self.console.now())}"
        )

    def on_mount(self) -> None:
        """The full request, the live screen, and a clock for the time left."""
        self.sub_title = f"Approval #{self.approval_id}"
        screen = (self.row.get("context") or {}).get("screen")
        if screen:
            term = new_terminal(80, 24)
            term.feed(str(screen))
            self.query_one("#term", TerminalView).terminal = term
        self.load()
        if self.row.get("session_id"):
            self.watch_session()
        self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        self.query_one("#status", Label).update(Text(self._status()))

    @work(exclusive=True, group="detail", exit_on_error=False)
    async def load(self) -> None:
        """The request as the API has it now (the queue's row may be older)."""
        row = await self.api.approval(self.approval_id)
        self.row.update(row)
        self.query_one("#request", Static).update(render_request(self.row))
        self._tick()

    @work(exclusive=True, group="detail-live", exit_on_error=False)
    async def watch_session(self) -> None:
        """The session's screen as a late watcher sees it, kept current."""
        view = self.query_one("#term", TerminalView)
        async for event in self.api.live(str(self.row["session_id"])):
            feed_event(view, event)
            view.sync()

    def on_approvals_changed(self, message: ApprovalsChanged) -> None:
        """Decided elsewhere (another approver, the CLI, expiry): say so."""
        if self.decided is None and all(
            int(r["id"]) != self.approval_id for r in message.approvals
        ):
            self.load()

    def action_approve(self) -> None:
        """Approve this request."""
        self.decide(True, None)

    def action_deny(self) -> None:
        """Ask for a reason, then deny."""

        def done(reason: str | None) -> None:
            if reason:
                self.decide(False, reason)

        self.app.push_screen(ReasonScreen(f"Deny approval #{self.approval_id}: why?"), done)

    @work(exclusive=True, group="decide", exit_on_error=False)
    async def decide(self, approve: bool, reason: str | None) -> None:
        """Send the decision and show who decided."""
        row = await self.api.decide(self.approval_id, approve, reason)
        self.row.update(row)
        self.decided = describe_decision(row)
        self._tick()
        self.notify(clean(self.decided), title="decision recorded", markup=False)
        self.console.poll_approvals()
