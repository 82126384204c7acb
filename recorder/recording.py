"""Writing one session's cast file: append-only lines, hash chain, periodic fsync with
checkpoints, and a signed manifest when the recording is sealed.

Every line is written to the file as soon as it is encoded (live watchers and a crash
see it); ``fsync`` runs at most every ``fsync_interval`` seconds, and each fsync
reports a checkpoint (line count, chain hash) to the caller, which stores it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
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
    file_sha256,
    manifest_path,
    sign_manifest,
)
from recorder.signing import SigningKey

CheckpointHook = Callable[[int, str], None]


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
        return self._chain.lines

    @property
    def chain_hash(self) -> str:
        """Current chain hash (hex)."""
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
        h = self._chain.add(line)
        try:
            os.write(self._fd, line + b"\n")
            os.write(self._chain_fd, h[:CHAIN_ENTRY])
        except OSError as exc:
            raise RecordingError(f"cannot write {self.path}: {exc.strerror}") from None

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
        """fsync the cast and chain now and report a checkpoint."""
        if self._closed:
            return
        try:
            os.fsync(self._fd)
            os.fsync(self._chain_fd)
        except OSError as exc:
            raise RecordingError(f"cannot fsync {self.path}: {exc.strerror}") from None
        self._last_sync = self._clock()
        if self._on_checkpoint is not None and self._chain.lines != self._synced_lines:
            self._synced_lines = self._chain.lines
            self._on_checkpoint(self._chain.lines, self._chain.hex)

    def close(self, reason: str = "closed", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Seal the recording: flush, fsync, write the signed manifest; returns it."""
        for line in self._enc.finish(self.elapsed()):
            self._write(line)
        self.sync()
        self._closed = True
        os.close(self._fd)
        os.close(self._chain_fd)
        chain_bytes = chain_path(self.path).read_bytes()
        manifest: dict[str, Any] = {
            "session_id": self.session_id,
            "cast": self.path.name,
            "lines": self._chain.lines,
            "final_hash": self._chain.hex,
            "file_sha256": file_sha256(self.path),
            "chain_sha256": hashlib.sha256(chain_bytes).hexdigest(),
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
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._chain_fd)
