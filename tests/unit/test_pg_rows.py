"""DataRow runs (relay/pg/rows.py): masking a run as one block gives exactly what
masking each row alone gives, counts included, for any rows and result shape; the
decoder's runs hold exactly the messages ``feed`` would yield, however the stream is cut."""

from __future__ import annotations

import struct
from collections import Counter
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.adapt import Transformer
from psycopg.pq import Format
from psycopg.types.numeric import NumericBinaryDumper

from recorder.masking import CustomPattern, Masker, MaskPolicy
from relay.pg import protocol as p
from relay.pg.rows import RowMasker, luhn_digits, row_bodies
from relay.pg.values import CopyBinaryMasker
from tests.unit.test_fuzz_pg_masking import OIDS, PANS, value

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY = "sk_live_[A-Za-z0-9]{24}"
MASKERS = {
    # A literal-led, anchor-free pattern: the block path.
    "block": Masker(MaskPolicy(patterns=[CustomPattern("key", KEY)])),
    # An anchored pattern cannot be scanned across values: every row alone.
    "anchored": Masker(MaskPolicy(patterns=[CustomPattern("key", "^" + KEY)])),
    "full": Masker(MaskPolicy(style="full")),
}


@st.composite
def results(draw: st.DrawFn) -> tuple[list[p.Field] | None, list[bool], list[list[bytes | None]]]:
    width = draw(st.integers(min_value=0, max_value=5))
    fields: list[p.Field] | None = None
    masked: list[bool] = []
    if draw(st.booleans()):
        n = draw(st.integers(min_value=0, max_value=width + 1))
        fields = [
            p.Field(
                f"c{i}", 1000, i + 1, draw(st.sampled_from(OIDS)), draw(st.sampled_from([0, 1]))
            )
            for i in range(n)
        ]
        masked = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    # Rows of the run usually share the width; now and then one does not.
    row = st.lists(value, min_size=width, max_size=width) | st.lists(value, max_size=6)
    return fields, masked, draw(st.lists(row, max_size=12))


def masker_for(name: str, fields: list[p.Field] | None, masked: list[bool]) -> RowMasker:
    m = MASKERS[name]
    if fields is None:
        return RowMasker(m, full=name == "full")
    return RowMasker(
        m, masked, [f.format for f in fields], [f.type_oid for f in fields], full=name == "full"
    )


@FAST
@given(result=results(), name=st.sampled_from(sorted(MASKERS)))
def test_a_run_is_masked_exactly_like_its_rows_one_by_one(
    result: tuple[list[p.Field] | None, list[bool], list[list[bytes | None]]], name: str
) -> None:
    fields, masked, rows = result
    rm = masker_for(name, fields, masked)
    raw = b"".join(p.data_row(r) for r in rows)
    one_by_one: Counter[str] = Counter()
    expected = b"".join(p.message(b"D", rm.mask_row(p.data_row(r)[5:], one_by_one)) for r in rows)
    as_run: Counter[str] = Counter()
    # As the decoder hands it over (with row offsets), and bare.
    run = next(iter(p.MessageDecoder().feed_runs(raw)), None) if rows else p.RowRun(b"", 0)
    assert isinstance(run, p.RowRun)
    assert rm.mask_run(run, as_run) == expected
    assert rm.mask_run(p.RowRun(raw, len(rows))) == expected
    assert +as_run == +one_by_one


def test_a_masked_column_keeps_bin6_last4_and_the_rest_is_untouched() -> None:
    rm = RowMasker(MASKERS["block"], [False, True, False], [0, 0, 0], [23, 25, 25])
    rows: list[list[bytes | None]] = [
        [b"1", b"4111111111111111", b"ok"],
        [b"2", b"4111111111111112", None],  # not Luhn-valid: hidden whole
        [b"3", b"card 5555555555554444", b"note 378282246310005"],
        [b"4", None, b"sk_live_" + b"B" * 24],
    ]
    counts: Counter[str] = Counter()
    out = rm.mask_run(p.RowRun(b"".join(p.data_row(r) for r in rows), 4), counts)
    got = [p.parse_data_row(b) for b in row_bodies(out, 10)]
    assert got == [
        [b"1", b"411111******1111", b"ok"],
        [b"2", b"****************", None],
        [b"3", b"card 555555******4444", b"note 378282*****0005"],
        [b"4", None, b"*" * 32],
    ]
    assert counts["mask_columns"] == 3
    assert counts["pan"] == 3  # two in the masked column, one in the note
    assert counts["key"] == 1


