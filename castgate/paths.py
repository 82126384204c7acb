"""Locating the config file; kept free of heavy imports so that client commands start
fast."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG_NAME = "castgate.toml"


def find_config(explicit: str | None) -> Path | None:
    """``-c FILE`` if given, else ``./castgate.toml`` if it exists, else None."""
    if explicit:
        return Path(explicit)
    here = Path(DEFAULT_CONFIG_NAME)
    return here if here.exists() else None
