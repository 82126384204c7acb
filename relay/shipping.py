"""What becomes of a session's recording once it ends: its store row closed with the
cast's figures and manifest, its seek index built, the sealed cast shipped to ``[s3]``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from recorder.config import Config
from recorder.session import SessionRecorder
from recorder.store.spool import StoreSpool
from relay.audit import AuditTrail
from relay.store_tasks import Checkpoints
from relay.uploader import Uploader

log = logging.getLogger("castgate.relay")


class Shipping:
    """Session ends, seek indexes and uploads of one relay process."""

    def __init__(
        self, cfg: Config, spool: StoreSpool, checkpoints: Checkpoints, audit: AuditTrail
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.checkpoints = checkpoints
        self.audit = audit
        self.node = ""
        self.uploader: Uploader | None = None
        self._indexing: dict[Path, asyncio.Task[None]] = {}

    async def end_session(
        self,
        session_id: str,
        rec: SessionRecorder | None,
        *,
        status: str,
        exit_status: int | None = None,
    ) -> None:
        """Close a session's store row with its recording's figures and manifest, then
        ship the cast; store failures are logged, never raised."""
        # An empty manifest: the recording failed and nothing was sealed.
        manifest = getattr(rec, "manifest", None) or None
        # The seal's own checkpoint (queued by the writer pool) goes in before the end.
        await self.checkpoints.flush()
        try:
            await asyncio.to_thread(
                self.spool.end_session,
                session_id,
                status=status,
                exit_status=exit_status,
                lines=rec.writer.lines if rec else None,
                final_hash=rec.writer.chain_hash if rec else None,
                masking_counts=dict(rec.counts) if rec else None,
            )
        except Exception:
            log.exception("store.end_session_failed", extra={"session": session_id})
        try:
            # Even when the end is already recorded (another relay declared this one
            # lost and ended the row): the signed manifest still belongs in the store.
            if manifest is not None:
                await asyncio.to_thread(self.spool.put_manifest, session_id, manifest)
        except Exception:
            log.exception("store.put_manifest_failed", extra={"session": session_id})
        if manifest is not None and rec is not None and self.uploader is not None:
            path = rec.writer.path
            ship = asyncio.ensure_future(self._ship(path, self._indexing.pop(path, None)))
            self.audit.background.track(ship)

    async def _ship(self, path: Path, indexing: asyncio.Task[None] | None) -> None:
        # The index is uploaded with the cast (before the manifest), so wait for it.
        if indexing is not None:
            await asyncio.gather(indexing, return_exceptions=True)
        if self.uploader is not None:
            self.uploader.submit(path)

    def start_uploads(self, *, scan: bool = True) -> None:
        """Start shipping sealed casts to ``[s3]`` (no-op without it); upload audit
        events come back from the worker thread to this loop. ``scan``: also queue
        the sealed casts found in the recordings directory (one relay process of a
        machine does it, or two would ship the same files)."""
        from recorder.objectstore import ObjectStore

        if self.cfg.s3 is None:
            return
        loop = asyncio.get_running_loop()

        def on_event(
            kind: str, outcome: str, resource: str, detail: dict[str, Any], sid: str | None
        ) -> None:
            loop.call_soon_threadsafe(
                self.audit.emit, kind, None, outcome, self.node, resource, detail, sid
            )

        self.uploader = Uploader(self.cfg, ObjectStore(self.cfg.s3), on_event)
        self.uploader.scan_at_start = scan
        self.uploader.start()

    async def stop_uploads(self) -> None:
        """Let the worker finish what is due (bounded), then flush its audit events."""
        if self.uploader is not None:
            await asyncio.to_thread(self.uploader.stop)
            await asyncio.sleep(0)  # run the events it handed over before drain()

    def index_cast(self, path: Path) -> asyncio.Task[None]:
        """Build the seek index of a sealed cast in a thread, if it is small enough;
        failures are logged (the index is rebuilt on demand anyway). The task is
        remembered so the cast's upload can wait for it, and kept until done."""
        task = asyncio.ensure_future(self._index(path))
        self._indexing[path] = task
        task.add_done_callback(lambda _: self._forget_index(path, task))
        self.audit.background.track(task)
        return task

    def _forget_index(self, path: Path, task: asyncio.Task[None]) -> None:
        if self._indexing.get(path) is task:
            del self._indexing[path]

    async def _index(self, path: Path) -> None:
        limit = self.cfg.recording.index_max_mb * 1024 * 1024
        try:
            if not path.is_file() or path.stat().st_size > limit:
                return
            from replay.seekindex import build_index, load_or_create_key

            key = load_or_create_key(self.cfg.keys_dir)
            await asyncio.to_thread(build_index, path, key=key)
        except Exception:
            log.exception("index.build_failed", extra={"cast": str(path)})
