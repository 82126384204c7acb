"""Keyframe seek index: land on any moment of a huge cast at once.

A keyframe is a terminal snapshot taken after some event, with the byte position of
the next event. Keyframes are taken every ``every_bytes`` of cast lines, every
``every_events`` events or every ``every_seconds`` of recording, whichever comes first,
but only where a snapshot captures the whole state (between escape sequences; see
replay/terminal.py). Seeking to time T loads the last keyframe at or before T and feeds
the events after it up to T; what it yields equals feeding everything from the start.

The index lives next to the cast as ``NAME.cast.idx``:

    magic line, 8-byte header length, header JSON, keyframe blobs (zlib), 32-byte tag

The header binds the index to the cast's size and SHA-256 (for a sealed cast, the
value its signed manifest states as ``file_sha256``) and to the terminal backend and
its version. The tag is an HMAC-SHA256 with a key local to this installation (or a
plain SHA-256 when no key is given), so an index that is stale, corrupt, tampered with
or built elsewhere is rebuilt, never trusted: a forged keyframe would otherwise show an
auditor a screen the recording never had.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import hmac
import os
import secrets
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from recorder.errors import CastgateError
from recorder.integrity import file_sha256
from replay.castfile import CastFile, Event, parse_size
from replay.terminal import Terminal, backend_class

INDEX_SUFFIX = ".idx"
KEY_NAME = "seek-index.key"
FORMAT = "castgate-seek-index/1"
_MAGIC = b"CASTGATE SEEK INDEX 1\n"
_TAG = 32

DEFAULT_EVERY_BYTES = 1 << 20
DEFAULT_EVERY_EVENTS = 20_000
DEFAULT_EVERY_SECONDS = 60.0
_PROGRESS_STEP = 4 << 20

Progress = Callable[[int, int], None]


class SeekIndexError(CastgateError):
    """An index that cannot be used (the caller rebuilds it)."""


def index_path(cast: Path) -> Path:
    """Path of a cast's seek index sidecar."""
    return cast.with_name(cast.name + INDEX_SUFFIX)


