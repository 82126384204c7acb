"""One recorded session: masks the output stream once, releases the same masked bytes to
the client and to the cast, and keeps input per ``recording.input``.

No I/O of its own beyond the CastWriter, and no clock beyond the writer's: the caller's
event loop calls ``flush_output`` once ``hold_deadline`` has passed while ``pending``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from recorder.masking import Masker, StreamMasker
from recorder.recording import CastWriter

_ERASE = (0x7F, 0x08)
_BUILTIN = frozenset({"pan", "track"})
# Where custom secrets were shown is kept per occurrence up to this many, then counted:
# a log full of tokens must not grow the manifest without bound.
MAX_SECRET_POSITIONS = 1000
_NEWLINES = (0x0D, 0x0A)
HIDDEN_MARKER = "input hidden (terminal echo off)"


class LiveSink(Protocol):
    """Where a live session's masked events also go (the relay's live fan-out)."""

    def output(self, data: bytes) -> None: ...
    def marker(self, text: str) -> None: ...
    def resize(self, width: int, height: int) -> None: ...


class SessionRecorder:
    """Masking and recording for one session.

    Args:
        writer: the session's cast.
        masker: compiled masking policy shared by all sessions.
        input_mode: ``none``, ``commands`` (submitted lines) or ``all`` (keystrokes).
        hold_deadline: seconds a possible match may be held back.
        on_output: called with every masked output chunk.
        live: receives masked output, markers and resizes as they are recorded.
    """

    def __init__(
        self,
        writer: CastWriter,
        masker: Masker,
        *,
        input_mode: str = "commands",
        hold_deadline: float = 0.020,
        on_output: Callable[[bytes], None] | None = None,
        live: LiveSink | None = None,
    ) -> None:
        self.writer = writer
        self.masker = masker
        self.input_mode = input_mode
        self._streams = {"out": masker.stream(hold_deadline), "err": masker.stream(hold_deadline)}
        self._in: StreamMasker = masker.stream(hold_deadline)
        self.hold_deadline = hold_deadline
        self._line = bytearray()
        self._hidden = False
        self._on_output = on_output
        self.live = live
        self.input_counts: Counter[str] = Counter()
        self._customs = frozenset(masker.custom_names)
        self._seen_total = 0
        self._seen: Counter[str] = Counter()
        # Custom secret patterns masked in what the session showed: detector, time and
        # cast line of the output event that carried them (issue: "secret shown to the
        # agent, masked", per detector and position).
        self.secrets_shown: list[dict[str, Any]] = []
        self.secrets_shown_dropped = 0

    def pending(self, stream: str = "out") -> bool:
        """True while output of ``stream`` is held back for more bytes or the deadline."""
        return self._streams[stream].pending > 0

    @property
    def counts(self) -> Counter[str]:
        """What was masked, per detector, in output and recorded input."""
        total = self._in.counts + self.input_counts
        for s in self._streams.values():
            total += s.counts
        return total

    def _mask_total(self) -> int:
        total = self._in.counts.total() + self.input_counts.total()
        for st in self._streams.values():
            total += st.counts.total()
        return total

    def _settle_counts(self) -> Counter[str]:
        """What was masked since the last look, per custom detector; moves the baseline."""
        counts = self.counts
        grew = Counter({k: n - self._seen[k] for k, n in counts.items() if k in self._customs})
        self._seen = counts
        self._seen_total = counts.total()
        return +grew

    def _note_shown(self) -> None:
        if not self._customs or self._mask_total() == self._seen_total:
            return
        grew = self._settle_counts()
        if not grew:
            return
        at = round(self.writer.elapsed(), 6)
        line = self.writer.lines
        for detector, n in sorted(grew.items()):
            if len(self.secrets_shown) >= MAX_SECRET_POSITIONS:
                self.secrets_shown_dropped += n
                continue
            self.secrets_shown.append({"detector": detector, "t": at, "line": line, "count": n})

    def _emit(self, masked: bytes) -> bytes:
        if masked:
            self.writer.output(masked)
            self._note_shown()
            if self._on_output is not None:
                self._on_output(masked)
            if self.live is not None:
                self.live.output(masked)
        return masked

    def output(self, data: bytes, stream: str = "out") -> bytes:
        """Mask an output chunk of ``stream`` (``out`` or ``err``), record it, and
        return what to send to the client now."""
        return self._emit(self._streams[stream].feed(data))

    def output_masked(self, data: bytes) -> None:
        """Record output that was built from already masked parts (the PostgreSQL
        transcript), without a second pass through the masker."""
        self._emit(data)

    def flush_output(self, stream: str = "out") -> bytes:
        """Release held output of ``stream`` (deadline passed or stream ended)."""
        return self._emit(self._streams[stream].flush())

    def input(self, data: bytes, *, echo: bool = True) -> None:
        """Keep input per the input mode. ``echo`` false means the terminal is not
        echoing (a password prompt): such input is never kept, only a marker."""
        if self.input_mode == "none" or not data:
            return
        if not echo:
            if not self._hidden:
                self._hidden = True
                self.writer.marker(HIDDEN_MARKER)
            self._line.clear()
            return
        self._hidden = False
        if self.input_mode == "all":
            masked = self._in.feed(data)
            self._settle_input()
            if masked:
                self.writer.input(masked)
            return
        for byte in data:
            if byte in _NEWLINES:
                if self._line:
                    self.command_line(bytes(self._line).decode("utf-8", "replace"))
                    self._line.clear()
            elif byte in _ERASE:
                if self._line:
                    self._line.pop()
            elif byte == 0x15:  # ^U kills the line
                self._line.clear()
            elif byte >= 0x20 or byte == 0x09:
                self._line.append(byte)

    def command_line(self, line: str) -> str:
        """Record a submitted command line (masked); returns the masked text."""
        masked = self.masker.mask(line, self.input_counts)
        self._settle_input()
        if self.input_mode != "none":
            self.writer.input(masked + "\n")
        return masked

    def _settle_input(self) -> None:
        # What the agent typed (or a marker quoting it) is not something it was shown.
        if self._customs and self._mask_total() != self._seen_total:
            self._settle_counts()

    def resize(self, cols: int, rows: int) -> None:
        """Record a terminal size change."""
        self.writer.resize(cols, rows)
        if self.live is not None:
            self.live.resize(cols, rows)

    def marker(self, text: str) -> None:
        """Record a policy marker (masked: it may quote a command)."""
        masked = self.masker.mask(text, self.input_counts)
        self._settle_input()
        self.writer.marker(masked)
        if self.live is not None:
            self.live.marker(masked)

    def close(self, reason: str = "closed", extra: dict[str, Any] | None = None) -> bytes:
        """Flush held output and input, seal the cast; returns the last stdout bytes
        (flush ``err`` first if it must reach the client separately)."""
        self.flush_output("err")
        tail = self.flush_output()
        rest = self._in.flush()
        if rest and self.input_mode == "all":
            self.writer.input(rest)
        info: dict[str, Any] = {"masking_counts": dict(self.counts)}
        if self.secrets_shown or self.secrets_shown_dropped:
            info["secrets_shown"] = self.secrets_shown
            info["secrets_shown_dropped"] = self.secrets_shown_dropped
        if extra:
            info.update(extra)
        self.manifest = self.writer.close(reason, info)
        return tail
