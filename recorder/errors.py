"""The base of every error castgate reports to a user as one line."""

from __future__ import annotations


class CastgateError(Exception):
    """A failure with a message fit to print as one line (no traceback)."""
