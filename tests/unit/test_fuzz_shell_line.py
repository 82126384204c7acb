"""Fuzzing the echoed-line model (relay/shell_line.py) with hostile shell output: any
bytes (escape sequences with absurd parameters, unterminated strings, invalid UTF-8)
are taken without an exception, memory stays bounded, and how the output is cut into
chunks never changes the command line the model reads. Giant lines cost linear time."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.shell_line import _MAX_CELLS, KeyReader, ShellLine, StdinScript, TypedLine

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

tokens = st.one_of(
    st.text(alphabet="abc xyz-/|", min_size=1, max_size=12).map(str.encode),
    st.sampled_from(
        [
            b"\r",
            b"\n",
            b"\r\n",
            b"\b",
            b"\t",
            b"\x07",
            b"\x7f",
            "中文é".encode(),
            b"\xff\xfe",  # invalid UTF-8
            b"\xe4\xb8",  # a character cut short
            b"\x1b",
            b"\x1b[",
            b"\x1b[0m",
            b"\x1b[31;1m",
            b"\x1b[K",
            b"\x1b[1K",
            b"\x1b[2K",
            b"\x1b[J",
            b"\x1b[2J",
            b"\x1b[H",
            b"\x1b[5;5f",
            b"\x1b[?2004h",
            b"\x1b(B",
            b"\x1b7",
            b"\x1b8",
            b"\x1bM",
            b"\x1bE",
            b"\x1b]0;a title\x07",
            b"\x1b]52;c;cm0gLXJmIC8=\x1b\\",
            b"\x1b]0;title with\r\nCRLF\x07",
            b"\x1b]0;" + b"t" * 100 + b"\x07",  # longer than any chunk cut below
            b"\x1bP+q544e\x1b\\",
            b"\x1b_apc\x1b\\",
            b"\x1b]8;;http://x/\x07",  # unterminated until the next token says otherwise
            b"\x9d52;c;QQ==\x9c",
        ]
    ),
    st.builds(
        lambda n, final: f"\x1b[{n}{final}".encode(),
        st.sampled_from([0, 1, 2, 7, 80, 65535, 99999999, 10**40]),
        st.sampled_from(list("ABCDGKJP@Hm")),
    ),
)
streams = st.lists(tokens, max_size=25).map(b"".join)
cuts = st.lists(st.integers(min_value=0, max_value=4000), max_size=12)


def chunked(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    out, last = [], 0
    for c in [*marks, len(data)]:
        out.append(data[last:c])
        last = c
    return out


def read(width: int, prompt: list[bytes], echo: list[bytes]) -> tuple[str | None, ShellLine]:
    line = ShellLine(width)
    for piece in prompt:
        line.feed(piece)
        assert len(line._cells) <= _MAX_CELLS
    line.mark_input_start()
    for piece in echo:
        line.feed(piece)
        assert len(line._cells) <= _MAX_CELLS
    return line.submitted(), line


@FAST
@given(
    width=st.sampled_from([1, 5, 20, 80, 1000, 65535]),
    prompt=streams,
    echo=streams,
    cut_prompt=cuts,
    cut_echo=cuts,
)
def test_chunking_never_changes_the_line_read(
    width: int, prompt: bytes, echo: bytes, cut_prompt: list[int], cut_echo: list[int]
) -> None:
    whole, _ = read(width, [prompt], [echo])
    pieces, _ = read(width, chunked(prompt, cut_prompt), chunked(echo, cut_echo))
    assert pieces == whole
    one_byte, _ = read(width, [bytes([b]) for b in prompt], [bytes([b]) for b in echo])
    assert one_byte == whole


@FAST
@given(data=st.binary(max_size=400), width=st.integers(min_value=-5, max_value=70000))
def test_arbitrary_bytes_never_raise(data: bytes, width: int) -> None:
    line = ShellLine(width)
    line.feed(data)
    line.mark_input_start()
    line.feed(data)
    line.resize(width // 2)
    line.feed(data)
    result = line.submitted()
    assert result is None or isinstance(result, str)
    typed = TypedLine()
    typed.feed(data)
    assert isinstance(typed.take()[0], str)


def test_absurd_csi_parameters_allocate_nothing() -> None:
    line = ShellLine(80)
    line.feed(b"$ ")
    line.mark_input_start()
    line.feed(b"ls\x1b[999999999@\x1b[" + b"9" * 5000 + b"@\x1b[" + b"9" * 5000 + b"P")
    assert len(line._cells) <= 80
    assert line.submitted() is not None


def test_a_10_mb_line_is_taken_in_bulk_and_a_command_that_long_is_unreadable() -> None:
    big = b"x" * (10 << 20)
    line = ShellLine(80)
    for i in range(0, len(big), 32768):
        line.feed(big[i : i + 32768])  # outside a command: only the last row is kept
    assert len(line._cells) <= 80
    line.feed(b"\r\n$ ")
    line.mark_input_start()
    for i in range(0, len(big), 32768):
        line.feed(big[i : i + 32768])
    assert len(line._cells) <= _MAX_CELLS
    assert line.submitted() is None  # longer than the model keeps: refused, not guessed
    line.feed(b"\r\n$ ")
    line.mark_input_start()
    line.feed(b"uptime")
    assert line.submitted() == "uptime"
    typed = TypedLine()
    typed.feed(big)
    text, reliable = typed.take()
    assert len(text) <= _MAX_CELLS and not reliable


def test_an_escape_string_split_across_chunks_is_skipped_whole() -> None:
    title = b"\x1b]0;" + b"a very long window title " * 10 + b"\x07"
    for cut in (1, 2, 3, 50, len(title) - 1):
        line = ShellLine(80)
        line.feed(b"\r\n" + title[:cut])
        line.feed(title[cut:] + b"$ ")
        line.mark_input_start()
        line.feed(b"\r$ rm -rf /tmp/x")  # readline redraws from column 0
        assert line.submitted() == "rm -rf /tmp/x"


keystrokes = st.lists(
    st.one_of(
        st.text(alphabet="abc -/'\"", min_size=1, max_size=8).map(str.encode),
        st.sampled_from(
            [
                b"\r",
                b"\n",
                b"\x01",
                b"\x03",
                b"\x04",
                b"\x0f",
                b"\x16",
                b"\x18",
                b"\x7f",
                b"\x1b",
                b"\x1b[A",
                b"\x1b[3~",
                b"\x1b[15~",
                b"\x1bOM",
                b"\x1bOA",
                b"\x1bb",
                b"\x1bv",
                b"\x1b\r",
                b"\x1b[200~",
                b"\x1b[201~",
                "é".encode(),
            ]
        ),
    ),
    max_size=30,
).map(b"".join)


def _printable(data: bytes) -> bool:
    return all(b >= 0x20 and b != 0x7F for b in data)


def _keys(reader: KeyReader, pieces: list[bytes]) -> list[tuple[str, bytes, bool]]:
    """The keys read, with runs of printable text that a cut split joined again."""
    out: list[tuple[str, bytes, bool]] = []
    for piece in pieces:
        for key in reader.feed(piece):
            last = out[-1] if out else None
            if (
                last is not None
                and last[0] == key.kind
                and _printable(last[1])
                and _printable(key.data)
            ):
                out[-1] = (key.kind, last[1] + key.data, False)
            else:
                out.append((key.kind, key.data, key.unsure))
    return out


@FAST
@given(keys=keystrokes, cut=cuts)
def test_how_keystrokes_are_cut_never_changes_what_they_may_do(keys: bytes, cut: list[int]) -> None:
    """Keys read whole, in chunks or byte by byte sort the same way; no byte is lost
    (a sequence cut at the end waits) and nothing but CR, LF and keypad Enter is taken
    for a plain submission."""
    whole = _keys(KeyReader(), [keys])
    assert _keys(KeyReader(), chunked(keys, cut)) == whole
    sent = b"".join(data for _, data, _ in whole)
    assert keys.startswith(sent) and len(keys) - len(sent) <= 3
    assert all(data in (b"\r", b"\n", b"\x1bOM") for kind, data, _ in whole if kind == "accept")


@FAST
@given(
    lines=st.lists(
        st.sampled_from(["echo a", "", "echo 'open", "close'", "ls -l", "x" * 30]), max_size=20
    ),
    cut=cuts,
)
def test_how_stdin_is_cut_never_changes_the_units(lines: list[str], cut: list[int]) -> None:
    data = "\n".join(lines).encode()

    def run(pieces: list[bytes]) -> list[tuple[str, bytes]]:
        script = StdinScript()
        units = [u for p in pieces for u in script.feed(p)] + script.finish()
        return [(u.kind, u.data) for u in units]

    whole = run([data])
    assert run(chunked(data, cut)) == whole
    assert b"".join(d for _, d in whole) == data  # every byte in exactly one unit
