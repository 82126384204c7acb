"""Property: for any value of the built-in types an agent reads most (text, varchar, int8,
numeric, bytea, json, jsonb, arrays of them, records of them), in the text and the binary
format, a value holding a test card number reaches neither the client nor the
transcript raw, and a value without one passes byte for byte. The values are encoded
the way the server encodes them (psycopg's binary dumpers for scalars, the array and
record layouts of array_send/record_send, the text forms of the *_out functions) and
the masked bytes are decoded again with psycopg's loaders: what a client would read."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.adapt import Transformer
from psycopg.pq import Format
from psycopg.types.numeric import NumericBinaryDumper

from recorder.masking import Masker
from relay.pg import protocol as p
from relay.pg.rows import RowMasker
from relay.pg.transcript import Transcript

PANS = ["4111111111111111", "5555555555554444", "378282246310005", "4012888888881881"]
MASKER = Masker()
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TEXT, VARCHAR, INT8, NUMERIC, BYTEA, JSON, JSONB, RECORD = 25, 1043, 20, 1700, 17, 114, 3802, 2249
ARRAY_OF = {
    TEXT: 1009,
    VARCHAR: 1015,
    INT8: 1016,
    NUMERIC: 1231,
    BYTEA: 1001,
    JSON: 199,
    JSONB: 3807,
}


@dataclass(frozen=True)
class Val:
    """A value of type ``oid`` in both formats, and whether it holds a card number."""

    oid: int
    text: bytes
    binary: bytes
    pan: bool


# Filler never forms a card number with the digits around it: no digits, no hex letters.
filler = st.text(alphabet="ghijkmnopqrstuvwxyz GHXYZ_:;!?é", max_size=10)
pan = st.sampled_from(PANS)


def _with_pan(draw: st.DrawFn) -> tuple[str, bool]:
    if draw(st.booleans()):
        return draw(filler) + " " + draw(pan) + " " + draw(filler), True
    return draw(filler), False


def _quote_elem(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def leaf(draw: st.DrawFn) -> Val:
    oid = draw(st.sampled_from([TEXT, VARCHAR, INT8, NUMERIC, BYTEA, JSON, JSONB]))
    if oid in (TEXT, VARCHAR):
        s, has = _with_pan(draw)
        return Val(oid, s.encode(), s.encode(), has)
    if oid == INT8:
        if draw(st.booleans()):
            n = int(draw(pan)) * draw(st.sampled_from([1, -1]))
            return Val(oid, str(n).encode(), struct.pack("!q", n), True)
        n = draw(st.integers(min_value=-(10**11), max_value=10**11))
        return Val(oid, str(n).encode(), struct.pack("!q", n), False)
    if oid == NUMERIC:
        if draw(st.booleans()):
            d = Decimal(draw(pan) + draw(st.sampled_from(["", ".5", ".00"])))
            has = True
        else:
            d = Decimal(draw(st.integers(min_value=-(10**11), max_value=10**11))) / 100
            has = False
        return Val(oid, str(d).encode(), bytes(NumericBinaryDumper(Decimal).dump(d)), has)
    if oid == BYTEA:
        s, has = _with_pan(draw)
        raw = s.encode()
        return Val(oid, b"\\x" + raw.hex().encode(), raw, has)
    # json, jsonb: a card number as a string or as a number
    kind = draw(st.sampled_from(["none", "string", "number"]))
    doc: Any
    if kind == "none":
        doc = {"k": draw(filler)}
    elif kind == "string":
        doc = {"k": draw(filler) + " " + draw(pan)}
    else:
        doc = {"k": int(draw(pan))}
    s = json.dumps(doc).encode()
    return Val(oid, s, (b"\x01" + s) if oid == JSONB else s, kind != "none")


@st.composite
def array(draw: st.DrawFn) -> Val:
    elems = draw(st.lists(leaf(), max_size=4))
    elem_oid = elems[0].oid if elems else TEXT
    elems = [e for e in elems if e.oid == elem_oid]
    if elems:
        body = struct.pack("!iiIii", 1, 0, elem_oid, len(elems), 1)
    else:
        body = struct.pack("!iiI", 0, 0, elem_oid)
    for e in elems:
        body += struct.pack("!i", len(e.binary)) + e.binary
    items = []
    for e in elems:
        t = e.text.decode()
        items.append(t if elem_oid in (INT8, NUMERIC) else _quote_elem(t))
    text = ("{" + ",".join(items) + "}").encode()
    return Val(ARRAY_OF[elem_oid], text, body, any(e.pan for e in elems))


@st.composite
def record(draw: st.DrawFn) -> Val:
    fields = draw(st.lists(st.one_of(leaf(), array()), min_size=1, max_size=3))
    body = struct.pack("!i", len(fields))
    for f in fields:
        body += struct.pack("!Ii", f.oid, len(f.binary)) + f.binary
    text = ("(" + ",".join(_quote_elem(f.text.decode()) for f in fields) + ")").encode()
    return Val(RECORD, text, body, any(f.pan for f in fields))


value = st.one_of(leaf(), array(), record())

_TX = Transformer()


def _client_view(oid: int, fmt: int, data: bytes) -> str:
    """What a client reads from a value: psycopg's loaders for binary (which also
    proves the bytes are well formed), the text, and the bytes of any hex it holds."""
    if fmt == 1:
        return repr(_TX.get_loader(oid, Format.BINARY).load(data))
    text = data.decode()
    hexes = re.findall(r"\\x((?:[0-9a-f]{2})+)", text)
    return text + " " + " ".join(bytes.fromhex(h).decode("utf-8", "replace") for h in hexes)


def _raw_pan_in(text: str) -> str | None:
    for number in PANS:
        if re.search(r"(?<![0-9])" + number + r"(?![0-9])", text):
            return number
    return None


@SETTINGS
@given(vals=st.lists(value, min_size=1, max_size=4), fmt=st.sampled_from([0, 1]))
def test_no_raw_card_number_reaches_the_client_or_the_transcript(vals: list[Val], fmt: int) -> None:
    oids = [v.oid for v in vals]
    datas: list[bytes | None] = [v.binary if fmt == 1 else v.text for v in vals]
    body = p.data_row(datas)[5:]
    rows = RowMasker(MASKER, [False] * len(vals), [fmt] * len(vals), oids)
    out = rows.mask_row(body)
    got = p.parse_data_row(out)
    assert len(got) == len(vals)
    for v, before, after in zip(vals, datas, got, strict=True):
        if not v.pan:
            assert after == before  # byte for byte
            continue
        if after is None:
            continue  # a number holding a card number: NULL
        seen = _client_view(v.oid, fmt, after)
        assert _raw_pan_in(seen) is None, (v, after, seen)
    # The run path (a block of rows) gives the same bytes as the row path.
    run = p.message(b"D", body) * 3
    dec = p.MessageDecoder()
    (msg,) = list(dec.feed_runs(run))
    assert rows.mask_run(msg) == p.message(b"D", out) * 3  # type: ignore[arg-type]
    # The transcript draws the masked row decoded: no card number there either.
    tr = Transcript("appdb", masker=MASKER)
    tr.columns(tuple(f"c{i}" for i in range(len(vals))), (fmt,) * len(vals), oids)
    tr.add_rows(p.message(b"D", out), 1)
    drawn = tr.complete("SELECT 1", 0.1)
    assert _raw_pan_in(drawn) is None, drawn


@SETTINGS
@given(v=value)
def test_a_masked_binary_value_is_still_well_formed(v: Val) -> None:
    body = p.data_row([v.binary])[5:]
    out = RowMasker(MASKER, [False], [1], [v.oid]).mask_row(body)
    (after,) = p.parse_data_row(out)
    if after is not None:
        _TX.get_loader(v.oid, Format.BINARY).load(after)  # parses


def test_the_values_strategy_reaches_every_kind() -> None:
    # A positive control for the strategies: the examples above do hold card numbers
    # in every shape (a PAN inside an int8 array inside a record, say).
    arr = struct.pack("!iiIii", 1, 0, INT8, 2, 1)
    arr += struct.pack("!i", 8) + struct.pack("!q", int(PANS[0]))
    arr += struct.pack("!i", 8) + struct.pack("!q", 7)
    rec = struct.pack("!i", 2) + struct.pack("!Ii", 1016, len(arr)) + arr
    rec += struct.pack("!Ii", TEXT, 3) + b"abc"
    out = RowMasker(MASKER, [False], [1], [RECORD]).mask_row(p.data_row([rec])[5:])
    (after,) = p.parse_data_row(out)
    assert after is not None
    loaded = _TX.get_loader(RECORD, Format.BINARY).load(after)
    assert loaded == ([None, 7], "abc")
