"""Keys of every screen."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# castgate console

| key | where | action |
|---|---|---|
| F2 | anywhere | sessions |
| F3 | anywhere | approvals queue |
| Ctrl+P | anywhere | command palette |
| / | sessions | filter as you type (Esc clears) |
| Enter | sessions | open: live watch, or the player for a finished session |
| a | approvals, request | approve the selected request |
| d | approvals, request | deny it, with a reason |
| Enter | approvals | the request in full: what it would run, its SHA-256, the session's screen, the time left |
| Esc, q | live, player, request | back |
| space | player | play / pause |
| . | player | step one event |
| ← → | player | seek 5 s back / forward |
| [ ] | player | previous / next marker |
| + - | player | speed |

Card numbers are masked by the relay before anything reaches the console.
"""


class HelpScreen(ModalScreen[None]):
    """The key table."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,f1", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        """The help text."""
        with VerticalScroll(id="help-box"):
            yield Markdown(HELP)