@pytest.mark.parametrize("name", sorted(MASKERS))
def test_a_malformed_row_in_a_run_is_a_protocol_error(name: str) -> None:
    fields = [p.Field("pan", 1000, 1, 25, 0)]
    good = p.data_row([b"4111111111111111"])
    # The value claims 100 bytes; the row holds 16.
    body = struct.pack("!hi", 1, 100) + b"4111111111111111"
    bad = p.message(b"D", body)
    with pytest.raises(p.ProtocolError, match="DataRow"):
        masker_for(name, fields, [True]).mask_run(p.RowRun(good + bad, 2))


def test_luhn_of_digit_strings() -> None:
    for pan in PANS:
        assert luhn_digits(pan)
        assert not luhn_digits(pan[:-1] + bytes([48 + (pan[-1] - 47) % 10]))


def messages(stream: bytes, cuts: list[int], runs: bool) -> list[tuple[bytes, bytes]]:
    dec = p.MessageDecoder()
    out: list[tuple[bytes, bytes]] = []
    prev = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        chunk, prev = stream[prev:cut], cut
        for m in dec.feed_runs(chunk) if runs else dec.feed(chunk):
            if isinstance(m, p.RowRun):
                assert m.starts == RowMasker._starts(m.raw)
                bodies = row_bodies(m.raw, m.nrows)
                assert len(bodies) == m.nrows
                out.extend((b"D", b) for b in bodies)
            else:
                out.append((m.type, m.body))
    return out


