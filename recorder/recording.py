"""Writing one session's cast file: append-only lines, hash chain, periodic fsync with
checkpoints, and a signed manifest when the recording is sealed.

Every line is written to the file as soon as it is encoded (live watchers and a crash
see it); ``fsync`` runs at most every ``fsync_interval`` seconds, and each fsync
reports a checkpoint (line count, chain hash) to the caller, which stores it.

With ``threaded=True`` (what the relay uses) the hash chain, the file hashes, the writes
and the fsyncs run in a writer thread fed by a bounded queue: hashing and writing release
the GIL, so a busy session's recording uses the second core instead of the event loop.
Errors in the thread surface on the next call; a full queue makes the caller wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recorder.asciicast import EventEncoder, header_line
from recorder.errors import CastgateError
from recorder.integrity import (
    CHAIN_ENTRY,
    HashChain,
    chain_path,
    manifest_path,
    sign_manifest,
)
from recorder.signing import SigningKey

CheckpointHook = Callable[[int, str], None]
_MAX_QUEUED = 32 << 20
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
    ) -> None:
        self.path = path
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
        self.bytes_in = 0
        self._lines = 0
        self._file_hash = hashlib.sha256()
        self._chain_file_hash = hashlib.sha256()
        self._error: str | None = None
        self._queue: deque[Any] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(path, flags, 0o600)
            self._chain_fd = os.open(chain_path(path), flags, 0o600)
        except OSError as exc:
            raise RecordingError(f"cannot create {path}: {exc.strerror}") from None
        if threaded:
            self._thread = threading.Thread(
                target=self._drain, name=f"cast-{session_id}", daemon=True
            )
            self._thread.start()
        self.started = clock()
        self.started_wall = datetime.now(UTC)
        header = {"castgate": {"session": session_id}}
        if extra_header:
            header["castgate"].update(extra_header)
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
        self._last_sync = self.started
        self._synced_lines = 0

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

    def _write(self, line: bytes) -> None:
        if self._closed:
            raise RecordingError(f"{self.path}: recording already closed")
        if self._error is not None:
            raise RecordingError(self._error)
        self._lines += 1
        if self._thread is None:
            self._write_now([line])
            if self._error is not None:
                raise RecordingError(self._error)
            return
        with self._cond:
            while self._queued_bytes > _MAX_QUEUED and self._error is None:
                self._cond.wait(1.0)  # back-pressure: the disk is slower than the session
            if not self._queue:
                self._cond.notify_all()  # the writer sleeps only on an empty queue
            self._queue.append(line)
            self._queued_bytes += len(line)

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
            self._error = f"cannot write {self.path}: {exc.strerror}"
            return
        self._chain_file_hash.update(chain)

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                self._cond.notify_all()
            stop = False
            lines: list[bytes] = []
            for item in batch:
                if item is None:
                    stop = True
                elif item is _SYNC:
                    self._write_now(lines)
                    lines = []
                    self._sync_now()
                elif isinstance(item, threading.Event):
                    self._write_now(lines)
                    lines = []
                    item.set()
                else:
                    lines.append(item)
            self._write_now(lines)
            if stop:
                return

    def _flush_queue(self) -> None:
        """Wait until the writer thread has written everything queued so far."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        with self._cond:
            self._queue.append(done)
            self._cond.notify_all()
        while not done.wait(1.0) and self._thread is not None and self._thread.is_alive():
            pass

    def event(self, code: str, data: bytes | str, t: float | None = None) -> None:
        """Append one event (``o``, ``i``, ``r``, ``m``); data is already masked."""
        line = self._enc.encode(self.elapsed() if t is None else t, code, data)
        if line is not None:
            self._write(line)
        self.maybe_sync()

    def output(self, data: bytes) -> None:
        """Masked output bytes."""
        self.bytes_out += len(data)
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
        if self._thread is None:
            self._sync_now()
            if self._error is not None:
                raise RecordingError(self._error)
            return
        if self._error is not None:
            raise RecordingError(self._error)
        with self._cond:
            self._queue.append(_SYNC)
            self._cond.notify_all()

    def _sync_now(self) -> None:
        if self._error is not None:
            return
        try:
            os.fsync(self._fd)
            os.fsync(self._chain_fd)
        except OSError as exc:
            self._error = f"cannot fsync {self.path}: {exc.strerror}"
            return
        if self._on_checkpoint is not None and self._chain.lines != self._synced_lines:
            self._synced_lines = self._chain.lines
            # A lost checkpoint must not stop the recording; the hook logs its failures.
            with contextlib.suppress(Exception):
                self._on_checkpoint(self._chain.lines, self._chain.hex)

    def _stop_thread(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._queue.append(None)
                self._cond.notify_all()
            self._thread.join()
            self._thread = None

    def close(self, reason: str = "closed", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Seal the recording: flush, fsync, write the signed manifest; returns it."""
        for line in self._enc.finish(self.elapsed()):
            self._write(line)
        self._stop_thread()
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
            self._stop_thread()
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._chain_fd)