def load_or_create_key(keys_dir: Path) -> bytes:
    """The local key that authenticates seek indexes, created (0600) on first use."""
    path = keys_dir / KEY_NAME
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise SeekIndexError(f"{path}: unreadable seek index key: {exc}") from None
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def _tag(key: bytes | None, data: bytes | memoryview) -> bytes:
    if key is None:
        return hashlib.sha256(data).digest()
    return hmac.new(key, data, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Keyframe:
    """Terminal state after ``events`` events, the last one at ``time``; the next event
    starts at ``position``."""

    time: float
    position: int
    events: int
    blob_offset: int
    blob_length: int


@dataclass(frozen=True, slots=True)
class Marker:
    """An ``m`` event: time and label."""

    time: float
    label: str


@dataclass
class Playhead:
    """A terminal positioned in a cast: every event up to ``time`` applied; the next
    event starts at ``position``."""

    terminal: Terminal
    position: int
    time: float
    events: int = 0


@dataclass
class SeekIndex:
    """A loaded or freshly built index of one cast."""

    cast: CastFile
    backend: type[Terminal]
    keyframes: list[Keyframe]
    markers: list[Marker]
    duration: float
    events: int
    output_bytes: int
    cast_sha256: str
    blobs: bytes
    size_bytes: int = 0
    rebuilt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._times = [k.time for k in self.keyframes]

    def keyframe_at(self, t: float) -> Keyframe:
        """The last keyframe at or before ``t``."""
        i = bisect.bisect_right(self._times, t) - 1
        return self.keyframes[max(i, 0)]

    def _restore(self, kf: Keyframe) -> Terminal:
        blob = self.blobs[kf.blob_offset : kf.blob_offset + kf.blob_length]
        return self.backend.restore(zlib.decompress(blob).decode("utf-8"))

    def seek(self, t: float) -> Playhead:
        """The terminal after every event at or before ``t``."""
        kf = self.keyframe_at(t)
        head = Playhead(self._restore(kf), kf.position, kf.time, kf.events)
        advance(head, self.cast, until=t)
        return head


def apply_event(term: Terminal, ev: Event) -> None:
    """Apply one event to a terminal (``o`` and ``r``; other codes do not change it).

    Output is fed one event at a time, never joined: avt trims the scrollback (which
    the model keeps empty) only when a feed call returns, so lines pushed off by a
    reflow can come back within one call but not across two. One call per event makes
    the result a function of the cast alone, the way asciinema's player feeds it.
    """
    if ev.code == "o":
        term.feed(ev.data)
    elif ev.code == "r":
        size = parse_size(ev.data)
        if size is not None:
            term.resize(*size)


def apply_events(term: Terminal, events: Iterable[Event]) -> None:
    """Apply events in order."""
    for ev in events:
        apply_event(term, ev)


def advance(head: Playhead, cast: CastFile, until: float) -> None:
    """Apply the events after ``head`` whose time is at or before ``until``."""
    term = head.terminal
    for pos, ev in cast.events(head.position, head.time):
        if ev.time > until:
            break
        apply_event(term, ev)
        head.position, head.time = pos, ev.time
        head.events += 1


def start(cast: CastFile, backend: str | None = None) -> Playhead:
    """A fresh terminal at the start of a cast."""
    cls = backend_class(backend)
    return Playhead(cls(cast.header.width, cast.header.height), cast.data_start, 0.0)


def build_index(
    cast_path: Path,
    *,
    backend: str | None = None,
    key: bytes | None = None,
    every_bytes: int = DEFAULT_EVERY_BYTES,
    every_events: int = DEFAULT_EVERY_EVENTS,
    every_seconds: float = DEFAULT_EVERY_SECONDS,
    progress: Progress | None = None,
    write: bool = True,
    cast_sha256: str | None = None,
) -> SeekIndex:
    """Read the whole cast once and take keyframes; writes ``NAME.cast.idx`` when
    ``write`` (and the directory is writable). ``progress(done, total)`` is called
    every few MB of cast."""
    cast = CastFile(cast_path)
    digest = cast_sha256 or file_sha256(cast_path)
    cls = backend_class(backend)
    term = cls(cast.header.width, cast.header.height)
    blobs = bytearray()
    keyframes: list[Keyframe] = []
    markers: list[Marker] = []

    def keyframe(t: float, position: int, events: int) -> None:
        blob = zlib.compress(term.snapshot().encode("utf-8"), 6)
        keyframes.append(Keyframe(t, position, events, len(blobs), len(blob)))
        blobs.extend(blob)

    keyframe(0.0, cast.data_start, 0)
    since_bytes = since_events = 0
    last_kf_time = 0.0
    last_pos = cast.data_start
    next_progress = _PROGRESS_STEP
    total = max(cast.size - cast.data_start, 1)
    n = 0
    out_bytes = 0
    t = 0.0
    for pos, ev in cast.events():
        code = ev.code
        if code == "o":
            term.feed(ev.data)
            out_bytes += len(ev.data)
        elif code == "r":
            size = parse_size(ev.data)
            if size is not None:
                term.resize(*size)
        elif code == "m":
            markers.append(Marker(ev.time, ev.data))
        n += 1
        t = ev.time
        since_bytes += pos - last_pos
        since_events += 1
        last_pos = pos
        if (
            since_bytes >= every_bytes
            or since_events >= every_events
            or t - last_kf_time >= every_seconds
        ) and term.snapshot_ok():
            # Deferred to a later event boundary while inside an escape sequence.
            keyframe(t, pos, n)
            since_bytes = since_events = 0
            last_kf_time = t
        if progress is not None and pos - cast.data_start >= next_progress:
            progress(pos - cast.data_start, total)
            next_progress += _PROGRESS_STEP
    if progress is not None:
        progress(total, total)
    params = {
        "every_bytes": every_bytes,
        "every_events": every_events,
        "every_seconds": every_seconds,
    }
    index = SeekIndex(
        cast=cast,
        backend=cls,
        keyframes=keyframes,
        markers=markers,
        duration=t,
        events=n,
        output_bytes=out_bytes,
        cast_sha256=digest,
        blobs=bytes(blobs),
        params=params,
    )
    data = _serialise(index, key)
    index.size_bytes = len(data)
    if write:
        _write_atomic(index_path(cast_path), data)
    return index


def _serialise(index: SeekIndex, key: bytes | None) -> bytes:
    header = {
        "format": FORMAT,
        "backend": index.backend.version(),
        "tag": "hmac-sha256" if key is not None else "sha256",
        "cast": {
            "name": index.cast.path.name,
            "size": index.cast.size,
            "sha256": index.cast_sha256,
            "version": index.cast.version,
        },
        "params": index.params,
        "built_at": datetime.now(UTC).isoformat(),
        "duration": index.duration,
        "events": index.events,
        "output_bytes": index.output_bytes,
        "markers": [[m.time, m.label] for m in index.markers],
        "keyframes": [
            [k.time, k.position, k.events, k.blob_offset, k.blob_length] for k in index.keyframes
        ],
    }
    head = orjson.dumps(header)
    body = _MAGIC + struct.pack(">Q", len(head)) + head + index.blobs
    return body + _tag(key, body)


def _write_atomic(path: Path, data: bytes) -> bool:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        tmp.replace(path)
    except OSError:
        # A read-only directory (an evidence bundle on read-only media, say): the
        # index still serves this run from memory.
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def load_index(
    cast_path: Path,
    *,
    key: bytes | None = None,
    backend: str | None = None,
    cast_sha256: str | None = None,
) -> SeekIndex:
    """Load and check ``NAME.cast.idx``; raises SeekIndexError saying why it cannot be
    used (missing, corrupt, tampered, stale, other backend)."""
    path = index_path(cast_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SeekIndexError("no index yet") from None
    except OSError as exc:
        raise SeekIndexError(f"cannot read {path.name}: {exc.strerror}") from None
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 8 + _TAG:
        raise SeekIndexError(f"{path.name} is not a seek index")
    body, tag = memoryview(data)[:-_TAG], data[-_TAG:]
    if not hmac.compare_digest(_tag(key, body), tag):
        raise SeekIndexError(
            f"{path.name} failed its integrity check (corrupt, altered or built elsewhere)"
        )
    (head_len,) = struct.unpack_from(">Q", data, len(_MAGIC))
    head_start = len(_MAGIC) + 8
    try:
        header = orjson.loads(data[head_start : head_start + head_len])
        cls = backend_class(backend)
        if header.get("format") != FORMAT:
            raise SeekIndexError(f"{path.name}: unknown format {header.get('format')!r}")
        if header.get("backend") != cls.version():
            raise SeekIndexError(f"{path.name} was built with {header.get('backend')}")
        cast = CastFile(cast_path)
        bound = header["cast"]
        if int(bound["size"]) != cast.size:
            raise SeekIndexError(f"{path.name} is stale (the cast's size changed)")
        digest = cast_sha256 or file_sha256(cast_path)
        if bound["sha256"] != digest:
            raise SeekIndexError(f"{path.name} is stale (the cast's SHA-256 changed)")
        keyframes = [
            Keyframe(float(k[0]), int(k[1]), int(k[2]), int(k[3]), int(k[4]))
            for k in header["keyframes"]
        ]
        markers = [Marker(float(m[0]), str(m[1])) for m in header["markers"]]
        blobs = data[head_start + head_len : -_TAG]
        if not keyframes or any(k.blob_offset + k.blob_length > len(blobs) for k in keyframes):
            raise SeekIndexError(f"{path.name}: keyframe table out of range")
        return SeekIndex(
            cast=cast,
            backend=cls,
            keyframes=keyframes,
            markers=markers,
            duration=float(header["duration"]),
            events=int(header["events"]),
            output_bytes=int(header["output_bytes"]),
            cast_sha256=digest,
            blobs=blobs,
            size_bytes=len(data),
            params=dict(header.get("params") or {}),
        )
    except (KeyError, TypeError, ValueError, IndexError, orjson.JSONDecodeError) as exc:
        raise SeekIndexError(f"{path.name}: malformed header: {exc}") from None


def open_index(
    cast_path: Path,
    *,
    key: bytes | None = None,
    backend: str | None = None,
    progress: Progress | None = None,
    write: bool = True,
) -> SeekIndex:
    """The cast's index: loaded when it checks out, otherwise rebuilt (and written).
    ``rebuilt`` on the result says why it was rebuilt, or is None."""
    digest = file_sha256(cast_path)
    try:
        return load_index(cast_path, key=key, backend=backend, cast_sha256=digest)
    except SeekIndexError as exc:
        reason = str(exc)
    index = build_index(
        cast_path,
        backend=backend,
        key=key,
        progress=progress,
        write=write,
        cast_sha256=digest,
    )
    index.rebuilt = reason
    return index
