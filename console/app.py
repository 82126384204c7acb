"""The castgate operator console: sessions, live watch, approvals, recordings.

It talks to the relay only through the control API (``console.api``): the sessions
table and the approvals queue are polled, live sessions stream over the WebSocket,
recordings are downloaded and scrubbed with replay's seek index.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from console.api import ApiClient, ApiError
from console.messages import ApprovalsChanged
from console.screens.approvals import ApprovalsScreen
from console.screens.help import HelpScreen
from console.screens.live import clean
from console.screens.sessions import SessionsScreen


class ConsoleApp(App[None]):
    """The console. ``poll_interval``: seconds between approval polls."""

    CSS_PATH = "console.tcss"
    TITLE = "castgate console"
    MODES: ClassVar[dict[str, Any]] = {"sessions": SessionsScreen, "approvals": ApprovalsScreen}
    DEFAULT_MODE = "sessions"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f2", "switch_mode('sessions')", "Sessions"),
        Binding("f3", "switch_mode('approvals')", "Approvals"),
        Binding("f1", "help", "Help"),
    ]

    def __init__(
        self,
        api: ApiClient,
        *,
        poll_interval: float = 1.0,
        sessions_interval: float = 2.0,
        clock: Any = None,
    ) -> None:
        super().__init__()
        self.api = api
        self.poll_interval = poll_interval
        self.sessions_interval = sessions_interval
        self._clock = clock
        self.pending: list[dict[str, Any]] = []
        self._known: set[int] | None = None
        self.rang = 0  # terminal bells rung for new requests
        self._last_error: str | None = None

    def now(self) -> datetime:
        """The current time (a fixed one in snapshot tests)."""
        return self._clock() if self._clock is not None else datetime.now(UTC)

    def on_mount(self) -> None:
        """Poll the approval queue for as long as the console runs."""
        self.poll_approvals()
        self.set_interval(self.poll_interval, self._poll_tick)

    def _poll_tick(self) -> None:
        # A slow API must not starve the poller: an exclusive worker started while the
        # previous one still runs would cancel it, every time.
        if not any(w.group == "approvals-poll" and w.is_running for w in self.workers):
            self.poll_approvals()

    @work(exclusive=True, group="approvals-poll", exit_on_error=False)
    async def poll_approvals(self) -> None:
        """Fetch pending approvals; notify new ones, tell the screens."""
        rows = await self.api.approvals()
        self._last_error = None
        ids = {int(r["id"]) for r in rows}
        if self._known is not None:
            if ids - self._known:
                self.rang += 1
                self.bell()  # an approver may be looking at another window
            for r in rows:
                if int(r["id"]) not in self._known:
                    self.notify(
                        clean(
                            f"{r.get('identity')}@{r.get('target')} (rule {r.get('rule')}): "
                            f"{r.get('command')}"
                        ),
                        title=f"approval #{r['id']} requested (F3)",
                        severity="warning",
                        timeout=10,
                        markup=False,
                    )
        elif rows:
            self.notify(
                f"{len(rows)} approval request(s) pending (F3)", severity="warning", markup=False
            )
        self._known = ids
        self.pending = rows
        for screen in self.screen_stack:
            screen.post_message(ApprovalsChanged(rows))

    def report_error(self, error: BaseException) -> None:
        """A failed request: one notification per distinct message."""
        message = str(error) if isinstance(error, ApiError) else f"{type(error).__name__}: {error}"
        if message != self._last_error:
            self._last_error = message
            self.notify(message, title="control API", severity="error", markup=False)

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.report_error(event.worker.error)

    def action_help(self) -> None:
        """The key table."""
        self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Palette entries for the console's actions."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Sessions", "Live and recent sessions", self._go_sessions)
        yield SystemCommand("Approvals", "Pending approval requests", self._go_approvals)
        yield SystemCommand("Refresh approvals", "Poll the queue now", self.poll_approvals)
        yield SystemCommand("Help", "Keys of every screen", self.action_help)

    def _go_sessions(self) -> None:
        self.switch_mode("sessions")

    def _go_approvals(self) -> None:
        self.switch_mode("approvals")


def run(url: str, token: str) -> int:
    """Run the console against the control API at ``url``."""
    ConsoleApp(ApiClient(url.rstrip("/"), token)).run()
    return 0
