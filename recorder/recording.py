"""Writing one session's cast file: append-only lines, hash chain, periodic fsync with
checkpoints, and a signed manifest when the recording is sealed.

Every line is written to the file as soon as it is encoded (live watchers and a crash
see it); ``fsync`` runs at most every ``fsync_interval`` seconds, and each fsync
reports a checkpoint (line count, chain hash) to the caller, which stores it.

With ``threaded=True`` (what the relay uses) the JSON of the event lines, the hash
chain, the file hashes, the writes and the fsyncs run in the process's writer pool
(recorder/writerpool.py): hashing and writing release the GIL, so a busy session's
recording uses the second core instead of the event loop. The caller still decodes the
UTF-8 and stamps the time, so line counts and timestamps are known at once. Errors in
the pool surface on the next call; more than 32 MiB of event text queued makes the
caller wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recorder.asciicast import EventEncoder, event_line, header_line
from recorder.errors import CastgateError
from recorder.integrity import (
    CHAIN_ENTRY,
    HashChain,
    chain_path,
    manifest_path,
    sign_manifest,
)
from recorder.signing import SigningKey
from recorder.writerpool import shared_pool

CheckpointHook = Callable[[int, str], None]
Event = tuple[float, str, str]  # time, code, text: a line the pool encodes
_MAX_QUEUED = 32 << 20
# JSON encoded in a pool thread before its lines are hashed and written: encoding holds
# the GIL, hashing releases it, so the event loop never waits behind a long run.
_ENCODE_RUN = 64 << 10
# Queue item asking the writer thread to fsync and report a checkpoint.
_SYNC = object()


def _writev_all(fd: int, parts: list[bytes]) -> None:
    total = sum(len(p) for p in parts)
    n = os.writev(fd, parts)
    if n < total:
        _write_all(fd, b"".join(parts)[n:])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class RecordingError(CastgateError):
    """The cast cannot be written (disk full, read-only, closed)."""


class CastWriter:
    """Records one session into ``path`` (created exclusively, mode 0600).

    Args:
        path: the cast file; its chain and manifest sidecars go next to it.
        width, height: initial terminal size.
        session_id: written into the header and the manifest.
        signing_key: signs the manifest at ``close``.
        fsync_interval: seconds between fsyncs.
        on_checkpoint: called with (lines, chain hash hex) after each fsync.
        clock: monotonic clock, for tests.
        on_error: with ``threaded``, called once with the error text when a write or
            fsync in the writer pool fails (in that thread), so the owner can act at once
            instead of at its next write.
    """

    def __init__(
        self,
        path: Path,
        *,
        width: int,
        height: int,
        session_id: str,
        signing_key: SigningKey,
        title: str | None = None,
        env: dict[str, str] | None = None,
        fsync_interval: float = 1.0,
        on_checkpoint: CheckpointHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        extra_header: dict[str, Any] | None = None,
        threaded: bool = False,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._on_error = on_error
        self.session_id = session_id
        self.width, self.height = width, height
        self._key = signing_key
        self._interval = fsync_interval
        self._on_checkpoint = on_checkpoint
        self._clock = clock
        self._chain = HashChain()
        self._enc = EventEncoder()
        self._closed = False
        self.bytes_out = 0
        self.nul_bytes = 0
        self.bytes_in = 0
        self._lines = 0
        self._file_hash = hashlib.sha256()
        self._chain_file_hash = hashlib.sha256()
        self._error: str | None = None
        # Bytes handed to the pool and bytes it has written: each counter has one writer
        # thread, so their difference is the backlog without a lock.
        self._enq_bytes = 0
        self._done_bytes = 0
        self._worker: Any = None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(path, flags, 0o600)
            self._chain_fd = os.open(chain_path(path), flags, 0o600)
        except OSError as exc:
            raise RecordingError(f"cannot create {path}: {exc.strerror}") from None
        self.started = clock()
        self.started_wall = datetime.now(UTC)
        header = {"castgate": {"session": session_id}}
        if extra_header:
            header["castgate"].update(extra_header)
        try:
            self._write(
                header_line(
                    width,
                    height,
                    int(self.started_wall.timestamp()),
                    title=title,
                    env=env,
                    extra=header,
                )
            )
        except RecordingError:
            self._discard_files()
            raise
        self._last_sync = self.started
        self._synced_lines = 0
        if threaded:
            # Only now: the header above was written synchronously, so a directory that
            # is full or read-only refuses the recording here, before the session starts.
            self._worker = shared_pool().assign()

    @property
    def lines(self) -> int:
        """Lines written so far, the header included."""
        return self._lines

    @property
    def chain_hash(self) -> str:
        """Chain hash of the lines written so far (hex); exact once closed."""
        self._flush_queue()
        return self._chain.hex

    @property
    def closed(self) -> bool:
        """True once sealed or aborted."""
        return self._closed

    def elapsed(self) -> float:
        """Seconds since the recording started."""
        return self._clock() - self.started

    def _write(self, line: bytes | Event) -> None:
        """Queue a line, or an event whose line the pool thread encodes."""
        if self._closed:
            raise RecordingError(f"{self.path}: recording already closed")
        if self._error is not None:
            if self._reported():
                return
            raise RecordingError(self._error)
        self._lines += 1
        if self._worker is None:
            self._write_now([line if isinstance(line, bytes) else event_line(*line)])
            if self._error is not None:
                raise RecordingError(self._error)
            return
        while self._enq_bytes - self._done_bytes > _MAX_QUEUED and self._error is None:
            time.sleep(0.001)  # back-pressure: the disk is slower than the session
        self._enq_bytes += len(line) if isinstance(line, bytes) else len(line[2])
        self._worker.submit(self, line)

    def _write_now(self, lines: list[bytes]) -> None:
        """Chain, hash and write lines (in the writer thread when threaded)."""
        if self._error is not None or not lines:
            return
        entries = []
        parts: list[bytes] = []
        file_hash = self._file_hash
        for line in lines:
            entries.append(self._chain.add(line)[:CHAIN_ENTRY])
            file_hash.update(line)
            file_hash.update(b"\n")
            parts.append(line)
            parts.append(b"\n")
        chain = b"".join(entries)
        try:
            # writev: no copy of the lines into one buffer.
            for i in range(0, len(parts), 512):
                _writev_all(self._fd, parts[i : i + 512])
            _write_all(self._chain_fd, chain)
        except OSError as exc:
            self._fail(f"cannot write {self.path}: {exc.strerror}")
            return
        self._chain_file_hash.update(chain)

    def process(self, items: list[Any]) -> None:
        """Write a batch of queued items (called by the writer pool, in order). An
        unexpected error fails this recording, never the pool thread that serves others."""
        try:
            self._process(items)
        except Exception as exc:
            self._fail(f"cannot record {self.path}: {exc}")
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()  # nobody waits forever on a batch that failed
            self._done_bytes = self._enq_bytes

    def _process(self, items: list[Any]) -> None:
        lines: list[bytes] = []
        size = done = 0
        for item in items:
            if isinstance(item, tuple):
                line = event_line(*item)
                lines.append(line)
                done += len(item[2])
                size += len(line)
                if size >= _ENCODE_RUN:
                    self._write_now(lines)
                    lines, size = [], 0
            elif isinstance(item, bytes):
                lines.append(item)
                done += len(item)
            elif item is _SYNC:
                self._write_now(lines)
                lines, size = [], 0
                self._sync_now()
            elif isinstance(item, threading.Event):
                self._write_now(lines)
                lines, size = [], 0
                item.set()
        self._write_now(lines)
        self._done_bytes += done

    def _flush_queue(self) -> None:
        """Wait until the pool has written everything queued so far."""
        worker = self._worker
        if worker is None:
            return
        done = threading.Event()
        worker.submit(self, done)
        while not done.wait(1.0) and worker.thread.is_alive():
            pass

    def event(self, code: str, data: bytes | str, t: float | None = None) -> None:
        """Append one event (``o``, ``i``, ``r``, ``m``); data is already masked."""
        event = self._enc.prepare(self.elapsed() if t is None else t, code, data)
        if event is not None:
            # The JSON of a line is left to the pool thread: on bulk output it costs as
            # much as the masking, and the event loop is the relay's busiest thread.
            self._write(event)
        self.maybe_sync()

    def output(self, data: bytes) -> None:
        """Masked output bytes. NUL bytes are left out of the cast and counted instead
        (``nul_bytes`` in the manifest): terminals ignore them, so replay is unchanged,
        while asciicast's JSON would spend six bytes (``\u0000``) on each, which made a
        binary stream cost its session six times its size in recording work."""
        self.bytes_out += len(data)
        if b"\x00" in data:
            if data[0] == 0 and data == bytes(len(data)):
                # All NUL (a zero-filled binary stream): one memcmp, not a translate.
                self.nul_bytes += len(data)
                self.maybe_sync()
                return
            kept = data.translate(None, b"\x00")
            self.nul_bytes += len(data) - len(kept)
            if not kept:
                self.maybe_sync()
                return
            data = kept
        self.event("o", data)

    def input(self, data: bytes | str) -> None:
        """Masked input kept per ``recording.input``."""
        self.bytes_in += len(data)
        self.event("i", data)

    def resize(self, cols: int, rows: int) -> None:
        """Terminal size change."""
        self.width, self.height = cols, rows
        self.event("r", f"{cols}x{rows}")

    def marker(self, text: str) -> None:
        """Policy event marker (``approval #17 granted by alice``)."""
        self.event("m", text)

    def maybe_sync(self) -> None:
        """fsync if the interval has passed since the last one."""
        if self._clock() - self._last_sync >= self._interval:
            self.sync()

    def sync(self) -> None:
        """fsync the cast and chain (in the writer thread when threaded) and report a
        checkpoint."""
        if self._closed:
            return
        self._last_sync = self._clock()
        if self._worker is None:
            self._sync_now()
            if self._error is not None:
                raise RecordingError(self._error)
            return
        if self._error is not None:
            if self._reported():
                return
            raise RecordingError(self._error)
        self._worker.submit(self, _SYNC)

    def _sync_now(self) -> None:
        if self._error is not None:
            return
        try:
            os.fsync(self._fd)
            os.fsync(self._chain_fd)
        except OSError as exc:
            self._fail(f"cannot fsync {self.path}: {exc.strerror}")
            return
        if self._on_checkpoint is not None and self._chain.lines != self._synced_lines:
            self._synced_lines = self._chain.lines
            # A lost checkpoint must not stop the recording; the hook logs its failures.
            with contextlib.suppress(Exception):
                self._on_checkpoint(self._chain.lines, self._chain.hex)

    def _fail(self, message: str) -> None:
        """Remember the first write failure (later calls raise it) and report it."""
        self._error = message
        # Only from the writer pool: in the caller's thread the error is raised to it.
        if self._on_error is not None and self._worker is not None:
            # The owner's hook must not break the writer thread that serves other casts.
            with contextlib.suppress(Exception):
                self._on_error(message)

    def _reported(self) -> bool:
        """A pool failure goes to ``on_error``, which deals with it: later events are
        dropped rather than raised, so the chunk the caller holds (already masked, not
        yet sent) still reaches the client."""
        return self._on_error is not None and self._worker is not None

    def _discard_files(self) -> None:
        """The header could not be written: nothing was recorded, so leave no files."""
        self._closed = True
        for fd in (self._fd, self._chain_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        for leftover in (self.path, chain_path(self.path)):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def _leave_pool(self) -> None:
        """Wait for the pool to write what is queued; from now on writes are direct."""
        if self._worker is not None:
            self._flush_queue()
            self._worker = None

    def close(self, reason: str = "closed", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Seal the recording: flush, fsync, write the signed manifest; returns it."""
        self._leave_pool()  # before ``finish``: the pool may still hold events
        for line in self._enc.finish(self.elapsed()):
            self._write(line)
        self._sync_now()
        self._closed = True
        os.close(self._fd)
        os.close(self._chain_fd)
        if self._error is not None:
            raise RecordingError(self._error)
        manifest: dict[str, Any] = {
            "session_id": self.session_id,
            "cast": self.path.name,
            "lines": self._chain.lines,
            "final_hash": self._chain.hex,
            # Hashed as written: re-reading a large cast here would stall the caller.
            "file_sha256": self._file_hash.hexdigest(),
            "chain_sha256": self._chain_file_hash.hexdigest(),
            "started_at": self.started_wall.isoformat(),
            "sealed_at": datetime.now(UTC).isoformat(),
            "duration": round(self.elapsed(), 6),
            "end_reason": reason,
            "nul_bytes": self.nul_bytes,
        }
        if extra:
            manifest.update(extra)
        signed = sign_manifest(manifest, self._key)
        tmp = manifest_path(self.path).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(signed, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(manifest_path(self.path))
        return signed

    def abort(self) -> None:
        """Close the files without sealing (the cast stays unsealed)."""
        if not self._closed:
            self._leave_pool()
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._chain_fd)


class DiscardWriter(CastWriter):
    """What a session records into once its recording has failed and it goes on anyway
    (``recording.on_failure = "continue"``), or while it is being terminated: events are
    dropped, so masking, the live view and the byte counts carry on while nothing more
    is written. ``close`` returns an empty manifest: nothing was sealed.

    Args:
        path: the cast that failed (or could not be created).
        session_id, width, height: as for CastWriter.
        error: why nothing is recorded.
        lines, chain_hash: how far the failed cast got.
    """

    def __init__(  # deliberately not CastWriter.__init__: no files, no writer thread
        self,
        path: Path,
        *,
        session_id: str,
        width: int,
        height: int,
        error: str,
        lines: int = 0,
        chain_hash: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.session_id = session_id
        self.width, self.height = width, height
        self.error = error
        self.bytes_out = 0
        self.bytes_in = 0
        self.nul_bytes = 0
        self._lines = lines
        self._hex = chain_hash
        self._clock = clock
        self._closed = False
        self._error = error
        self._worker = None
        self.started = clock()
        self.started_wall = datetime.now(UTC)

    @classmethod
    def replacing(cls, writer: CastWriter, error: str) -> DiscardWriter:
        """Stand in for ``writer``, which must be aborted already."""
        spare = cls(
            writer.path,
            session_id=writer.session_id,
            width=writer.width,
            height=writer.height,
            error=error,
            lines=writer._chain.lines,
            chain_hash=writer._chain.hex,
            clock=writer._clock,
        )
        spare.started, spare.started_wall = writer.started, writer.started_wall
        spare.bytes_out, spare.bytes_in = writer.bytes_out, writer.bytes_in
        return spare

    @property
    def lines(self) -> int:
        """Lines the failed cast holds (as far as its chain got)."""
        return self._lines

    @property
    def chain_hash(self) -> str:
        """Chain hash of the failed cast's last line."""
        return self._hex

    def event(self, code: str, data: bytes | str, t: float | None = None) -> None:
        """Dropped."""

    def maybe_sync(self) -> None:
        """Nothing to sync."""

    def sync(self) -> None:
        """Nothing to sync."""

    def close(self, reason: str = "closed", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Nothing to seal: an empty manifest."""
        self._closed = True
        return {}

    def abort(self) -> None:
        """Nothing to close."""
        self._closed = True
