"""``castgate play``: a cast played in the current terminal, with seeking.

Keys: space pause/resume, ``.`` step one event (pauses), left/right seek -/+5 s,
``]`` / ``[`` next/previous marker, ``q`` (or Ctrl-C) quit.

The recording is drawn from the terminal model, not by copying its bytes to the
screen, so seeking lands at once (seek index) and the viewer's terminal never picks up
modes the recorded programs set. The frame is drawn at the top left of the viewer's
terminal on its alternate screen, clipped to its size, with a status line under it (or
on the last row when the terminal is not taller than the recording). The viewer's
terminal is restored on every way out: the end, ``q``, Ctrl-C, SIGTERM, SIGHUP.

``Player`` holds the playback state and turns keys and time into screen updates
without I/O; ``play()`` is the loop that reads keys and writes frames.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from replay.castfile import Event
from replay.seekindex import Marker, Playhead, SeekIndex, apply_event
from replay.terminal import DEFAULT_STYLE, Cell, Terminal

SEEK_STEP = 5.0
# Markers come from the cast: written straight into the status line, an escape sequence
# in one would act on the viewer's terminal (title, clipboard). Controls become spaces.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# '[' within this many seconds after a marker goes to the one before it.
MARKER_BACK_GRACE = 1.0


@dataclass
class Options:
    """How to play: speed factor, longest pause kept (None: as recorded), start time."""

    speed: float = 1.0
    idle_limit: float | None = None
    start: float = 0.0


def fmt_time(t: float) -> str:
    """``MM:SS`` or ``H:MM:SS``."""
    t = max(t, 0.0)
    h, rem = divmod(int(t), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02}:{s:02}" if h else f"{m:02}:{s:02}"


def parse_keys(data: bytes) -> list[str]:
    """Key names in a chunk read from the terminal: ``space``, ``step``, ``left``,
    ``right``, ``next-marker``, ``prev-marker``, ``quit``; anything else is dropped."""
    keys: list[str] = []
    i = 0
    arrows = {b"C": "right", b"D": "left"}
    while i < len(data):
        if data[i : i + 2] in (b"\x1b[", b"\x1bO") and i + 2 < len(data):
            # CSI or SS3 arrow (normal or application cursor mode); skip other sequences
            j = i + 2
            while j < len(data) and not 0x40 <= data[j] <= 0x7E:
                j += 1
            key = arrows.get(data[j : j + 1])
            if key:
                keys.append(key)
            i = j + 1
            continue
        c = data[i : i + 1]
        key = {
            b" ": "space",
            b".": "step",
            b"]": "next-marker",
            b"[": "prev-marker",
            b"q": "quit",
            b"Q": "quit",
            b"\x03": "quit",
        }.get(c)
        if key:
            keys.append(key)
        i += 1
    return keys


def render_row(cells: list[Cell], width: int) -> str:
    """One screen row as text with SGR sequences, at most ``width`` columns wide."""
    out: list[str] = []
    style = DEFAULT_STYLE
    used = 0
    # Trailing blanks in the default style are left to the erase before the row.
    end = len(cells)
    while end and cells[end - 1].text == " " and cells[end - 1].style == DEFAULT_STYLE:
        end -= 1
    for cell in cells[:end]:
        if cell.width == 0:
            continue
        if used + cell.width > width:
            break
        if cell.style != style:
            style = cell.style
            out.append(style.sgr())
        out.append(cell.text)
        used += cell.width
    if style != DEFAULT_STYLE:
        out.append("\x1b[0m")
    return "".join(out)


class Player:
    """Playback state of one cast: where it is, whether it is paused, what the
    viewer's screen shows. Pure: the caller passes the wall-clock time (monotonic
    seconds) and the keys."""

    def __init__(self, index: SeekIndex, options: Options, wall: float = 0.0) -> None:
        """Position at ``options.start``, playing from ``wall``."""
        self.index = index
        self.options = options
        self.paused = False
        self.finished = False
        self.message = ""
        self._rows_drawn: list[str | None] = []
        self._view: tuple[int, int] = (0, 0)
        self.seek(options.start, wall)

    # --- position ------------------------------------------------------------------

    @property
    def terminal(self) -> Terminal:
        """The recording's terminal at the current position."""
        return self.head.terminal

    def seek(self, t: float, wall: float) -> None:
        """Jump to recorded time ``t`` (clamped to the recording)."""
        t = min(max(t, 0.0), self.index.duration)
        self.head: Playhead = self.index.seek(t)
        self.now = t
        self._events: Iterator[tuple[int, Event]] = self.index.cast.events(
            self.head.position, self.head.time
        )
        self._next = next(self._events, None)
        self.finished = False
        self._anchor(wall)

    def _anchor(self, wall: float) -> None:
        # Recorded time advances at ``speed``, faster across a pause longer than the
        # idle limit so that it takes idle_limit / speed seconds to cross.
        self._wall0, self._now0 = wall, self.now
        self._rate = self.options.speed
        nxt = self.next_event_time()
        limit = self.options.idle_limit
        if nxt is not None and limit is not None and nxt - self.now > limit > 0:
            self._rate = self.options.speed * (nxt - self.now) / limit

    def next_event_time(self) -> float | None:
        """Recorded time of the next event, or None at the end."""
        return None if self._next is None else self._next[1].time

    def due_in(self, wall: float) -> float | None:
        """Seconds from ``wall`` until the next event is due (None: paused or at the
        end)."""
        nxt = self.next_event_time()
        if nxt is None or self.paused:
            return None
        return max(self._wall0 + (nxt - self._now0) / self._rate - wall, 0.0)

    def tick(self, wall: float) -> None:
        """Apply every event due by ``wall`` and move the clock."""
        if self.paused or self.finished:
            return
        while True:
            nxt = self.next_event_time()
            if nxt is None:
                self.now = self.index.duration
                self.finished = True
                return
            due = self._wall0 + (nxt - self._now0) / self._rate
            if due > wall:
                break
            self.step()
            self._anchor(due)
        self.now = min(self._now0 + (wall - self._wall0) * self._rate, nxt)

    def step(self) -> bool:
        """Apply the next event; False at the end."""
        if self._next is None:
            return False
        pos, ev = self._next
        apply_event(self.head.terminal, ev)
        self.head.position, self.head.time = pos, ev.time
        self.now = max(self.now, ev.time)
        if ev.code == "m":
            self.message = f"marker: {ev.data}"
        self._next = next(self._events, None)
        return True

    def markers(self) -> list[Marker]:
        """The cast's markers."""
        return self.index.markers

    # --- keys ----------------------------------------------------------------------

    def key(self, name: str, wall: float) -> bool:
        """Act on a key pressed at ``wall``; False means quit."""
        if name == "quit":
            return False
        if name == "space":
            self.paused = not self.paused
            self.message = ""
            if not self.paused:
                self._anchor(wall)
        elif name == "step":
            self.paused = True
            self.message = "" if self.step() else "end of recording"
        elif name in ("left", "right"):
            delta = SEEK_STEP if name == "right" else -SEEK_STEP
            self.seek(self.now + delta, wall)
            self.message = f"{'+' if delta > 0 else '-'}{SEEK_STEP:g}s"
        elif name == "next-marker":
            later = [m for m in self.markers() if m.time > self.now + 1e-6]
            if later:
                self.seek(later[0].time, wall)
                self.message = f"marker: {later[0].label}"
            else:
                self.message = "no next marker"
        elif name == "prev-marker":
            earlier = [m for m in self.markers() if m.time < self.now - 1e-6]
            # Just after a marker, '[' goes to the one before it, as a media player's
            # "previous" does.
            if len(earlier) > 1 and self.now - earlier[-1].time < MARKER_BACK_GRACE:
                earlier.pop()
            if earlier:
                self.seek(earlier[-1].time, wall)
                self.message = f"marker: {earlier[-1].label}"
            else:
                self.message = "no previous marker"
        return True

    # --- drawing -------------------------------------------------------------------

    def status(self, width: int) -> str:
        """The status line (plain text, fitted to ``width``)."""
        state = "paused" if self.paused else ("end" if self.finished else "playing")
        speed = f" {self.options.speed:g}x" if self.options.speed != 1 else ""
        left = f" {state} {fmt_time(self.now)} / {fmt_time(self.index.duration)}{speed}"
        if self.message:
            left += f"  {_CONTROLS.sub(' ', self.message)}"
        right = " space pause  \u2190/\u2192 5s  [ ] markers  . step  q quit "
        if len(left) + len(right) <= width:
            return left + " " * (width - len(left) - len(right)) + right
        return left[:width].ljust(width)

    def frame(self, cols: int, rows: int, full: bool = False) -> str:
        """Escape sequences that bring the viewer's screen (``cols`` x ``rows``) up to
        date; only rows that changed unless ``full``."""
        cols, rows = max(cols, 1), max(rows, 2)  # room for one row and the status line
        term = self.head.terminal
        rec_cols, rec_rows = term.size
        status_row = min(rec_rows + 1, rows)
        show_rows = min(rec_rows, status_row - 1)
        out: list[str] = ["\x1b[?25l"]
        if full or self._view != (cols, rows) or len(self._rows_drawn) != show_rows:
            out.append("\x1b[0m\x1b[2J")
            self._rows_drawn = [None] * show_rows
            self._view = (cols, rows)
        width = min(cols, rec_cols)
        for y, cells in enumerate(term.cells()[:show_rows]):
            text = render_row(cells, width)
            if self._rows_drawn[y] != text:
                out.append(f"\x1b[{y + 1};1H\x1b[0m\x1b[2K{text}")
                self._rows_drawn[y] = text
        out.append(f"\x1b[{status_row};1H\x1b[0;7m{self.status(cols)}\x1b[0m")
        cur = term.cursor()
        if cur.visible and cur.row < show_rows and cur.col < width:
            out.append(f"\x1b[{cur.row + 1};{cur.col + 1}H\x1b[?25h")
        return "".join(out)


