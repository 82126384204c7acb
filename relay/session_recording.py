"""A session's recording: its cast opened (or a DiscardWriter in its place), the
``recording.on_failure`` policy applied once when it fails, checkpoints, markers and the
cast's end. Protocol-neutral: what the client is told is the owner's (``on_lost``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from recorder.config import Config
from recorder.masking import Masker
from recorder.recording import CastWriter, DiscardWriter, RecordingError
from recorder.session import SessionRecorder
from recorder.signing import SigningKey
from relay.audit import BoundAudit
from relay.live import LiveHub, LiveStream
from relay.store_tasks import Checkpoints

log = logging.getLogger("castgate.relay")


class RecordingLost(Protocol):
    """How the protocol tells its client that the session cannot be recorded:
    ``why`` (the cause, never the relay's paths), whether the session ends
    (``terminate``) and whether it had not started yet (``at_start``)."""

    def __call__(self, why: str, *, terminate: bool, at_start: bool) -> None: ...


@dataclass(frozen=True)
class CastSpec:
    """What a cast is opened with."""

    title: str
    width: int
    height: int
    env: dict[str, str]
    header: dict[str, Any]
    """The header's ``castgate`` object (identity, target, protocol...)."""
    live: dict[str, Any]
    """What live watchers are told of the session."""
    input_mode: str = "none"
    hold_deadline: float = 0.0


@dataclass(frozen=True)
class RecordingDeps:
    """The relay services a recording uses."""

    cfg: Config
    masker: Masker
    signing_key: SigningKey
    hub: LiveHub
    checkpoints: Checkpoints
    recording_failures: Any
    """Counter of failures by action (the metric)."""


class Recording:
    """One session's recording and its failure policy."""

    def __init__(
        self, deps: RecordingDeps, session_id: str, audit: BoundAudit, on_lost: RecordingLost
    ) -> None:
        self.deps = deps
        self.session_id = session_id
        self.audit = audit
        self.on_lost = on_lost
        self.rec: SessionRecorder | None = None
        self.live: LiveStream | None = None
        self.failed = False
        self.before_marker: Callable[[], None] | None = None
        """Writes what the owner still buffers for the cast (a transcript), so that a
        marker lands after everything that came before it."""
        self.terminated = False
        """The failure ended the session (``on_failure = "terminate"``)."""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def path(self) -> Any:
        """Where the cast is (or would have been) written."""
        return self.deps.cfg.recordings_dir / f"{self.session_id}.cast"

    def open(self, spec: CastSpec) -> str | None:
        """Open the cast; returns why it could not be, or None. A failed cast is
        replaced by a DiscardWriter, so masking and the live view go on."""
        deps, sid = self.deps, self.session_id
        # The writer threads hand their errors to the loop the session runs on.
        self._loop = asyncio.get_running_loop()
        failure = None
        writer: CastWriter
        try:
            writer = CastWriter(
                self.path,
                width=spec.width,
                height=spec.height,
                session_id=sid,
                signing_key=deps.signing_key,
                title=spec.title,
                env=spec.env,
                fsync_interval=deps.cfg.recording.fsync_interval,
                on_checkpoint=self._checkpoint,
                threaded=True,
                extra_header=spec.header,
                on_error=self.writer_failed,
            )
        except RecordingError as exc:
            failure = str(exc)
            writer = DiscardWriter(
                self.path, session_id=sid, width=spec.width, height=spec.height, error=failure
            )
        self.live = deps.hub.open(sid, spec.live, spec.width, spec.height)
        self.rec = SessionRecorder(
            writer,
            deps.masker,
            input_mode=spec.input_mode,
            hold_deadline=spec.hold_deadline,
            live=self.live,
        )
        return failure

    def _checkpoint(self, lines: int, chain_hash: str) -> None:
        self.deps.checkpoints.queue(self.session_id, lines, chain_hash)  # writer pool

    def safe(self, fn: Callable[[SessionRecorder], Any]) -> Any:
        """Run a recorder call; a recording failure applies ``recording.on_failure``."""
        if self.rec is None:
            return None
        try:
            return fn(self.rec)
        except RecordingError as exc:
            self.fail(str(exc))
            return None

    def marker(self, text: str) -> None:
        """A marker in the cast (and the live view)."""
        if self.before_marker is not None:
            self.before_marker()
        self.safe(lambda rec: rec.marker(text))

    def text(self, text: str) -> None:
        """Already masked output (a transcript) written as one cast event."""
        self.safe(lambda rec: rec.output_masked(text.encode()))

    def fail(self, message: str, *, at_start: bool = False) -> None:
        """Apply ``recording.on_failure`` once: the recording is aborted (left unsealed,
        verifiable up to its last complete line) and replaced by a DiscardWriter;
        alerted (an ERROR log line, a ``recording.failed`` event, the metric); then
        the owner tells its client (``on_lost``). Also the writer pool's ``on_error``
        hook, called on the loop."""
        if self.failed:
            return
        self.failed = True
        rec = self.rec
        if rec is not None and not isinstance(rec.writer, DiscardWriter):
            rec.writer.abort()
            rec.writer = DiscardWriter.replacing(rec.writer, message)
        policy = self.deps.cfg.recording.on_failure
        terminate = policy == "terminate"
        action = ("refused" if at_start else "terminated") if terminate else "continued"
        self.terminated = terminate
        self.deps.recording_failures[action] += 1
        log.error(
            "recording.failed",
            extra={
                "session": self.session_id,
                "error": message,
                "on_failure": policy,
                "action": action,
            },
        )
        self.audit.failure("recording.failed", error=message, on_failure=policy, action=action)
        self.on_lost(message.rsplit(": ", 1)[-1], terminate=terminate, at_start=at_start)

    def writer_failed(self, message: str) -> None:
        """``on_error`` of the cast writer: runs in a writer thread."""
        loop = self._loop
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to end
            if loop is not None:
                loop.call_soon_threadsafe(self.fail, message)

    def close(self, status: str, info: dict[str, Any]) -> bytes:
        """Seal the cast; returns output the masker still held (for the client)."""
        rec = self.rec
        if rec is None:
            return b""
        try:
            return rec.close(status, info)
        except RecordingError as exc:
            self.fail(str(exc))
            return b""

    @property
    def manifest(self) -> Any:
        """The sealed cast's manifest, or None (not sealed, or the recording failed)."""
        return getattr(self.rec, "manifest", None) or None
