"""Fuzzing the asciicast reader (replay/castfile.py) and ``verify``
(recorder/integrity.py) with mutated real casts: bit flips, truncation, garbage lines,
huge lines, invalid UTF-8 and wrong JSON types in the header and the events. The reader
either reads events (finite, never decreasing times, string data) or raises
CastFormatError; verify always returns a verdict, and never INTACT for a changed file."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from recorder.integrity import Verdict, chain_path, manifest_path, verify_cast
from recorder.recording import CastWriter
from recorder.signing import SigningKey
from replay.castfile import MAX_SIZE, CastFile, CastFormatError, parse_size

# `scratch` is reused across examples on purpose: every example overwrites its files.
FAST = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
KEY = SigningKey.generate()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def write_cast(path: Path) -> None:
    """A real sealed cast: output with colours, wide characters and invalid UTF-8 (the
    writer turns it into U+FFFD), a resize, a marker, input."""
    clock = Clock()
    w = CastWriter(path, width=80, height=24, session_id="fuzz", signing_key=KEY, clock=clock)
    for i, chunk in enumerate(
        [
            b"$ ls\r\n",
            b"\x1b[31mred\x1b[0m \xe4\xb8\xad\xe6\x96\x87 \xff\xfe bad utf-8\r\n",
            b"\xe2\x82",  # a character cut by the chunk boundary ...
            b"\xac done\r\n",  # ... completed by the next chunk
        ]
    ):
        clock.t += 0.1 * (i + 1)
        w.output(chunk)
    clock.t += 0.5
    w.resize(100, 30)
    w.marker("blocked: no-rm-rf")
    w.input("rm -rf /\r")
    clock.t += 0.25
    w.output(b"bye\r\n")
    w.close("closed", {"exit_status": 0})


@pytest.fixture(scope="module")
def real_cast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real") / "s.cast"
    write_cast(path)
    assert verify_cast(path).verdict is Verdict.INTACT
    return path


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def copy(real: Path, where: Path) -> Path:
    """A fresh copy of the cast and its sidecars (one per example)."""
    where.mkdir(parents=True, exist_ok=True)
    dst = where / real.name
    for src in (real, chain_path(real), manifest_path(real)):
        shutil.copyfile(src, where / src.name)
    return dst


def read_all(path: Path) -> None:
    """Read a cast whole through the reader; assert the reader's promises."""
    try:
        cast = CastFile(path)
        events = list(cast.events())
    except CastFormatError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    h = cast.header
    assert 1 <= h.width <= MAX_SIZE and 1 <= h.height <= MAX_SIZE
    last = 0.0
    for _, ev in events:
        assert isinstance(ev.code, str) and isinstance(ev.data, str)
        assert last <= ev.time < float("inf")
        last = ev.time
        if ev.code == "r":
            size = parse_size(ev.data)
            assert size is None or max(size) <= MAX_SIZE


def check_verify(path: Path, changed: bool) -> None:
    report = verify_cast(path)
    assert isinstance(report.verdict, Verdict)
    assert report.message and "\n" not in report.line()
    if changed:
        assert report.verdict is not Verdict.INTACT, report.line()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
garbage_lines = st.one_of(
    st.binary(max_size=200).filter(lambda b: b"\n" not in b),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(json_values, min_size=1, max_size=4).map(lambda v: json.dumps(v).encode()),
    st.sampled_from(
        [
            b'[1e999, "o", "x"]',  # infinity: stdlib json reads it, orjson refuses
            b'[Infinity, "o", "x"]',
            b'[NaN, "o", "x"]',
            b'[1.5, "o", "\xff\xfe"]',  # invalid UTF-8 inside a string
            b'[1.5, 7, "x"]',
            b'["1.5", "o", {"a": 1}]',
            b'[1.5, "r", "65535x65535"]',
            b'[1.5, "r", "4294967295x-1"]',
            b"[" * 5000 + b"]" * 5000,  # nesting deeper than any recursion limit
            b'"123"',
            b'[1e308, "o", "x"]',
            b'[1.5, "o", "' + b"A" * (2 << 20) + b'"]',  # a 2 MiB line
        ]
    ),
)


@FAST
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), min_size=1, max_size=4),
    which=st.sampled_from(["cast", "chain", "manifest"]),
)
def test_bit_flips(
    real_cast: Path, scratch: Path, flips: list[tuple[int, int]], which: str
) -> None:
    path = copy(real_cast, scratch)
    target = {"cast": path, "chain": chain_path(path), "manifest": manifest_path(path)}[which]
    data = bytearray(target.read_bytes())
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    target.write_bytes(bytes(data))
    changed = (
        bytes(data)
        != (
            {
                "cast": real_cast,
                "chain": chain_path(real_cast),
                "manifest": manifest_path(real_cast),
            }[which]
        ).read_bytes()
    )
    read_all(path)
    check_verify(path, changed)


@FAST
@given(cut=st.integers(min_value=0), tail=st.sampled_from([b"", b"\n", b"\xff", b'[0.1, "o']))
def test_truncation(real_cast: Path, scratch: Path, cut: int, tail: bytes) -> None:
    path = copy(real_cast, scratch)
    data = path.read_bytes()
    new = data[: cut % (len(data) + 1)] + tail
    path.write_bytes(new)
    read_all(path)
    check_verify(path, new != data)


