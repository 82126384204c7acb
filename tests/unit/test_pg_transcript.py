"""The psql-like transcript of a PostgreSQL session: tables drawn as psql draws them."""

from __future__ import annotations

import struct

from relay.pg import protocol as p
from relay.pg.transcript import Bound, Transcript


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


def test_control_characters_are_escaped_as_psql_escapes_them() -> None:
    tr = Transcript("appdb")
    tr.columns(("a\r\nappdb=> DROP TABLE x", "v"), (0, 0))
    tr.add_rows(_rows((b"\x1b[2Jgone", "tab\there \u202eevil \x9b31m".encode())), 1)
    drawn = tr.complete("SELECT 1", 0.1)
    assert "\r\nappdb=>" not in drawn and "\x1b" not in drawn and "\u202e" not in drawn
    assert "a\\r\\nappdb=> DROP TABLE x" in drawn and "\\x1B[2Jgone" in drawn
    assert "tab     here" in drawn and "\\u202E" in drawn
    # A statement keeps its lines, behind the continuation prompt; CR and ESC escaped.
    assert tr.query("SELECT 1\nappdb=> fake\r\x1b[2J") == (
        "appdb=> SELECT 1\r\nappdb-> appdb=> fake\\r\\x1B[2J\r\n"
    )
    assert tr.error("ERROR", "boom\nappdb=> fake\x1b[2J", "d\x07") == (
        "ERROR:  boom\r\n  appdb=> fake\\x1B[2J\r\nDETAIL:  d\\x07\r\n"
    )
    # Positive control: ordinary text (accents, CJK, emoji) is drawn as it is.
    tr.columns(("name",), (0,))
    tr.add_rows(_rows(("héllo 世界 🙂".encode(),)), 1)
    assert " héllo 世界 🙂" in tr.complete("SELECT 1", 0.1)


def test_binary_results_are_drawn_decoded_by_type() -> None:
    tr = Transcript("appdb")
    arr = struct.pack("!iiIii", 1, 1, 20, 2, 1) + struct.pack("!i", -1) + struct.pack("!iq", 8, 7)
    num = struct.pack("!hhHh2h", 2, 0, 0, 2, 12, 5000)
    rec = struct.pack("!i", 2) + struct.pack("!Ii", 25, 2) + b"ab" + struct.pack("!Ii", 23, 4)
    rec += struct.pack("!i", 9)
    tr.columns(("n", "i", "a", "r", "t", "b"), (1,) * 6, (1700, 20, 1016, 2249, 25, 16))
    tr.add_rows(_rows((num, struct.pack("!q", 42), arr, rec, b"text", b"\x01")), 1)
    drawn = tr.complete("SELECT 1", 0.1)
    assert " 12.50 | 42 | {NULL,7} | (ab,9) | text | t" in drawn


def test_bound_parameters_are_drawn_masked_with_their_statement() -> None:
    tr = Transcript("appdb")
    pan = b"4111111111111111"
    bind = b"\0stmt\0" + struct.pack("!hhhh", 3, 0, 1, 0) + struct.pack("!h", 3)
    bind += struct.pack("!i", 2) + b"42"
    bind += struct.pack("!i", 8) + struct.pack("!q", int(pan))
    bind += struct.pack("!i", -1) + struct.pack("!h", 0)
    drawn = tr.query(Bound("SELECT $1, $2, $3", bind, (23, 20, 25)))
    assert drawn == (
        "appdb=> SELECT $1, $2, $3\r\nParameters: $1 = '42', $2 = '411111******1111', $3 = NULL\r\n"
    )
    # Without parameters, only the statement.
    empty = b"\0stmt\0" + struct.pack("!hhh", 0, 0, 0)
    assert tr.query(Bound("SELECT 1", empty, ())) == "appdb=> SELECT 1\r\n"