# --- the loop -------------------------------------------------------------------------


class _Quit(Exception):
    pass


def _raise_quit(signum: int, frame: FrameType | None) -> None:
    raise _Quit


def _write(fd: int, text: str) -> None:
    data = text.encode("utf-8", "replace")
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        data = data[n:]


def play(player: Player, in_fd: int = 0, out_fd: int = 1) -> int:
    """Run the player in the terminal on ``out_fd`` reading keys from ``in_fd``;
    returns 0. The terminal is restored however the loop ends."""
    interactive = os.isatty(in_fd)
    saved = termios.tcgetattr(in_fd) if interactive else None
    resized = [True]
    old_handlers = {}

    def on_winch(signum: int, frame: FrameType | None) -> None:
        resized[0] = True

    for sig in (signal.SIGTERM, signal.SIGHUP):
        old_handlers[sig] = signal.signal(sig, _raise_quit)
    old_handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, on_winch)
    try:
        if saved is not None:
            tty.setraw(in_fd)
        _write(out_fd, "\x1b[?1049h\x1b[?25l\x1b[0m\x1b[2J")
        _loop(player, in_fd if interactive else None, out_fd, resized)
    except (_Quit, KeyboardInterrupt):
        pass
    finally:
        with contextlib.suppress(OSError):
            _write(out_fd, "\x1b[0m\x1b[?25h\x1b[?1049l")
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return 0


