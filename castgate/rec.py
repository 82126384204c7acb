"""``castgate rec``: run a local command in a PTY, mask its output, record it.

Thin asyncio glue: the PTY master and stdin are read with ``add_reader``; masking and
recording are ``SessionRecorder``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import select
import shutil
import signal
import struct
import sys
import termios
import tty
from datetime import UTC, datetime
from pathlib import Path

from castgate.runtime import Runtime
from recorder.recording import CastWriter, RecordingError
from recorder.session import SessionRecorder

_READ = 65536


def new_session_id() -> str:
    """Time-sortable, unguessable session id."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


def _winsize(fd: int) -> tuple[int, int] | None:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (cols, rows) if cols and rows else None


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _echo_on(master: int) -> bool:
    try:
        return bool(termios.tcgetattr(master)[3] & termios.ECHO)
    except termios.error:
        return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class _Rec:
    def __init__(self, rt: Runtime, out: Path, cmd: list[str]) -> None:
        self.rt = rt
        self.out = out
        self.cmd = cmd
        self.stdin_tty = os.isatty(0)
        self.stdout_fd = 1
        self.flush_handle: asyncio.TimerHandle | None = None
        self.failed: str | None = None
        self.recording = True

    def _checkpoint(self, lines: int, chain_hash: str) -> None:
        store = self.rt.store
        if store is not None:
            store.add_checkpoint(self.session_id, lines, chain_hash)

    async def run(self) -> int:
        size = _winsize(0) or _winsize(1) or (80, 24)
        cfg = self.rt.config
        self.session_id = new_session_id()
        title = " ".join(self.cmd)
        writer = CastWriter(
            self.out,
            width=size[0],
            height=size[1],
            session_id=self.session_id,
            signing_key=self.rt.signing_key,
            title=self.rt.masker.mask(title),
            env={"TERM": os.environ.get("TERM", "xterm-256color"), "SHELL": "/bin/sh"},
            fsync_interval=cfg.recording.fsync_interval,
            on_checkpoint=self._checkpoint,
            extra_header={"source": "rec"},
        )
        self.rec = SessionRecorder(
            writer,
            self.rt.masker,
            input_mode=cfg.recording.input,
            hold_deadline=cfg.masking.hold_deadline_ms / 1000,
        )
        store = self.rt.store
        if store is not None:
            store.create_session(
                self.session_id,
                identity=os.environ.get("USER", "local"),
                target="local",
                protocol="pty",
                auth_method="local",
                cast_path=str(self.out.resolve()),
                title=self.rt.masker.mask(title),
            )
        master, slave = os.openpty()
        _set_winsize(slave, *size)
        exe = shutil.which(self.cmd[0])
        if exe is None:
            os.close(master)
            os.close(slave)
            writer.abort()
            for p in (self.out,):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise FileNotFoundError(f"command not found: {self.cmd[0]}")

        def _ctty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        proc = await asyncio.create_subprocess_exec(
            exe,
            *self.cmd[1:],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_ctty,
            env={**os.environ, "CASTGATE_SESSION": self.session_id},
        )
        os.close(slave)
        self.master = master
        self.proc = proc
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        loop.add_reader(master, self._on_master)
        saved = None
        if self.stdin_tty:
            saved = termios.tcgetattr(0)
            tty.setraw(0)
        with contextlib.suppress(OSError, ValueError):
            loop.add_reader(0, self._on_stdin)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            loop.add_signal_handler(sig, self._forward, sig)
        loop.add_signal_handler(signal.SIGWINCH, self._resize)
        try:
            await self.done
            status = await proc.wait()
        finally:
            for fd in (master, 0):
                with contextlib.suppress(Exception):
                    loop.remove_reader(fd)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGWINCH):
                loop.remove_signal_handler(sig)
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            with contextlib.suppress(OSError):
                os.close(master)
        exit_status = status if status >= 0 else 128 - status
        self._finish(exit_status)
        return exit_status

    def _finish(self, exit_status: int) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
        reason = "exited" if self.failed is None else "recording failed"
        if self.recording:
            try:
                tail = self.rec.close(reason, {"exit_status": exit_status})
                self._send(tail)
            except RecordingError as exc:
                self._fail(str(exc))
        store = self.rt.store
        if store is not None:
            manifest = getattr(self.rec, "manifest", None)
            store.end_session(
                self.session_id,
                status="closed" if self.failed is None else "failed",
                exit_status=exit_status,
                lines=self.rec.writer.lines,
                final_hash=self.rec.writer.chain_hash,
                masking_counts=dict(self.rec.counts),
            )
            if manifest is not None:
                store.put_manifest(self.session_id, manifest)
        self._index()

    def _index(self) -> None:
        """Seek index for a sealed cast that is small enough (see recording.index_max_mb)."""
        limit = self.rt.config.recording.index_max_mb * 1024 * 1024
        if self.failed is not None or not self.out.exists() or self.out.stat().st_size > limit:
            return
        from replay.seekindex import build_index, load_or_create_key

        with contextlib.suppress(Exception):  # the index is rebuilt on demand anyway
            build_index(self.out, key=load_or_create_key(self.rt.keys_dir))

    def _send(self, data: bytes) -> None:
        if data:
            with contextlib.suppress(OSError):
                _write_all(self.stdout_fd, data)

    def _fail(self, message: str) -> None:
        self.failed = message
        self.recording = False
        self.rec.writer.abort()
        policy = self.rt.config.recording.on_failure
        sys.stderr.write(f"\r\ncastgate: recording failed: {message} (on_failure = {policy})\r\n")
        if policy == "terminate":
            self._forward(signal.SIGHUP)

    def _on_master(self) -> None:
        try:
            data = os.read(self.master, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            if not self.done.done():
                self.done.set_result(None)
            return
        if not self.recording:
            self._send(self.rt.masker.mask_bytes(data))
            return
        try:
            self._send(self.rec.output(data))
        except RecordingError as exc:
            self._fail(str(exc))
            return
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if self.rec.pending():
            loop = asyncio.get_running_loop()
            self.flush_handle = loop.call_later(self.rec.hold_deadline, self._deadline)

    def _deadline(self) -> None:
        self.flush_handle = None
        if self.recording:
            try:
                self._send(self.rec.flush_output())
            except RecordingError as exc:
                self._fail(str(exc))

    def _on_stdin(self) -> None:
        try:
            data = os.read(0, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        loop = asyncio.get_running_loop()
        if not data:
            loop.remove_reader(0)
            # End of a non-terminal stdin: give the program EOF, as a terminal ^D would.
            with contextlib.suppress(OSError):
                os.write(self.master, b"\x04")
            return
        if self.recording:
            try:
                self.rec.input(data, echo=_echo_on(self.master))
            except RecordingError as exc:
                self._fail(str(exc))
        with contextlib.suppress(OSError):
            _write_all(self.master, data)

    def _forward(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def _resize(self) -> None:
        size = _winsize(0) or _winsize(1)
        if size is None:
            return
        _set_winsize(self.master, *size)
        if self.recording:
            try:
                self.rec.resize(*size)
            except RecordingError as exc:
                self._fail(str(exc))


def record_command(rt: Runtime, out: Path, cmd: list[str]) -> int:
    """Record ``cmd`` into ``out``; returns the command's exit status (128+N if killed
    by signal N)."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; casts are never overwritten")
    return asyncio.run(_Rec(rt, out, cmd).run())
