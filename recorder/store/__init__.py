"""Audit store of castgate: SQLite for one relay, PostgreSQL when relays share it."""

from __future__ import annotations

from recorder.store.store import Store, StoreError

__all__ = ["Store", "StoreError"]
