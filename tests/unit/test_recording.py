"""asciicast writer, hash chain, signed manifest and verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recorder.asciicast import EventEncoder
from recorder.integrity import Verdict, chain_path, manifest_path, verify_cast
from recorder.masking import CustomPattern, Masker, MaskPolicy, luhn_complete
from recorder.recording import CastWriter, RecordingError
from recorder.session import HIDDEN_MARKER, MAX_SECRET_POSITIONS, SessionRecorder
from recorder.signing import SigningKey

KEY = SigningKey.generate()


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def write_cast(path: Path, events: int = 20, **kw: object) -> CastWriter:
    clock = FakeClock()
    w = CastWriter(path, width=80, height=24, session_id="s1", signing_key=KEY, clock=clock, **kw)  # type: ignore[arg-type]
    for i in range(events):
        clock.t += 0.25
        w.output(f"line {i}\r\n".encode())
    return w


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def test_sealed_cast_verifies_and_is_asciicast_v2(tmp_path: Path) -> None:
    cast = tmp_path / "a.cast"
    w = write_cast(cast)
    w.resize(100, 30)
    w.marker("blocked: no-drop-database")
    w.input("ls\n")
    manifest = w.close()
    header = json.loads(read_lines(cast)[0])
    assert header["version"] == 2 and header["width"] == 80 and header["height"] == 24
    events = [json.loads(line) for line in read_lines(cast)[1:]]
    assert [e[1] for e in events[-3:]] == ["r", "m", "i"]
    assert events[-3][2] == "100x30"
    times = [e[0] for e in events]
    assert times == sorted(times)
    assert manifest["lines"] == 24
    report = verify_cast(cast, KEY.public)
    assert report.verdict is Verdict.INTACT, report.line()
    assert cast.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("tamper", "verdict", "line"),
    [
        ("change_byte", Verdict.TAMPERED, 6),
        ("delete_line", Verdict.TAMPERED, 6),
        ("swap_lines", Verdict.TAMPERED, 6),
        ("truncate", Verdict.TRUNCATED, None),
        ("truncate_mid_line", Verdict.TRUNCATED, None),
        ("append", Verdict.TAMPERED, 22),
    ],
)
def test_verify_names_first_bad_line(
    tmp_path: Path, tamper: str, verdict: Verdict, line: int | None
) -> None:
    cast = tmp_path / "a.cast"
    write_cast(cast).close()
    lines = read_lines(cast)
    if tamper == "change_byte":
        lines[5] = lines[5].replace(b"line 4", b"line 5")
    elif tamper == "delete_line":
        del lines[5]
    elif tamper == "swap_lines":
        lines[5], lines[6] = lines[6], lines[5]
    elif tamper == "truncate":
        lines = lines[:10]
    elif tamper == "append":
        lines.append(lines[-1])
    data = b"\n".join(lines) + b"\n"
    if tamper == "truncate_mid_line":
        data = data[:-7]
    cast.write_bytes(data)
    report = verify_cast(cast, KEY.public)
    assert report.verdict is verdict, report.line()
    if line is not None:
        assert report.first_bad_line == line
        assert f"line {line}" in report.message
    assert report.verdict.exit_code == 1


def test_wrong_signature_and_wrong_key(tmp_path: Path) -> None:
    cast = tmp_path / "a.cast"
    write_cast(cast).close()
    other = SigningKey.generate()
    assert verify_cast(cast, other.public).verdict is Verdict.TAMPERED
    man = json.loads(manifest_path(cast).read_text())
    man["session_id"] = "someone-else"
    manifest_path(cast).write_text(json.dumps(man))
    report = verify_cast(cast, KEY.public)
    assert report.verdict is Verdict.TAMPERED and "signature" in report.message


def test_rewritten_chain_file_is_caught(tmp_path: Path) -> None:
    cast = tmp_path / "a.cast"
    write_cast(cast).close()
    chain = bytearray(chain_path(cast).read_bytes())
    chain[-1] ^= 1
    chain_path(cast).write_bytes(bytes(chain))
    assert verify_cast(cast, KEY.public).verdict is Verdict.TAMPERED


def test_unsealed_cast_is_reported_not_garbage(tmp_path: Path) -> None:
    cast = tmp_path / "a.cast"
    w = write_cast(cast)
    w.sync()
    w.abort()
    report = verify_cast(cast, KEY.public)
    assert report.verdict is Verdict.UNSEALED
    assert report.lines == 21
    # A torn last line, as a kill in the middle of a write leaves it.
    cast.write_bytes(cast.read_bytes() + b'[5.0, "o", "par')
    report = verify_cast(cast, KEY.public)
    assert report.verdict is Verdict.TRUNCATED and "torn" in report.message


def test_unreadable(tmp_path: Path) -> None:
    assert verify_cast(tmp_path / "missing.cast").verdict is Verdict.UNREADABLE
    (tmp_path / "x.cast").write_text("hello\n")
    assert verify_cast(tmp_path / "x.cast").verdict.exit_code == 2


def test_checkpoints_at_fsync(tmp_path: Path) -> None:
    seen: list[tuple[int, str]] = []
    clock = FakeClock()
    w = CastWriter(
        tmp_path / "a.cast",
        width=80,
        height=24,
        session_id="s",
        signing_key=KEY,
        fsync_interval=1.0,
        on_checkpoint=lambda n, h: seen.append((n, h)),
        clock=clock,
    )
    for _ in range(10):
        clock.t += 0.3
        w.output(b"x")
    # Header + 10 events, 0.3 s apart: fsyncs at 1.2 s (line 5) and 2.4 s (line 9).
    assert [n for n, _ in seen] == [5, 9]
    w.close()
    assert [n for n, _ in seen] == [5, 9, 11]
    assert seen[-1][1] == w.chain_hash


def test_invalid_utf8_and_cut_characters_become_valid_events(tmp_path: Path) -> None:
    enc = EventEncoder()
    snow = "☃".encode()
    line = enc.encode(1.0, "o", b"a" + snow[:1])
    assert line is not None and json.loads(line) == [1.0, "o", "a"]
    line = enc.encode(2.0, "o", snow[1:] + b"\xff")
    assert line is not None and json.loads(line) == [2.0, "o", "☃\ufffd"]
    # Timestamps never go backwards.
    line = enc.encode(1.5, "o", b"z")
    assert line is not None and json.loads(line) == [2.0, "o", "z"]


def test_closed_writer_refuses(tmp_path: Path) -> None:
    w = write_cast(tmp_path / "a.cast", events=1)
    w.close()
    with pytest.raises(RecordingError):
        w.output(b"late")


def test_existing_cast_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "a.cast").write_text("keep")
    with pytest.raises(RecordingError, match="cannot create"):
        write_cast(tmp_path / "a.cast")
    assert (tmp_path / "a.cast").read_text() == "keep"


def test_session_recorder_masks_output_and_input(tmp_path: Path) -> None:
    pan = luhn_complete("411111111111111")
    w = write_cast(tmp_path / "a.cast", events=0)
    seen: list[bytes] = []
    rec = SessionRecorder(w, Masker(), input_mode="commands", on_output=seen.append)
    sent = rec.output(f"card {pan}\r\n".encode())
    rec.input(f"echo {pan}\r".encode())
    rec.input(b"secret\r", echo=False)
    rec.input(b"lsx\x7f\r")
    rec.close()
    masked = f"{pan[:6]}******{pan[-4:]}"
    assert sent == f"card {masked}\r\n".encode() and seen == [sent]
    events = [json.loads(x) for x in read_lines(tmp_path / "a.cast")[1:]]
    assert ["i", f"echo {masked}\n"] in [e[1:] for e in events]
    assert ["m", HIDDEN_MARKER] in [e[1:] for e in events]
    assert ["i", "ls\n"] in [e[1:] for e in events]
    assert pan not in (tmp_path / "a.cast").read_text()
    assert rec.counts["pan"] == 2


def test_session_recorder_records_where_custom_secrets_were_shown(tmp_path: Path) -> None:
    key = "sk_live_" + "Ab3dEf6hIj9lMn2pQr5tUv8x"
    masker = Masker(MaskPolicy(patterns=(CustomPattern("stripe-key", r"sk_live_[A-Za-z0-9]{24}"),)))
    w = write_cast(tmp_path / "a.cast", events=0)
    rec = SessionRecorder(w, masker, input_mode="commands")
    rec.input(f"echo {key}\r".encode())  # typed by the agent: not something it was shown
    rec.output(b"plain\r\n")
    rec.output(f"got {key} and {key}\r\n".encode())
    rec.output(f"err {key}\r\n".encode(), "err")
    rec.close()
    lines = read_lines(tmp_path / "a.cast")
    assert rec.counts["stripe-key"] == 4  # the typed one counts as masked, not as shown
    assert [(p["detector"], p["count"]) for p in rec.secrets_shown] == [
        ("stripe-key", 2),
        ("stripe-key", 1),
    ]
    stars = "*" * len(key)
    events = [json.loads(lines[p["line"] - 1]) for p in rec.secrets_shown]  # lines count from 1
    assert [e[1:] for e in events] == [
        ["o", f"got {stars} and {stars}\r\n"],
        ["o", f"err {stars}\r\n"],
    ]
    assert [e[0] for e in events] == pytest.approx([p["t"] for p in rec.secrets_shown], abs=1e-3)
    manifest = json.loads(manifest_path(tmp_path / "a.cast").read_text())
    assert manifest["secrets_shown"] == rec.secrets_shown
    assert key not in (tmp_path / "a.cast").read_text()


def test_secret_positions_are_bounded(tmp_path: Path) -> None:
    key = "sk_live_" + "Ab3dEf6hIj9lMn2pQr5tUv8x"
    masker = Masker(MaskPolicy(patterns=(CustomPattern("stripe-key", r"sk_live_[A-Za-z0-9]{24}"),)))
    rec = SessionRecorder(write_cast(tmp_path / "a.cast", events=0), masker)
    for _ in range(MAX_SECRET_POSITIONS + 5):
        rec.output(f"{key}\r\n".encode())
    rec.close()
    assert len(rec.secrets_shown) == MAX_SECRET_POSITIONS and rec.secrets_shown_dropped == 5
    manifest = json.loads(manifest_path(tmp_path / "a.cast").read_text())
    assert manifest["secrets_shown_dropped"] == 5


def test_threaded_writer_seals_the_same_verifiable_cast(tmp_path: Path) -> None:
    seen: list[tuple[int, str]] = []
    w = CastWriter(
        tmp_path / "t.cast",
        width=80,
        height=24,
        session_id="t",
        signing_key=KEY,
        fsync_interval=0.0,
        on_checkpoint=lambda n, h: seen.append((n, h)),
        threaded=True,
    )
    for i in range(5000):
        w.output(f"line {i}\r\n".encode())
    w.marker("end of test")
    manifest = w.close()
    assert manifest["lines"] == 5002 == w.lines
    assert verify_cast(tmp_path / "t.cast", KEY.public).verdict is Verdict.INTACT
    assert seen and seen[-1] == (5002, manifest["final_hash"])
    lines = read_lines(tmp_path / "t.cast")
    lines[100] = lines[100].replace(b"line 99", b"line 77")
    (tmp_path / "t.cast").write_bytes(b"\n".join(lines) + b"\n")
    report = verify_cast(tmp_path / "t.cast", KEY.public)
    assert report.verdict is Verdict.TAMPERED and report.first_bad_line == 101


def test_nul_bytes_are_counted_not_written(tmp_path: Path) -> None:
    w = CastWriter(tmp_path / "n.cast", width=80, height=24, session_id="n", signing_key=KEY)
    w.output(b"\x00" * 4096)  # all NUL: no event at all
    w.output(b"ab\x00c\x00\x00d\r\n")
    manifest = w.close()
    events = [json.loads(line) for line in read_lines(tmp_path / "n.cast")[1:]]
    assert [e[2] for e in events if e[1] == "o"] == ["abcd\r\n"]
    assert b"\\u0000" not in (tmp_path / "n.cast").read_bytes()
    assert manifest["nul_bytes"] == 4096 + 3 and w.bytes_out == 4096 + 9
    assert verify_cast(tmp_path / "n.cast", KEY.public).verdict is Verdict.INTACT


def test_pool_serves_many_threaded_writers_in_order(tmp_path: Path) -> None:
    writers = [
        CastWriter(
            tmp_path / f"w{i}.cast",
            width=80,
            height=24,
            session_id=f"w{i}",
            signing_key=KEY,
            threaded=True,
        )
        for i in range(40)
    ]
    for n in range(300):
        for i, w in enumerate(writers):
            w.output(f"{i}:{n}\r\n".encode())
    for i, w in enumerate(writers):
        w.close()
        out = [json.loads(line)[2] for line in read_lines(tmp_path / f"w{i}.cast")[1:]]
        assert out == [f"{i}:{n}\r\n" for n in range(300)]
        assert verify_cast(tmp_path / f"w{i}.cast", KEY.public).verdict is Verdict.INTACT


def test_pool_encoded_events_match_events_encoded_in_the_caller(tmp_path: Path) -> None:
    """Threaded, the pool thread makes the JSON of each event: lines, line counts and
    hashes are those of a writer that encodes in the caller, cut characters and a
    character cut at the very end included."""
    snow = "☃".encode()
    chunks = [b"a" + snow[:1], snow[1:2], snow[2:] + b'\xff"\\\r\n', b"\x00" * 100, b"\x00x"]
    chunks += [f"row {i}\t\x1b[1m{i}\x1b[0m\r\n".encode() for i in range(2000)] + [snow[:2]]
    results = []
    for threaded in (False, True):
        clock = FakeClock()
        path = tmp_path / f"{threaded}.cast"
        w = CastWriter(
            path,
            width=80,
            height=24,
            session_id="p",
            signing_key=KEY,
            clock=clock,
            threaded=threaded,
        )
        for i, chunk in enumerate(chunks):
            clock.t += 0.001
            w.output(chunk)
            if i % 500 == 0:
                w.marker(f"marker {i}")
                w.input("ls\n")
                w.resize(100 + i % 7, 30)
        lines_before_close = w.lines
        manifest = w.close()
        assert verify_cast(path, KEY.public).verdict is Verdict.INTACT
        results.append(
            (read_lines(path)[1:], lines_before_close, manifest["lines"], manifest["nul_bytes"])
        )
        assert manifest["final_hash"] == w.chain_hash
    assert results[0] == results[1]
    out = [e[2] for e in map(json.loads, results[1][0]) if e[1] == "o"]
    assert out[:3] == ["a", '☃\ufffd"\\\r\n', "x"] and out[-1] == "\ufffd"
    assert results[1][3] == 101


def test_an_error_in_the_pool_fails_one_recording_and_the_thread_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from recorder.asciicast import event_line as real
    from recorder.writerpool import shared_pool

    def flaky(t: float, code: str, data: str) -> bytes:
        if data == "boom":
            raise RuntimeError("encoder exploded")
        return real(t, code, data)

    monkeypatch.setattr("recorder.recording.event_line", flaky)
    errors: list[str] = []
    failed = threading.Event()

    def on_error(message: str) -> None:
        errors.append(message)
        failed.set()

    pool = shared_pool()
    writers = []
    for name in ("bad", "good"):
        w = CastWriter(
            tmp_path / f"{name}.cast",
            width=80,
            height=24,
            session_id=name,
            signing_key=KEY,
            threaded=True,
            on_error=on_error if name == "bad" else None,
        )
        w._worker = pool._workers[0]  # the same pool thread for both
        writers.append(w)
    bad, good = writers
    bad.marker("boom")
    assert failed.wait(30)
    assert "encoder exploded" in errors[0]
    bad.output(b"dropped after the failure\r\n")  # reported: dropped, not raised
    for i in range(100):
        good.output(f"still served {i}\r\n".encode())
    good.close()
    assert verify_cast(tmp_path / "good.cast", KEY.public).verdict is Verdict.INTACT
    with pytest.raises(RecordingError, match="encoder exploded"):
        bad.close()
    # Bad's cast stays unsealed: verifiable up to its header.
    assert verify_cast(tmp_path / "bad.cast", KEY.public).verdict is not Verdict.INTACT


def test_lone_surrogates_become_replacement_characters() -> None:
    from recorder.asciicast import event_line

    line = event_line(1.0, "m", "blocked: rm \udcff\udc80 -rf")
    assert json.loads(line) == [1.0, "m", "blocked: rm \ufffd\ufffd -rf"]
