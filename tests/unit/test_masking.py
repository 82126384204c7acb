"""The streaming masker: property tests over PANs, separators, ANSI and chunking."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder.masking import CustomPattern, Masker, MaskPolicy, luhn_complete, luhn_valid

MASKER = Masker()
FULL = Masker(MaskPolicy(style="full"))
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")
SGR = st.sampled_from(
    [b"\x1b[0m", b"\x1b[1m", b"\x1b[31m", b"\x1b[38;5;196m", b"\x1b[48;2;10;20;30m", b"\x1b[2;4m"]
)
CONTEXT = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Nd"), blacklist_characters="\x1b", max_codepoint=0x1F600
    ),
    max_size=30,
).map(lambda s: s.encode())


def stream_mask(masker: Masker, data: bytes, cuts: list[int]) -> bytes:
    s = masker.stream()
    out = bytearray()
    prev = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += s.feed(data[prev:cut])
        prev = cut
    out += s.flush()
    return bytes(out)


@st.composite
def pans(draw: st.DrawFn) -> str:
    length = draw(st.integers(13, 19))
    body = draw(st.text(alphabet="0123456789", min_size=length - 1, max_size=length - 1))
    return luhn_complete(body)


@st.composite
def formatted(draw: st.DrawFn, pan: str) -> bytes:
    """The PAN in a separator style (none, groups of four with spaces or dashes, or the
    4-6-rest layout of 14- and 15-digit cards) with SGR sequences between any digits."""
    style = draw(st.sampled_from(["none", "space4", "dash4", "4-6-rest"]))
    sep = draw(st.sampled_from([b" ", b"-"]))
    cuts = {4, 10} if style == "4-6-rest" and len(pan) <= 16 else set(range(4, len(pan), 4))
    if len(pan) - max(cuts) < 3:
        cuts.discard(max(cuts))  # no trailing group of one or two digits
    out = bytearray()
    for i, d in enumerate(pan):
        if i:
            if style == "space4" and i in cuts:
                out += b" "
            elif style == "dash4" and i in cuts:
                out += b"-"
            elif style == "4-6-rest" and i in cuts:
                out += sep
            if draw(st.integers(0, 4)) == 0:
                out += draw(SGR)
        out += d.encode()
    return bytes(out)


def visible_digits(data: bytes) -> bytes:
    return re.sub(rb"[ \-]", b"", ANSI.sub(b"", data))


def assert_no_raw_run(pan: str, output: bytes) -> None:
    flat = visible_digits(output)
    for i in range(len(pan) - 12):
        assert pan[i : i + 13].encode() not in flat, (pan, output)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_pan_any_format_any_chunking_is_masked(data: st.DataObject) -> None:
    pan = data.draw(pans())
    body = data.draw(formatted(pan))
    before, after = data.draw(CONTEXT), data.draw(CONTEXT)
    stream = before + body + after
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    out = stream_mask(MASKER, stream, cuts)
    assert_no_raw_run(pan, out)
    # Same length and only digits turned into '*': the display width cannot change.
    assert len(out) == len(stream)
    for a, b in zip(stream, out, strict=True):
        assert a == b or (chr(a).isdigit() and b == ord("*"))
    # bin6-last4 exactly: the first six and last four digits stay.
    flat = visible_digits(out[len(before) : len(before) + len(body)])
    assert flat == (pan[:6] + "*" * (len(pan) - 10) + pan[-4:]).encode()


@settings(max_examples=150)
@given(data=st.data())
def test_full_style_hides_every_digit(data: st.DataObject) -> None:
    pan = data.draw(pans())
    body = data.draw(formatted(pan))
    out = stream_mask(FULL, b"x " + body + b" y", data.draw(st.lists(st.integers(0, 40))))
    assert visible_digits(out) == b"x" + b"*" * len(pan) + b"y"


@settings(max_examples=300)
@given(
    digits=st.text(alphabet="0123456789", min_size=13, max_size=19),
    sep=st.sampled_from(["", " ", "-"]),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_luhn_invalid_numbers_pass_byte_identical(digits: str, sep: str, cuts: list[int]) -> None:
    if luhn_valid(digits):
        digits = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    assert not luhn_valid(digits)
    grouped = sep.join(digits[i : i + 4] for i in range(0, len(digits), 4)) if sep else digits
    if sep and len(digits) > 16:
        grouped = digits  # sub-ranges of 4-digit groups could be valid by themselves
    data = f"id {grouped} end\r\n".encode()
    assert stream_mask(MASKER, data, cuts) == data


ORDINARY = [
    b"2026-11-27T11:56:01.123456Z INFO started pid=4242\n",
    b"Fri Nov 27 11:56:01 UTC 2026\n",
    b"550e8400-e29b-41d4-a716-446655440000 9f1c2d3e-0000-4000-8000-123456789abc\n",
    b"inet 192.168.100.200/24 brd 192.168.100.255 scope global eth0\n",
    b"inet6 fe80::1c2d:3eff:fe4f:5a6b/64 scope link\n",
    b"\x1b[01;34mdrwxr-xr-x\x1b[0m  2 root root  4096 Nov 27 11:55 \x1b[01;34mbin\x1b[0m\n",
    b"-rw-r--r--  1 root root 12345678 Nov 27 11:55 data.bin\n",
    b"root      1234  0.0  0.1 167000 12000 ?  Ss   11:55   0:01 /sbin/init\n",
    b"\x1b[33mcommit 3f9c21a7b0e4d5c6f7a8b9c0d1e2f3a4b5c6d7e8\x1b[m\nDate:   Fri Nov 27 11:56:01 2026 +0000\n",
    b"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n",
    b"1732712345 1732712346 rows=100000 bytes=1048576\n",
    "naïve café 日本語 ✓ 🚀 — 12:34\n".encode(),
    # df, top -b, a psql table, TSV and paste output, versions, dates, IPs.
    b"Filesystem     1K-blocks     Used Available Use% Mounted on\n"
    b"/dev/sda1      102687672 45213312  52216964  47% /\n",
    b"  PID USER      PR  NI    VIRT    RES    SHR S  %CPU  %MEM     TIME+ COMMAND\n"
    b" 1234 root      20   0  167000  12000   8000 S   0.0   0.1   0:01.23 systemd\n",
    b"  id  |  amount  |     created_at\n------+----------+---------------------\n"
    b" 1001 |  1234.56 | 2026-11-27 11:56:01\n 1002 |  7890.12 | 2026-11-27 11:56:02\n(2 rows)\n",
    b"1001\t2026-11-27\t10.1.2.3\t1234.50\t42\n1002\t2026-11-28\t10.1.2.4\t99.00\t7\n",
    b"1000\t1001\t1002\t1003\t1004\t1005\n1006\t1007\t1008\t1009\t1010\t1011\n",
    b"1000  1001  1002  1003  1004\n2000  2001  2002  2003  2004  2005\n",
    b"4096\t./src\n123456\t./data\n1234567890\t.\n",
    b"Python 3.11.7 (main, May  9 2026) [GCC 12.2.0] openssl 3.0.13 v1.2.3.4.5.6.7.8\n",
    b"27/11/2026 11:56:01 2026/11/27 11/27/26 27.11.2026 2026.11.27\n",
    b"10.0.0.1 192.168.100.200 172.16.254.1 255.255.255.0 2001:db8::1\n",
]


@pytest.mark.parametrize("line", ORDINARY)
def test_ordinary_output_is_byte_identical(line: bytes) -> None:
    for size in (1, 3, 7, len(line)):
        cuts = list(range(size, len(line), size))
        assert stream_mask(MASKER, line, cuts) == line


def test_number_columns_are_not_card_numbers() -> None:
    # ps vsz/rss columns joined by single spaces once made a Luhn-valid 13-digit run.
    line = b"postgres 32258 32173  3.1  0.5 219216 147356 ?       Ss   12:45:06 00:00:12\n"
    assert MASKER.mask_bytes(line) == line
    amex = luhn_complete("37828224631000")
    spaced = f"{amex[:4]} {amex[4:10]} {amex[10:]}".encode()
    assert MASKER.mask_bytes(spaced) != spaced


def test_real_ls_ps_git_log_output_is_byte_identical(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@e", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    for i in range(5):
        (repo / f"f{i}.txt").write_text(f"line {i}\n" * (i + 1))
        subprocess.run(["git", "-C", str(repo), "add", "."], check=True, env=env)
        subprocess.run(["git", "-C", str(repo), "commit", "-qm", f"c{i}"], check=True, env=env)
    outputs = [
        subprocess.run(["ls", "-la", "--color=always", "/usr/bin"], capture_output=True).stdout,
        # No command lines: other tests running at the same time pass test card numbers
        # as arguments, and those are rightly masked.
        subprocess.run(
            ["ps", "-eo", "user,pid,ppid,pcpu,pmem,vsz,rss,tty,stat,start,time"],
            capture_output=True,
        ).stdout,
        subprocess.run(
            ["git", "-C", str(repo), "log", "--stat", "--color=always"],
            capture_output=True,
            env=env,
        ).stdout,
    ]
    for out in outputs:
        assert len(out) > 200
        assert stream_mask(MASKER, out, list(range(0, len(out), 1000))) == out


def test_real_paste_tsv_and_df_output_is_byte_identical(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for i in range(30):
        (tree / f"d{i}").mkdir(parents=True)
        (tree / f"d{i}" / "f").write_bytes(b"x" * (i * 1000))

    def sh(cmd: str) -> bytes:
        return subprocess.run(["/bin/bash", "-c", cmd], capture_output=True, check=True).stdout

    outputs = [
        sh("seq 1 3000 | paste - - - - - -"),
        sh("paste <(seq 1 400) <(seq 1000 1399) <(seq 20260101 20260500) <(seq 7 406)"),
        sh("seq 10000 10999 | paste -d' ' - - - -"),
        sh("seq 1000 9999 | paste -sd' '"),
        sh("seq 1000 1999 | paste -sd'-'"),
        sh("head -c 4096 /dev/zero | tr '\\0' 7 | od -An -tx2"),
        subprocess.run(["du", "-ab", str(tree)], capture_output=True).stdout,
        subprocess.run(["df", "-kP"], capture_output=True).stdout,
        subprocess.run(["df", "-h"], capture_output=True).stdout,
    ]
    for out in outputs:
        assert len(out) > 40
        assert stream_mask(MASKER, out, list(range(0, len(out), 777))) == out


def test_track_data_is_masked_whole() -> None:
    visa = luhn_complete("411111111111111")
    t2 = f";{visa}=25121010000000000000?".encode()
    t1 = f"%B{visa}^DOE/JOHN^2512101000000000000000?".encode()
    counts: Counter[str] = Counter()
    for data in (t2, t1):
        out = stream_mask(MASKER, b"reader: " + data + b"\r\n", list(range(0, 80, 5)))
        assert b"2512" not in out and b"DOE" not in out
        assert visa[:6].encode() in out and visa[-4:].encode() in out
    MASKER.mask_bytes(t2 + b" " + t1, counts)
    assert counts == Counter(track=2)


def test_custom_pattern_and_counts() -> None:
    m = Masker(MaskPolicy(patterns=[CustomPattern("stripe-key", "sk_live_[A-Za-z0-9]{24}")]))
    key = b"sk_" + b"live_" + b"A" * 24
    data = b"key=" + key + b" pan " + luhn_complete("555555555555444").encode() + b"\n"
    s = m.stream()
    out = b"".join(s.feed(data[i : i + 2]) for i in range(0, len(data), 2)) + s.flush()
    assert key not in out and out.count(b"*") == len(key) + 6
    assert s.counts == Counter({"stripe-key": 1, "pan": 1})


def test_only_a_possible_match_is_held_back() -> None:
    s = MASKER.stream()
    assert s.feed(b"$ ls\r\nfile.txt\r\n") == b"$ ls\r\nfile.txt\r\n"
    assert s.pending == 0
    # Digits at the end could be the start of a PAN: held until more data or flush.
    assert s.feed(b"order 4111 1111") == b"order "
    assert s.pending == len(b"4111 1111")
    assert s.flush() == b"4111 1111"
    assert s.pending == 0


def test_pan_cut_inside_multibyte_neighbours() -> None:
    pan = luhn_complete("510510510510510")
    data = f"é{pan}€".encode()
    for cut in range(1, len(data)):
        out = stream_mask(MASKER, data, [cut])
        assert out.decode() == f"é{pan[:6]}******{pan[-4:]}€"


def test_long_digit_runs_are_not_windows_of_pans() -> None:
    pan = luhn_complete("411111111111111")
    data = f"id=9{pan}9 tx 12345678901234567890123456789\n".encode()
    assert MASKER.mask_bytes(data) == data


def test_pan_followed_by_more_numbers_is_still_found() -> None:
    pan = luhn_complete("411111111111111")
    spaced = " ".join(pan[i : i + 4] for i in range(0, 16, 4))
    out = MASKER.mask_bytes(f"card {spaced} 12/26 cvv 123".encode())
    assert out == f"card {pan[:4]} {pan[4:6]}** **** {pan[-4:]} 12/26 cvv 123".encode()


def test_mask_text_for_plain_strings() -> None:
    pan = luhn_complete("37828224631000")
    assert MASKER.mask(f"SELECT * FROM cards WHERE pan = '{pan}'") == (
        f"SELECT * FROM cards WHERE pan = '{pan[:6]}*****{pan[-4:]}'"
    )
    assert MASKER.mask("no secrets here") == "no secrets here"


def test_bad_custom_pattern_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="pattern"):
        Masker(MaskPolicy(patterns=[CustomPattern("x", "(unclosed")]))


def test_hashes_and_uuids_holding_luhn_valid_runs_pass() -> None:
    run = luhn_complete("346009123924073654")  # 19 digits, Luhn-valid
    sha = f"fbb2b305b34ad38bc8fc{run}a".encode()
    assert len(sha) == 40
    block = luhn_complete("71630615141066")[3:]  # 'a716-' + 12 digits: 15 Luhn-valid digits
    uuid = f"550e8400-e29b-41d4-a{luhn_complete('71630615141066')[:3]}-{block}".encode()
    data = b"commit " + sha + b"\r\nrequest id=" + uuid + b" ok\r\n"
    assert MASKER.mask_bytes(data) == data
    for cut in range(0, len(data), 3):
        assert stream_mask(MASKER, data, [cut]) == data
    # The same digits standing alone are a card number.
    assert MASKER.mask_bytes(f"pan {run}".encode()) != f"pan {run}".encode()


# Pieces that build streams where the fast paths matter: digit-free runs (zeros, text),
# card numbers, track data, a custom secret and the fragments of each.
_STRIPE = Masker(MaskPolicy(patterns=[CustomPattern("stripe-key", "sk_live_[A-Za-z0-9]{24}")]))
_PIECES = st.sampled_from(
    [
        b"\x00" * 64,
        b"plain text, no digits\r\n",
        b"sk_",
        b"live_",
        b"sk_live_" + b"Ab" * 12,
        b"ssss",
        b"\x1b[31m",
        b" ",
        b"-",
        b"=",
        b"^",
        b"%B",
        luhn_complete("411111111111111").encode(),
        luhn_complete("555555555555444").encode()[:7],
        b"12345678\n",
        b"2512101",
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_paths_release_what_the_full_scan_releases(data: st.DataObject) -> None:
    """Chunks without digits skip the RE2 scan, and custom patterns whose literal cannot
    occur skip theirs: what is released, when, and the counts stay those of the full scan."""
    import recorder.masking as masking

    stream = b"".join(data.draw(st.lists(_PIECES, max_size=24)))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=10))))

    def run() -> tuple[list[bytes], Counter[str]]:
        s = _STRIPE.stream()
        out, prev = [], 0
        for cut in [*cuts, len(stream)]:
            out.append(s.feed(stream[prev:cut]))
            prev = cut
        out.append(s.flush())
        return out, s.counts

    fast = run()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(masking, "_has_digit", lambda buf: True)
        m.setattr(masking, "_custom_possible", lambda masker, buf: True)
        full = run()
    assert fast == full
    assert len(b"".join(fast[0])) == len(stream)


def test_digit_free_stream_still_masks_a_custom_secret_cut_anywhere() -> None:
    key = b"sk_" + b"live_" + b"Zzy" * 8
    data = b"\x00" * 100 + b"token " + key + b" end\r\n" + b"\x00" * 100
    for cut in range(1, len(data)):
        out = stream_mask(_STRIPE, data, [cut])
        assert key not in out and out.count(b"*") == len(key)


def test_a_number_typed_slower_than_the_deadline_is_echoed_as_typed_until_it_completes() -> None:
    pan = luhn_complete("411111111111111")
    s = MASKER.stream()
    echoed = []
    for ch in f"pay {pan}\r\n".encode():
        echoed.append(s.feed(bytes([ch])) + s.flush())  # the deadline passes each time
    # Each key is echoed at once (nothing stays held past a deadline).
    assert all(len(e) == 1 for e in echoed)
    out = b"".join(echoed).decode()
    # Digits are echoed as typed until one completes a card number whose middle already
    # went out: from then on they are masked, so the whole number is never on screen.
    assert out.startswith(f"pay {pan[:12]}") and out.endswith("\r\n")
    assert pan not in out and out[16:20].count("*") >= 1 and out[-3] == "*"
    # Typed within the deadline the same number is masked exactly.
    s = MASKER.stream()
    fast = b"".join(s.feed(bytes([ch])) for ch in f"pay {pan}\r\n".encode()) + s.flush()
    assert fast.decode() == f"pay {pan[:6]}******{pan[-4:]}\r\n"
