"""Periodic fsync of the casts of live sessions.

A cast is fsynced (and its checkpoint stored) when an event arrives at least
``recording.fsync_interval`` after the last fsync. A session that then falls silent,
such as one held for an approval, would keep its last events unsynced and
unacknowledged by the store until its next event. This task closes that gap: every
interval it syncs the casts that gained lines since its previous pass, so a crash loses
at most one interval of any session, and crash recovery finds those lines checkpointed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from recorder.recording import RecordingError
from relay.context import RelayContext

log = logging.getLogger("castgate.relay")


def sync_pass(ctx: RelayContext, seen: dict[str, int]) -> dict[str, int]:
    """Sync every live session's cast whose line count changed since ``seen``; returns
    the line counts now."""
    now: dict[str, int] = {}
    for sid, session in list(ctx.live.items()):
        rec = getattr(session, "rec", None)
        writer = getattr(rec, "writer", None)
        if writer is None or writer.closed:
            continue
        now[sid] = writer.lines
        if now[sid] != seen.get(sid):
            # A failed cast: the session meets the same error at its next write.
            with contextlib.suppress(RecordingError):
                writer.sync()
    return now


async def sync_open_casts(ctx: RelayContext) -> None:
    """Run ``sync_pass`` every ``recording.fsync_interval`` until cancelled."""
    seen: dict[str, int] = {}
    while True:
        await asyncio.sleep(ctx.cfg.recording.fsync_interval)
        try:
            seen = sync_pass(ctx, seen)
        except Exception:
            log.exception("recording.sync_failed")
