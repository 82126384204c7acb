"""What every console screen shares: worker failures become one notification."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual import on
from textual.screen import Screen
from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from console.api import ApiClient
    from console.app import ConsoleApp


class ConsoleScreen(Screen[Any]):
    """A screen whose I/O runs in workers; a failed worker is reported, not fatal."""

    @property
    def console(self) -> ConsoleApp:
        """The app, typed."""
        return cast("ConsoleApp", self.app)

    @property
    def api(self) -> ApiClient:
        """The control API client."""
        return self.console.api

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.console.report_error(event.worker.error)
