"""Fuzzing the DataRow masking path of the PostgreSQL relay: for any row the server
sends, text-format masking keeps every length (the frame length never changes), no
test card number survives in a text value, and a malformed row is a ProtocolError, never
an IndexError or struct.error or a row with shifted values."""

from __future__ import annotations

import re
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder.masking import CustomPattern, Masker, MaskPolicy
from relay.pg import protocol as p
from relay.pg.rows import RowMasker

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PANS = [b"4111111111111111", b"5555555555554444", b"378282246310005"]
TEXT_OIDS = [25, 1043]
# int8, int4, jsonb, bytea, numeric, float8, int8[], record
OIDS = [*TEXT_OIDS, 20, 23, 3802, 17, 1700, 701, 1016, 2249]
NUMBERS = (20, 1700, 701)


MASKER = Masker(MaskPolicy(patterns=[CustomPattern("key", "sk_live_[A-Za-z0-9]{24}")]))


def session(
    fields: list[p.Field] | None, masked: list[bool] | None, masker: Masker = MASKER
) -> RowMasker:
    """The relay's masker for rows of this shape (None: shape unknown, content only)."""
    if fields is None:
        return RowMasker(masker)
    return RowMasker(
        masker,
        masked or [False] * len(fields),
        [f.format for f in fields],
        [f.type_oid for f in fields],
    )


pad = st.text(alphabet="ghxyz ,;:!|\t\u00e9", max_size=8).map(str.encode)
value = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.sampled_from(PANS),
    # Not glued to other digits or hex: a PAN inside a longer digit run or a hex string
    # is a documented non-match (README, Masking).
    st.builds(lambda a, pan, b: a + pan + b, pad, st.sampled_from(PANS), pad),
    st.builds(
        lambda pan: b"paid with " + pan[:4] + b" " + pan[4:8] + b" " + pan[8:],
        st.sampled_from(PANS),
    ),
    st.just(b"sk_live_" + b"A" * 24),
    st.sampled_from([struct.pack("!q", 4111111111111111), struct.pack("!q", 7)]),
    # numeric 4111111111111111 and 12.5, float8 4111111111111111.0, int8[] {pan, 7}
    st.sampled_from(
        [
            struct.pack("!hhHh4h", 4, 3, 0, 0, 4111, 1111, 1111, 1111),
            struct.pack("!hhHh2h", 2, 0, 0, 1, 12, 5000),
            struct.pack("!d", 4111111111111111.0),
            struct.pack("!iiIii", 1, 0, 20, 2, 1)
            + struct.pack("!iq", 8, 4111111111111111)
            + struct.pack("!iq", 8, 7),
        ]
    ),
)


def standalone(pan: bytes, data: bytes) -> bool:
    """``pan`` occurs in ``data`` not glued to other digits or hex letters (a PAN inside
    a longer digit run or a hex string is a documented non-match: README, Masking)."""
    return re.search(rb"(?<![0-9A-Fa-f])" + pan + rb"(?![0-9A-Fa-f])", data) is not None


@st.composite
def rows(draw: st.DrawFn) -> tuple[list[bytes | None], list[p.Field] | None, list[bool]]:
    values = draw(st.lists(value, max_size=8))
    if draw(st.booleans()):
        return values, None, []
    n = draw(st.integers(min_value=0, max_value=len(values) + 1))
    fields = [
        p.Field(f"c{i}", 1000, i + 1, draw(st.sampled_from(OIDS)), draw(st.sampled_from([0, 1])))
        for i in range(n)
    ]
    masked = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return values, fields, masked


@FAST
@given(row=rows())
def test_masking_a_row_keeps_lengths_and_hides_card_numbers(
    row: tuple[list[bytes | None], list[p.Field] | None, list[bool]],
) -> None:
    values, fields, masked = row
    body = p.data_row(values)[5:]
    out = session(fields, masked).mask_row(body)
    got = p.parse_data_row(out)
    assert len(got) == len(values)
    all_text = fields is None or all(
        f.format == 0 and f.type_oid not in NUMBERS and f.type_oid != 1016 for f in fields
    )
    if all_text:
        assert len(out) == len(body)  # the frame length never changes
    for i, (before, after) in enumerate(zip(values, got, strict=True)):
        field = fields[i] if fields is not None and i < len(fields) else None
        if before is None:
            assert after is None
            continue
        if (
            field is not None
            and field.format == 0
            and field.type_oid in (*NUMBERS, 1016)
            and not masked[i]
        ):
            # A text-format number the masker would star is no number: NULL (in an
            # array, the element).
            if after is not None:
                for pan in PANS:
                    assert not standalone(pan, after)
            continue
        if field is not None and field.format == 1 and field.type_oid not in TEXT_OIDS:
            # Binary values of other types are decoded by type: one that holds a card
            # number, or is not laid out as its type says and holds a match, is NULL.
            if after is not None:
                for pan in PANS:
                    assert not standalone(pan, after)
                if after != before:
                    assert len(after) == len(before)
            continue
        if field is not None and field.format == 1 and masked[i]:
            assert after is not None and len(after) == len(before)  # text in binary: starred
        assert after is not None and len(after) == len(before)
        for pan in PANS:
            assert not standalone(pan, after)
        assert b"sk_live_" + b"A" * 24 not in after


@FAST
@given(
    row=rows(),
    cut=st.integers(min_value=0, max_value=1000),
    junk=st.binary(max_size=12),
)
def test_a_malformed_row_is_refused_or_passed_through_unchanged(
    row: tuple[list[bytes | None], list[p.Field] | None, list[bool]], cut: int, junk: bytes
) -> None:
    values, fields, masked = row
    body = p.data_row(values)[5:]
    bad = body[: cut % (len(body) + 1)] + junk
    try:
        out = session(fields, masked).mask_row(bad)
    except p.ProtocolError as exc:
        assert "DataRow" in str(exc)
        return
    # Accepted: either untouched (nothing to mask, forwarded as the server sent it) or
    # a row of the same length in which no test card number survives.
    assert len(out) == len(bad) or any(f.format == 1 for f in fields or [])
    if out != bad and all(f.format == 0 for f in fields or []):
        # (binary values of non-text types are not masked by design; bytes after the
        # last value are no value at all)
        for value in p.parse_data_row(out):
            for pan in PANS:
                assert value is None or not standalone(pan, value)


def test_a_value_length_past_the_body_is_a_protocol_error() -> None:
    body = struct.pack("!hi", 1, 100) + b"4111111111111111 and then the row ends"
    for fields in (None, [p.Field("pan", 1000, 1, 25, 0)]):
        try:
            session(fields, [True] if fields else None).mask_row(body)
        except p.ProtocolError:
            continue
        raise AssertionError("a row whose value runs past its end was masked")
