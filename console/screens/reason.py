"""A modal prompt for the reason of a denial."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class ReasonScreen(ModalScreen[str | None]):
    """Ask why; Enter with a non-empty reason returns it, Escape returns None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.prompt_title = title

    def compose(self) -> ComposeResult:
        """Title and the input."""
        with Vertical(id="reason-box"):
            yield Label(Text(self.prompt_title), id="reason-title")
            yield Input(placeholder="reason (required)", id="reason")

    @on(Input.Submitted, "#reason")
    def _submitted(self, event: Input.Submitted) -> None:
        reason = event.value.strip()
        if reason:
            self.dismiss(reason)
        else:
            self.notify("a denial needs a reason", severity="warning")

    def action_cancel(self) -> None:
        """No decision."""
        self.dismiss(None)