@FAST
@given(
    where=st.integers(min_value=0),
    line=garbage_lines,
    replace=st.booleans(),
    drop=st.sampled_from([(), ("chain",), ("chain", "manifest")]),
)
def test_garbage_lines(
    real_cast: Path, scratch: Path, where: int, line: bytes, replace: bool, drop: tuple[str, ...]
) -> None:
    path = copy(real_cast, scratch)
    # Without the sidecars verify parses every line instead of stopping at the first
    # one that breaks the chain.
    if "chain" in drop:
        chain_path(path).unlink()
    if "manifest" in drop:
        manifest_path(path).unlink()
    lines = path.read_bytes().split(b"\n")[:-1]
    i = where % (len(lines) + 1)
    if replace and i < len(lines):
        lines[i] = line
    else:
        lines.insert(i, line)
    new = b"\n".join(lines) + b"\n"
    assume(new != real_cast.read_bytes())
    path.write_bytes(new)
    read_all(path)
    check_verify(path, True)


header_values = st.one_of(
    json_values, st.sampled_from([0, -1, 65535, 2**31, 2**64, 1e300, "80", [80], {"cols": 80}])
)


@FAST
@given(
    fields=st.dictionaries(
        st.sampled_from(
            [
                "version",
                "width",
                "height",
                "timestamp",
                "env",
                "title",
                "term",
                "duration",
                "idle_time_limit",
                "theme",
            ]
        ),
        header_values,
        max_size=6,
    ),
    version=st.sampled_from([None, 1, 2, 3, "2", 2.0, True]),
)
def test_wrong_types_in_the_header(
    real_cast: Path, scratch: Path, fields: dict[str, object], version: object
) -> None:
    path = copy(real_cast, scratch)
    lines = path.read_bytes().split(b"\n")
    header = json.loads(lines[0])
    header.update(fields)
    if version is not None:
        header["version"] = version
    lines[0] = json.dumps(header).encode()
    new = b"\n".join(lines)
    path.write_bytes(new)
    read_all(path)
    check_verify(path, new != real_cast.read_bytes())


@FAST
@given(doc=json_values, frames=st.lists(st.lists(json_values, max_size=3), max_size=5))
def test_v1_documents_with_wrong_types(scratch: Path, doc: object, frames: list[object]) -> None:
    path = scratch / "v1.cast"
    body: dict[str, object] = {"version": 1, "width": 80, "height": 24, "stdout": frames}
    if isinstance(doc, dict):
        body.update(doc)
        body["version"] = 1
    path.write_text(json.dumps(body))
    read_all(path)


def test_absurd_sizes_are_refused_or_ignored(scratch: Path) -> None:
    path = scratch / "big.cast"
    path.write_text('{"version": 2, "width": 65535, "height": 65535}\n[0.1, "o", "x"]\n')
    with pytest.raises(CastFormatError, match="too large"):
        CastFile(path)
    assert parse_size("65535x65535") is None and parse_size(f"{MAX_SIZE}x{MAX_SIZE}") is not None


def test_not_a_regular_file_is_refused_without_reading_it(scratch: Path) -> None:
    import os

    fifo = scratch / "fifo.cast"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(CastFormatError, match="not a regular file"):
        CastFile(fifo)
    with pytest.raises(CastFormatError, match="not a regular file"):
        CastFile(Path("/dev/zero"))
    assert verify_cast(fifo).verdict is Verdict.UNREADABLE


@pytest.mark.parametrize(
    "line",
    [b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"[1e999, 1e999]"],
    ids=["deep-array", "deep-object", "infinity"],
)
@pytest.mark.parametrize("where", ["header", "event", "manifest"])
def test_verify_on_pathological_json(
    real_cast: Path, scratch: Path, line: bytes, where: str
) -> None:
    path = copy(real_cast, scratch)
    if where == "manifest":
        manifest_path(path).write_bytes(line)
    else:
        lines = path.read_bytes().split(b"\n")
        lines[0 if where == "header" else 2] = line
        path.write_bytes(b"\n".join(lines))
        chain_path(path).unlink()
    report = verify_cast(path)
    assert report.verdict in (Verdict.TAMPERED, Verdict.UNREADABLE), report.line()
    read_all(path)


@pytest.mark.parametrize("value", ["12", None, [], {}, 1e300, -1, "Infinity", 2**70, True])
@pytest.mark.parametrize(
    "key",
    ["lines", "final_hash", "file_sha256", "chain_sha256", "public_key", "signature", "key_id"],
)
def test_verify_on_wrong_types_in_the_manifest(
    real_cast: Path, scratch: Path, key: str, value: object
) -> None:
    path = copy(real_cast, scratch)
    manifest = json.loads(manifest_path(path).read_bytes())
    manifest[key] = value
    text = json.dumps(manifest).replace('"Infinity"', "Infinity")
    manifest_path(path).write_text(text)
    report = verify_cast(path)
    assert report.verdict is Verdict.TAMPERED, report.line()