@FAST
@given(
    msgs=st.lists(
        st.tuples(st.sampled_from([b"D", b"D", b"D", b"T", b"C", b"Z"]), st.binary(max_size=30)),
        max_size=20,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
)
def test_runs_hold_the_messages_feed_yields(
    msgs: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(p.message(t, b) for t, b in msgs)
    assert messages(stream, cuts, runs=True) == messages(stream, cuts, runs=False) == msgs


def test_a_match_that_starts_in_one_row_does_not_hide_the_next_rows_own() -> None:
    # In the block, "A" at the end of row 1 starts a match that runs through row 2's
    # header into its "A12B", so the scan reports one span over both rows: row 2 must
    # still be masked on its own.
    rm = RowMasker(Masker(MaskPolicy(patterns=[CustomPattern("ab", "A[^!]{0,20}B")])))
    rows = [[b"xA"], [b"A12B"]]
    raw = b"".join(p.data_row(r) for r in rows)
    assert len(rm.masker.hit_spans(raw)) == 1
    out = rm.mask_run(p.RowRun(raw, 2))
    assert [p.parse_data_row(b) for b in row_bodies(out, 2)] == [[b"xA"], [b"****"]]


def test_odd_rows_in_a_run_are_masked_like_rows_alone() -> None:
    rm = RowMasker(MASKERS["block"], [False, True], [0, 0], [25, 25])
    # One field declared, then bytes that would read as a second field holding a card
    # number: not a value (the row alone leaves them), so neither does the run.
    trailing = p.message(b"D", struct.pack("!hi", 1, 1) + b"x" + struct.pack("!i", 16) + PANS[0])
    # Shaped like a card number but not digits: hidden whole, counted once.
    letters = p.data_row([b"1", b"abcdefghijklmnop"])
    counts: Counter[str] = Counter()
    out = rm.mask_run(p.RowRun(trailing + letters, 2), counts)
    assert out == trailing + p.data_row([b"1", b"*" * 16])
    assert counts == Counter({"mask_columns": 1})


def test_a_card_number_as_a_binary_bigint_becomes_null_in_a_row_with_few_digits() -> None:
    # Eight binary bytes hold no 13-digit run: the row must still be looked at.
    pan = struct.pack("!q", int(PANS[0]))
    rm = RowMasker(MASKERS["block"], [False, False], [1, 0], [20, 25])
    for masked in (
        rm.mask_row(p.data_row([pan, b"x"])[5:]),
        rm.mask_run(p.RowRun(p.data_row([pan, b"x"]), 1))[5:],
    ):
        assert p.parse_data_row(masked) == [None, b"x"]
    ordinary = struct.pack("!q", 42)
    assert rm.mask_row(p.data_row([ordinary, b"x"])[5:]) == p.data_row([ordinary, b"x"])[5:]


# -- binary values by type (relay/pg/values.py) ------------------------------------------

PAN = PANS[0]
MASKED_PAN = PAN[:6] + b"*" * (len(PAN) - 10) + PAN[-4:]
_TX = Transformer()


def _one(oid: int, v: bytes, masked: bool = False, fmt: int = 1) -> bytes | None:
    """One value through a one-column shape, by the row path and by a long run (the
    numpy path) alike."""
    rm = RowMasker(MASKERS["block"], [masked], [fmt], [oid])
    by_row = p.parse_data_row(rm.mask_row(p.data_row([v])[5:]))[0]
    run = p.data_row([v]) * 20
    (msg,) = list(p.MessageDecoder().feed_runs(run))
    assert isinstance(msg, p.RowRun)
    assert rm.mask_run(msg) == p.data_row([by_row]) * 20
    return by_row


def test_a_mask_columns_text_column_in_binary_is_starred_in_place_not_null() -> None:
    for oid in (25, 1043, 1042, 19):
        assert _one(oid, b"abc-123-xyz", masked=True) == b"***-***-***"
        assert _one(oid, PAN, masked=True) == MASKED_PAN
    # json stays JSON; other types cannot hold stars: NULL
    assert _one(114, b'{"a": 1}', masked=True) == b'"******"'
    assert _one(3802, b'\x01{"a": 1}', masked=True) == b'\x01"******"'
    assert _one(20, struct.pack("!q", 7), masked=True) is None


def test_binary_numbers_holding_a_card_number_become_null_and_others_pass() -> None:
    num = NumericBinaryDumper(Decimal).dump
    cases = {
        20: (struct.pack("!q", int(PAN)), struct.pack("!q", -int(PAN)), struct.pack("!q", 10**15)),
        790: (struct.pack("!q", int(PAN)), None, struct.pack("!q", 12345)),
        701: (struct.pack("!d", float(PAN)), None, struct.pack("!d", 1e15 + 0.5)),
        1700: (
            bytes(num(Decimal(PAN.decode()))),
            bytes(num(Decimal(PAN.decode() + ".25"))),
            bytes(num(Decimal("123456789012345678.5"))),
        ),
    }
    for oid, (pan, other_pan, plain) in cases.items():
        assert _one(oid, pan) is None, oid
        if other_pan is not None:
            assert _one(oid, other_pan) is None, oid
        assert _one(oid, plain) == plain, oid  # byte for byte
    # A card number in the fraction is one too (the text masker would star it).
    assert _one(1700, bytes(num(Decimal("0." + PAN.decode())))) is None


def test_arrays_records_and_ranges_are_walked_and_re_encoded() -> None:
    arr = (
        struct.pack("!iiIii", 1, 0, 20, 2, 1)
        + struct.pack("!iq", 8, int(PAN))
        + struct.pack("!iq", 8, 7)
    )
    out = _one(1016, arr)
    assert out is not None and _TX.get_loader(1016, Format.BINARY).load(out) == [None, 7]
    assert out[4:8] == struct.pack("!i", 1)  # the has-nulls flag
    texts = struct.pack("!iiIii", 1, 0, 25, 1, 1) + struct.pack("!i", 20) + b"pan " + PAN
    out = _one(1009, texts)
    assert out == texts.replace(PAN, MASKED_PAN)  # in place, same length
    rec = struct.pack("!i", 2) + struct.pack("!Ii", 1016, len(arr)) + arr
    rec += struct.pack("!Ii", 25, len(PAN)) + PAN
    out = _one(2249, rec)
    assert out is not None
    assert _TX.get_loader(2249, Format.BINARY).load(out) == ([None, 7], MASKED_PAN.decode())
    # A composite type arrives by its own OID: recognised by the record layout.
    assert _one(91234, rec) == out
    rng = b"\x02" + struct.pack("!iq", 8, int(PAN)) + struct.pack("!iq", 8, int(PAN) + 10)
    assert _one(3926, rng) is None  # int8range: a bound cannot be NULL
    plain_rng = b"\x02" + struct.pack("!iq", 8, 1) + struct.pack("!iq", 8, 5)
    assert _one(3926, plain_rng) == plain_rng


def test_text_format_values_the_text_scan_cannot_read() -> None:
    hexed = b"\\x" + (b"card " + PAN).hex().encode()
    assert _one(17, hexed, fmt=0) == b"\\x" + (b"card " + MASKED_PAN).hex().encode()
    assert _one(20, PAN, fmt=0) is None  # stars are no bigint
    assert _one(1016, b"{" + PAN + b",7}", fmt=0) == b"{NULL,7}"
    assert _one(25, PAN, fmt=0) == MASKED_PAN
    js = b'{"n": ' + PAN + b"}"
    assert _one(114, js, fmt=0) == b'{"n": "' + MASKED_PAN + b'"}'
    assert _one(114, b'{"n": 7}', fmt=0) == b'{"n": 7}'


def test_a_binary_copy_stream_is_masked_field_by_field_across_messages() -> None:
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
    num = bytes(NumericBinaryDumper(Decimal).dump(Decimal(PAN.decode())))
    row = struct.pack("!h", 3) + struct.pack("!i", len(PAN)) + PAN
    row += struct.pack("!i", len(num)) + num + struct.pack("!i", -1)
    plain = struct.pack("!h", 1) + struct.pack("!i", 5) + b"hello"
    stream = header + row + plain + struct.pack("!h", -1)
    want = (
        header
        + (
            struct.pack("!h", 3)
            + struct.pack("!i", len(PAN))
            + MASKED_PAN
            + struct.pack("!ii", -1, -1)
        )
        + plain
        + struct.pack("!h", -1)
    )
    for cut in range(0, len(stream), 3):
        cm = CopyBinaryMasker(MASKERS["block"])
        got = cm.feed(stream[:cut]) + cm.feed(stream[cut:]) + cm.finish()
        assert got == want, cut


def test_an_unknown_type_is_text_unless_it_has_a_binary_layout() -> None:
    # An enum or citext value is its text: masked in place. Bytes with a NUL in them
    # are some layout we do not know (hstore, say): NULL rather than starred.
    assert _one(91235, b"paid " + PAN) == b"paid " + MASKED_PAN
    hstore = struct.pack("!ii", 1, 3) + b"pan" + struct.pack("!i", 16) + PAN
    assert _one(91236, hstore) is None
    plain = struct.pack("!ii", 1, 1) + b"k" + struct.pack("!i", 1) + b"v"
    assert _one(91236, plain) == plain


@pytest.mark.parametrize("name", sorted(MASKERS))
def test_full_width_card_numbers_in_rows_are_masked(name: str) -> None:
    # Sixteen full-width digits are 48 bytes and not one ASCII digit: a prefilter that
    # counts ASCII digits let them through.
    wide = "4111111111111111".translate({c: c - 0x30 + 0xFF10 for c in range(0x30, 0x3A)})
    rm = RowMasker(MASKERS[name], [False, False], [0, 0], [25, 25])
    rows: list[list[bytes | None]] = [[b"1", wide.encode()]] * 3
    out = rm.mask_run(p.RowRun(b"".join(p.data_row(r) for r in rows), 3))
    for body in row_bodies(out, 10):
        cell = p.parse_data_row(body)[1]
        assert cell is not None and cell != wide.encode()
        assert len(cell) == len(wide.encode())
    single = rm.mask_row(p.data_row([b"1", wide.encode()])[5:])
    assert wide.encode() not in single
