"""Audit store of castgate: SQLite for one relay, PostgreSQL when relays share it."""

from __future__ import annotations

from recorder.store.store import APPROVALS_CHANNEL, Store, StoreError

__all__ = ["APPROVALS_CHANNEL", "Store", "StoreError"]
