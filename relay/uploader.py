"""Ships sealed casts to the object store from one worker thread, never the event loop.

A cast is queued when its session is sealed (after its seek index, when one is built),
and at start every sealed cast in the recordings directory without an upload note
(``NAME.cast.uploaded``) is queued too: casts sealed while the relay was down, or by
crash recovery, or whose upload had not finished. A failed upload is retried with
exponential backoff (``s3.retry_initial`` doubling up to ``s3.retry_max``) for as long
as the relay runs, and again after a restart. With ``keep_local = false`` the local
files are deleted only once every file of the cast is confirmed in the bucket and the
note is written; the manifest goes last, so a manifest left on disk always means "not
known to be safe elsewhere yet".
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recorder.config import Config
from recorder.integrity import manifest_path
from recorder.objectstore import (
    ObjectStore,
    ObjectStoreError,
    cast_files,
    read_marker,
    uploaded_marker,
    write_marker,
)

log = logging.getLogger("castgate.relay")

# (kind, outcome, resource, detail, session id): an audit event for the relay to write.
EventHook = Callable[[str, str, str, dict[str, Any], str | None], None]
UPLOAD_EVENT = "recording.upload"
SHUTDOWN_GRACE = 10.0


@dataclass(order=True)
class _Job:
    due: float
    cast: Path = field(compare=False)
    attempts: int = field(default=0, compare=False)
    found_at_start: bool = field(default=False, compare=False)


def _session_id(cast: Path) -> str | None:
    try:
        manifest = json.loads(manifest_path(cast).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sid = manifest.get("session_id") if isinstance(manifest, dict) else None
    return str(sid) if sid else None


class Uploader:
    """The upload queue and its worker thread.

    Args:
        cfg: the relay's config (``[s3]`` must be set).
        store: where casts go.
        on_event: receives an audit event per upload (success or failure); called from
            the worker thread, so it must hand the event to the event loop itself.
        clock: monotonic clock, for tests.
    """

    def __init__(
        self,
        cfg: Config,
        store: ObjectStore,
        on_event: EventHook,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert cfg.s3 is not None
        self.cfg = cfg
        self.s3 = cfg.s3
        self.store = store
        self._on_event = on_event
        self._clock = clock
        self._jobs: list[_Job] = []
        self._queued: set[Path] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.uploaded = 0
        self.failed = 0
        self.bytes = 0
        self.scan_at_start = True
        """Queue the sealed casts of the recordings directory when started."""

    @property
    def pending(self) -> int:
        """Casts waiting for their (next) upload attempt."""
        with self._cond:
            return len(self._queued)

    def start(self) -> None:
        """Queue what the recordings directory holds and start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="s3-uploader", daemon=True)
        self._thread.start()

    def submit(self, cast: Path, *, found_at_start: bool = False) -> None:
        """Queue a sealed cast for upload now (thread-safe, never blocks on I/O)."""
        with self._cond:
            if cast in self._queued or self._stopping:
                return
            self._queued.add(cast)
            heapq.heappush(self._jobs, _Job(self._clock(), cast, 0, found_at_start))
            self._cond.notify_all()

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Finish the uploads due now, for at most ``grace`` seconds, and stop; what is
        left is found again at the next start."""
        with self._cond:
            self._stopping = True
            self._deadline = self._clock() + grace
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(grace + 5)

    def scan(self) -> int:
        """Queue every sealed cast (manifest present) not yet noted as uploaded, and
        finish the deletion of uploaded ones when local copies are not kept; returns
        how many were queued."""
        queued = 0
        root = self.cfg.recordings_dir
        if not root.is_dir():
            return 0
        for manifest in sorted(root.glob("*.cast.manifest.json")):
            cast = manifest.with_name(manifest.name.removesuffix(".manifest.json"))
            if read_marker(cast) is None:
                self.submit(cast, found_at_start=True)
                queued += 1
            elif not self.s3.keep_local:
                self._delete_local(cast)
        return queued

    def _next(self) -> _Job | None:
        with self._cond:
            while True:
                now = self._clock()
                if self._stopping:
                    assert self._deadline is not None
                    if now >= self._deadline or not self._jobs or self._jobs[0].due > now:
                        return None
                if self._jobs and self._jobs[0].due <= now:
                    return heapq.heappop(self._jobs)
                wait = self._jobs[0].due - now if self._jobs else None
                if self._stopping and wait is None:
                    return None
                self._cond.wait(wait)

    def _run(self) -> None:
        try:
            found = self.scan() if self.scan_at_start else 0
            if found:
                log.info("upload.queued_at_start", extra={"casts": found})
        except Exception:
            log.exception("upload.scan_failed")
        while (job := self._next()) is not None:
            self._attempt(job)

    def _attempt(self, job: _Job) -> None:
        cast = job.cast
        job.attempts += 1
        sid = _session_id(cast) or cast.name.removesuffix(".cast")
        resource = self.store.url(cast.name)
        if not manifest_path(cast).is_file():
            # Deleted meanwhile (or never sealed): nothing that can be uploaded completely.
            with self._cond:
                self._queued.discard(cast)
            return
        try:
            # A first attempt at a cast sealed in this run has nothing in the bucket yet.
            fresh = job.attempts == 1 and not job.found_at_start
            files = self.store.upload_cast(cast, skip_stored=not fresh)
            write_marker(cast, self.store, files)
        except (ObjectStoreError, OSError) as exc:
            self.failed += 1
            delay = min(self.s3.retry_max, self.s3.retry_initial * 2 ** (job.attempts - 1))
            self._on_event(
                UPLOAD_EVENT,
                "failure",
                resource,
                {"attempt": job.attempts, "error": str(exc), "retry_in": round(delay, 3)},
                sid,
            )
            with self._cond:
                if self._stopping:
                    self._queued.discard(cast)
                    return
                job.due = self._clock() + delay
                heapq.heappush(self._jobs, job)
                self._cond.notify_all()
            return
        size = sum(int(f["size"]) for f in files.values())
        self.uploaded += 1
        self.bytes += size
        with self._cond:
            self._queued.discard(cast)
        deleted = False if self.s3.keep_local else self._delete_local(cast)
        self._on_event(
            UPLOAD_EVENT,
            "success",
            resource,
            {
                "files": sorted(files),
                "bytes": size,
                "attempt": job.attempts,
                "sha256": files[cast.name]["sha256"] if cast.name in files else None,
                "local_deleted": deleted,
            },
            sid,
        )

    def _delete_local(self, cast: Path) -> bool:
        """Delete the local files the upload note vouches for (the manifest last)."""
        note = read_marker(cast)
        if note is None:
            return False
        confirmed = note.get("files") or {}
        for path in cast_files(cast):
            if path.name not in confirmed:
                # Written after the upload (an index built later): upload it first.
                self.submit_later(cast)
                return False
        try:
            for path in cast_files(cast):
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("upload.delete_failed", extra={"cast": str(cast), "error": exc.strerror})
            return False
        return True

    def submit_later(self, cast: Path) -> None:
        """Queue a cast again (its upload note is stale); drops the note first."""
        uploaded_marker(cast).unlink(missing_ok=True)
        self.submit(cast, found_at_start=True)
