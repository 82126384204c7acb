"""The cast writer's failure path on a real full filesystem (a small tmpfs): a header
that cannot be written refuses the recording and leaves no files; a write failing in
the writer pool is reported at once through ``on_error``; the cast left behind verifies
as unsealed or truncated."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from recorder.integrity import Verdict, verify_cast
from recorder.recording import CastWriter, DiscardWriter, RecordingError
from recorder.signing import SigningKey


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "rec"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)


def _fill(directory: Path, leave: int) -> None:
    st = os.statvfs(directory)
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave)
    finally:
        os.close(fd)


def _writer(path: Path, **kw: object) -> CastWriter:
    return CastWriter(
        path,
        width=80,
        height=24,
        session_id="s1",
        signing_key=SigningKey.generate(),
        **kw,  # type: ignore[arg-type]
    )


def test_a_full_disk_refuses_the_recording_at_open(small_fs: Path) -> None:
    _fill(small_fs, 0)
    with pytest.raises(RecordingError, match="No space left on device"):
        _writer(small_fs / "a.cast", threaded=True)
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_a_pool_write_failure_is_reported_at_once(small_fs: Path) -> None:
    errors: list[str] = []
    reported = threading.Event()

    def on_error(message: str) -> None:
        errors.append(message)
        reported.set()

    w = _writer(small_fs / "a.cast", threaded=True, on_error=on_error, fsync_interval=3600)
    w.output(b"first line\r\n")
    w.chain_hash  # noqa: B018 - waits until the pool wrote it
    _fill(small_fs, 0)
    w.output(b"x" * 100_000)
    assert reported.wait(30), "on_error was not called"
    # Reported through the hook: later events are dropped, not raised at the caller.
    w.output(b"more")
    w.sync()
    with pytest.raises(RecordingError, match="No space left on device"):
        w.close()
    assert len(errors) == 1 and "No space left on device" in errors[0]
    report = verify_cast(small_fs / "a.cast")
    assert report.verdict in (Verdict.UNSEALED, Verdict.TRUNCATED), report.line()
    assert report.lines >= 2  # the header and the first line are intact


def test_without_a_hook_the_next_call_raises(small_fs: Path) -> None:
    w = _writer(small_fs / "a.cast")
    _fill(small_fs, 0)
    with pytest.raises(RecordingError, match="No space left on device"):
        w.output(b"y" * 10_000)
    w.abort()


def test_a_discard_writer_takes_over_where_the_cast_stopped(tmp_path: Path) -> None:
    w = _writer(tmp_path / "a.cast")
    w.output(b"hello\r\n")
    w.abort()
    spare = DiscardWriter.replacing(w, "cannot write: No space left on device")
    assert (spare.lines, spare.chain_hash) == (2, w._chain.hex)
    spare.output(b"dropped")
    spare.marker("dropped too")
    assert spare.bytes_out == len(b"hello\r\n") + len(b"dropped")
    assert spare.close("closed") == {}
    assert (tmp_path / "a.cast").read_bytes().count(b"\n") == 2
