"""App-wide messages: what the background pollers tell the screens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class ApprovalsChanged(Message):
    """The pending approvals, as last polled from the API."""

    approvals: list[dict[str, Any]] = field(default_factory=list)

    def can_replace(self, message: Message) -> bool:
        """A newer poll result supersedes an older one still queued."""
        return isinstance(message, ApprovalsChanged)