def _loop(player: Player, in_fd: int | None, out_fd: int, resized: list[bool]) -> None:
    cols, rows = 80, 24
    full = True
    while True:
        wall = time.monotonic()
        player.tick(wall)
        if resized[0]:
            resized[0] = False
            with contextlib.suppress(OSError):
                size = os.get_terminal_size(out_fd)
                # A fresh pty reports 0x0 until someone sets its size: keep the default.
                if size.columns > 0 and size.lines > 1:
                    cols, rows = size
            full = True
        _write(out_fd, player.frame(cols, rows, full=full))
        full = False
        if player.finished:
            return
        due = player.due_in(wall)
        # Wake at least twice a second to move the clock on the status line.
        timeout = None if player.paused else min(due if due is not None else 0.5, 0.5)
        if in_fd is None:
            time.sleep(timeout or 0)
            continue
        try:
            ready, _, _ = select.select([in_fd], [], [], timeout)
        except InterruptedError:  # SIGWINCH
            continue
        if ready:
            data = os.read(in_fd, 256)
            if not data:
                return
            for name in parse_keys(data):
                if not player.key(name, time.monotonic()):
                    return


def run_player(player: Player) -> int:
    """``play`` on stdin/stdout; refuses when stdout is not a terminal."""
    if not os.isatty(sys.stdout.fileno()):
        from replay.terminal import TerminalError

        raise TerminalError(
            "play needs a terminal on standard output (for text use 'castgate export --format txt')"
        )
    return play(player, sys.stdin.fileno(), sys.stdout.fileno())
