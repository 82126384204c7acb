"""The psql-like transcript of a PostgreSQL session: tables drawn as psql draws them."""

from __future__ import annotations

import struct

from relay.pg import protocol as p
from relay.pg.transcript import Transcript


def _rows(*rows: tuple[bytes | None, ...]) -> bytes:
    out = b""
    for values in rows:
        body = struct.pack("!h", len(values))
        for v in values:
            body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
        out += p.message(b"D", body)
    return out


def test_one_column_one_row() -> None:
    tr = Transcript("appdb")
    tr.columns(("abalance",), (0,))
    tr.add_rows(_rows((b"0",)), 1)
    assert tr.complete("SELECT 1", 0.1234) == (
        " abalance\r\n----------\r\n 0       \r\n(1 row)\r\nTime: 0.123 ms\r\n\r\n"
    )


def test_columns_widen_to_their_longest_value_and_nulls_are_blank() -> None:
    tr = Transcript("appdb")
    tr.columns(("id", "holder"), (0, 0))
    tr.add_rows(_rows((b"1", b"a"), (b"1000", None), (b"7", b"a longer name")), 3)
    assert tr.complete("SELECT 3", 2.0) == (
        "  id  |     holder   \r\n"
        "------+---------------\r\n"
        " 1    | a            \r\n"
        " 1000 |              \r\n"
        " 7    | a longer name\r\n"
        "(3 rows)\r\nTime: 2.000 ms\r\n\r\n"
    )


def test_rows_past_the_limit_are_counted_not_drawn() -> None:
    tr = Transcript("appdb", max_rows=2)
    tr.columns(("n",), (0,))
    tr.add_rows(_rows(*[(str(i).encode(),) for i in range(5)]), 5)
    text = tr.complete("SELECT 5", 1.0)
    assert (
        text
        == " n\r\n---\r\n 0\r\n 1\r\n... 3 more rows not drawn\r\n(5 rows)\r\nTime: 1.000 ms\r\n\r\n"
    )


def test_no_rows_binary_values_and_a_command_without_a_table() -> None:
    tr = Transcript("appdb")
    tr.columns(("b",), (1,))
    assert tr.complete("SELECT 0", 0.5).startswith(" b\r\n---\r\n(0 rows)\r\n")
    tr.columns(("b", "u"), (1, 1), (17, 0))
    tr.add_rows(_rows((bytes(range(20)), b"\xff\xfe")), 1)
    drawn = tr.complete("SELECT 1", 0.5)
    assert "\\x" + bytes(range(20)).hex() in drawn  # bytea as psql shows it
    assert "\\xfffe" in drawn  # an unknown type that is not text: hex
    assert tr.complete("INSERT 0 1", 0.25) == "INSERT 0 1\r\nTime: 0.250 ms\r\n\r\n"
    assert tr.query("SELECT 1\nFROM t") == "appdb=> SELECT 1\r\nappdb-> FROM t\r\n"
