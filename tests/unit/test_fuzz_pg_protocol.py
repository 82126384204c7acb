"""Fuzzing the PostgreSQL codec (relay/pg/protocol.py): whatever bytes a peer sends,
the decoders either return exactly the messages that were framed or raise the codec's
own ProtocolError with a one-line message; never IndexError, struct.error,
UnicodeDecodeError or MemoryError, and never more buffered than the size caps allow.
Encoders and body parsers round-trip."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.pg import protocol as p
from relay.pg import sql

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Body parsers by direction, as the relay dispatches them (relay/pg/relay.py).
FRONTEND: dict[bytes, Callable[[bytes], Any]] = {
    b"Q": p.parse_query,
    b"P": p.parse_parse,
    b"B": p.parse_bind,
    b"D": p.parse_describe,
    b"E": p.parse_execute,
    b"F": p.parse_function_call,
}
BACKEND: dict[bytes, Callable[[bytes], Any]] = {
    b"D": p.parse_data_row,
    b"T": p.parse_row_description,
    b"C": p.parse_command_complete,
    b"E": p.parse_fields,
    b"N": p.parse_fields,
    b"V": p.parse_function_result,
    b"A": p.parse_notification,
    b"S": p.parse_parameter_status,
    # (the relay rewrites column names in place)
    b"t": lambda body: p.map_row_description_names(body, bytes.upper),
}

text_no_nul = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)))


def one_line_error(exc: p.ProtocolError) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and len(msg) < 200


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for c in [*points, len(data)]:
        out.append(data[last:c])
        last = c
    return out


messages = st.lists(
    st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=300)), max_size=12
)


@FAST
@given(msgs=messages, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_framed_stream_cut_anywhere_decodes_to_the_same_messages(
    msgs: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(p.message(t, b) for t, b in msgs)
    dec = p.MessageDecoder()
    got = [(m.type, m.body) for piece in chunks(wire, cuts) for m in dec.feed(piece)]
    assert got == msgs
    assert dec.take_rest() == b""
    assert all(p.Message(t, b).raw() == p.message(t, b) for t, b in msgs)


@FAST
@given(
    msgs=messages,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    stop=st.integers(min_value=0, max_value=12),
)
def test_a_caller_that_stops_early_leaves_exactly_the_rest(
    msgs: list[tuple[bytes, bytes]], cuts: list[int], stop: int
) -> None:
    """The password exchange reads one message and hands what follows on: the decoder
    keeps exactly the bytes after the messages taken, however the reads were cut."""
    wire = b"".join(p.message(t, b) for t, b in msgs)
    dec = p.MessageDecoder()
    taken: list[tuple[bytes, bytes]] = []
    fed = 0
    for piece in chunks(wire, cuts):
        fed += len(piece)
        for m in dec.feed(bytearray(piece)):  # not only bytes come in
            assert type(m.body) is bytes
            taken.append((m.type, m.body))
            if len(taken) == stop:
                break
        if len(taken) == stop:
            break
    consumed = sum(5 + len(b) for _, b in taken)
    assert taken == msgs[: len(taken)]
    assert dec.take_rest() == wire[consumed:fed]


@FAST
@given(
    data=st.lists(st.binary(max_size=200), max_size=10),
    cap=st.sampled_from([16, 1024, 65536, p.MAX_MESSAGE]),
)
def test_arbitrary_bytes_give_messages_or_a_protocol_error_within_the_cap(
    data: list[bytes], cap: int
) -> None:
    dec = p.MessageDecoder(max_message=cap)
    try:
        for piece in data:
            for msg in dec.feed(piece):
                assert 0 <= len(msg.body) <= cap - 4
                # Whatever came out, each direction's body parser copes.
                for table in (FRONTEND, BACKEND):
                    parser = table.get(msg.type)
                    if parser is not None:
                        try:
                            parser(msg.body)
                        except p.ProtocolError as exc:
                            one_line_error(exc)
            # Only an incomplete message stays buffered, never more than the cap allows.
            assert len(dec._buf) <= cap + 1
    except p.ProtocolError as exc:
        one_line_error(exc)


def test_a_length_past_the_cap_is_refused_before_anything_is_buffered() -> None:
    dec = p.MessageDecoder(max_message=65536)
    try:
        list(dec.feed(b"Q" + struct.pack("!i", 1 << 30)))
    except p.ProtocolError as exc:
        assert "invalid length" in str(exc)
    else:
        raise AssertionError("a 1 GiB length was accepted")
    for bad in (b"Q\x00\x00\x00\x03", b"Q\xff\xff\xff\xff"):
        try:
            list(p.MessageDecoder().feed(bad))
        except p.ProtocolError:
            continue
        raise AssertionError(f"{bad!r} accepted")


@FAST
@given(data=st.lists(st.binary(max_size=64), max_size=8))
def test_startup_decoder_on_arbitrary_bytes(data: list[bytes]) -> None:
    dec = p.StartupDecoder()
    try:
        for piece in data:
            pkt = dec.feed(piece)
            while pkt is not None:
                assert 0 <= len(pkt.body) <= p.MAX_STARTUP - 8
                assert isinstance(pkt.params, dict)
                pkt = dec.feed(b"")
            assert len(dec._buf) <= p.MAX_STARTUP + len(piece)
    except p.ProtocolError as exc:
        one_line_error(exc)


@FAST
@given(
    params=st.dictionaries(text_no_nul.filter(bool), text_no_nul, max_size=8).filter(
        lambda d: len(p.startup_message(d)) <= p.MAX_STARTUP
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    tail=st.binary(max_size=40),
)
def test_startup_message_round_trips_cut_anywhere(
    params: dict[str, str], cuts: list[int], tail: bytes
) -> None:
    wire = p.startup_message(params) + tail
    dec = p.StartupDecoder()
    pkt = None
    later = b""
    for piece in chunks(wire, cuts):
        if pkt is None:
            pkt = dec.feed(piece)
        else:
            later += piece  # after the startup packet the relay reads messages instead
    assert pkt is not None and pkt.code == p.PROTOCOL_3_0
    assert pkt.params == params
    assert dec.rest() + later == tail


@FAST
@given(values=st.lists(st.none() | st.binary(max_size=100), max_size=30))
def test_data_row_round_trips(values: list[bytes | None]) -> None:
    raw = p.data_row(values)
    msgs = list(p.MessageDecoder().feed(raw))
    assert len(msgs) == 1 and msgs[0].type == b"D"
    assert p.parse_data_row(msgs[0].body) == values


@FAST
@given(body=st.binary(max_size=120))
def test_every_body_parser_on_garbage(body: bytes) -> None:
    for parser in [*FRONTEND.values(), *BACKEND.values()]:
        try:
            parser(body)
        except p.ProtocolError as exc:
            one_line_error(exc)


@FAST
@given(
    values=st.lists(st.none() | st.binary(max_size=30), min_size=1, max_size=6),
    cut=st.integers(min_value=0, max_value=400),
)
def test_a_truncated_data_row_is_a_protocol_error_not_a_short_value(
    values: list[bytes | None], cut: int
) -> None:
    body = p.data_row(values)[5:]
    cut %= len(body)
    try:
        got = p.parse_data_row(body[:cut])
    except p.ProtocolError:
        return
    # Only a cut that leaves a complete, shorter row is a row.
    assert p.data_row(got)[5:] == body[:cut]


@FAST
@given(
    name=text_no_nul,
    text=text_no_nul,
    types=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20),
)
def test_parse_round_trips(name: str, text: str, types: list[int]) -> None:
    raw = p.parse_msg(name, text, types)
    (msg,) = p.MessageDecoder().feed(raw)
    assert p.parse_parse(msg.body) == p.Parse(name, text, tuple(types))


@FAST
@given(text=text_no_nul)
def test_query_round_trips(text: str) -> None:
    (msg,) = p.MessageDecoder().feed(p.query(text))
    assert (msg.type, p.parse_query(msg.body)) == (b"Q", text)


@FAST
@given(kind=st.sampled_from(["S", "P"]), name=text_no_nul)
def test_describe_round_trips(kind: str, name: str) -> None:
    (msg,) = p.MessageDecoder().feed(p.describe(kind, name))
    assert p.parse_describe(msg.body) == (kind, name)


@FAST
@given(
    fields=st.lists(st.tuples(st.sampled_from(list("SVCMDHPpqWdsctnF")), text_no_nul), max_size=10)
)
def test_error_fields_round_trip(fields: list[tuple[str, str]]) -> None:
    assert p.parse_fields(p.fields_body(fields)) == fields
    (msg,) = p.MessageDecoder().feed(p.error_response("XX000", "boom", detail="d"))
    assert ("C", "XX000") in p.parse_fields(msg.body)


@FAST
@given(
    portal=text_no_nul,
    stmt=text_no_nul,
    fmts=st.lists(st.sampled_from([0, 1]), max_size=5),
    params=st.lists(st.none() | st.binary(max_size=20), max_size=5),
    res=st.lists(st.sampled_from([0, 1]), max_size=5),
)
def test_bind_parser_reads_what_a_client_builds(
    portal: str, stmt: str, fmts: list[int], params: list[bytes | None], res: list[int]
) -> None:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0"
    body += struct.pack(f"!h{len(fmts)}h", len(fmts), *fmts)
    body += struct.pack("!h", len(params))
    for v in params:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    body += struct.pack(f"!h{len(res)}h", len(res), *res)
    assert p.parse_bind(body) == p.Bind(portal, stmt, tuple(res))
    try:
        p.parse_bind(body[: len(body) // 2])
    except p.ProtocolError as exc:
        one_line_error(exc)


@FAST
@given(tag=text_no_nul)
def test_command_complete_tag_round_trips(tag: str) -> None:
    got, count = p.parse_command_complete(tag.encode() + b"\0")
    assert got == tag
    last = tag.rsplit(" ", 1)[-1]
    assert count == (int(last) if last.isascii() and last.isdigit() else None)


def test_invalid_utf8_in_bodies_is_replaced_not_raised() -> None:
    assert p.parse_command_complete(b"SELECT \xff\xfe 3\0") == ("SELECT \ufffd\ufffd 3", 3)
    assert p.parse_query(b"SELECT '\xc3'\0") == "SELECT '\ufffd'"
    assert p.parse_fields(b"M\xff\0\0") == [("M", "\ufffd")]


# -- messages the relay rebuilds to mask them ---------------------------------------------


@FAST
@given(
    oid=st.integers(0, 2**32 - 1),
    args=st.lists(st.none() | st.binary(max_size=40), max_size=6),
    per_arg=st.booleans(),
    fmt=st.sampled_from([0, 1]),
    result=st.sampled_from([0, 1]),
)
def test_function_call_round_trips(
    oid: int, args: list[bytes | None], per_arg: bool, fmt: int, result: int
) -> None:
    formats = [fmt] * len(args) if per_arg and len(args) > 1 else ([fmt] if args else [])
    (msg,) = p.MessageDecoder().feed(p.function_call(oid, args, formats, result))
    call = p.parse_function_call(msg.body)
    assert call == p.FunctionCall(oid, tuple(args), (fmt,) * len(args), result)
    for cut in range(len(msg.body)):
        try:
            p.parse_function_call(msg.body[:cut])
        except p.ProtocolError as exc:
            one_line_error(exc)
        else:
            raise AssertionError(f"a FunctionCall cut at {cut} was read")


@FAST
@given(value=st.none() | st.binary(max_size=60))
def test_function_result_round_trips(value: bytes | None) -> None:
    (msg,) = p.MessageDecoder().feed(p.function_result(value))
    assert msg.type == b"V" and p.parse_function_result(msg.body) == value


nul_free = st.binary(max_size=40).filter(lambda b: b"\0" not in b)


@FAST
@given(pid=st.integers(-(2**31), 2**31 - 1), channel=nul_free, payload=nul_free)
def test_notification_and_parameter_status_round_trip(
    pid: int, channel: bytes, payload: bytes
) -> None:
    (msg,) = p.MessageDecoder().feed(p.notification(pid, channel, payload))
    assert p.parse_notification(msg.body) == (pid, channel, payload)
    (msg,) = p.MessageDecoder().feed(p.parameter_status_bytes(channel, payload))
    assert p.parse_parameter_status(msg.body) == (channel, payload)


field_names = st.lists(st.text(st.characters(blacklist_characters="\0"), max_size=12), max_size=6)


@FAST
@given(names=field_names)
def test_row_description_names_are_rewritten_and_nothing_else(names: list[str]) -> None:
    body = struct.pack("!h", len(names)) + b"".join(
        n.encode("utf-8", "surrogatepass") + b"\0" + struct.pack("!ihihih", 7, i, 25, -1, -1, 0)
        for i, n in enumerate(names)
    )
    assert p.map_row_description_names(body, lambda b: b) is body
    upper = p.map_row_description_names(body, lambda b: b.replace(b"a", b"*"))
    got = p.parse_row_description(upper)
    want = p.parse_row_description(body)
    assert [f.name for f in got] == [f.name.replace("a", "*") for f in want]
    assert [(f.table_oid, f.attnum, f.type_oid, f.format) for f in got] == [
        (f.table_oid, f.attnum, f.type_oid, f.format) for f in want
    ]


# -- the statement gate (relay/pg/sql.py): its shortcuts are sound ------------------------

FRAGMENTS = [
    "SELECT 1",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
    "DROP TABLE victims",
    "drop database app",
    "DELETE FROM t",
    "UPDATE t SET a = 1 WHERE b",
    "TRUNCATE t",
    "CREATE TEMP TABLE system_user (x int)",
    "SELEC 1",
    "SET client_encoding = 'SJIS'",
    "SET NAMES 'UTF8'",
    "set standard_conforming_strings to off",
    "SET U&\"client_encodin\\0067\" TO 'GBK'",
    "SELECT set_config(E'client\\x5fencoding', 'SJIS', false)",
    "SELECT set_config('application_name', 'x', false)",
    "SELECT set_config(name, 'x', false) FROM pg_settings",
    "RESET ALL",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
]
PIECES = [";", " ", "'", '"', "/*", "*/", "--", "\n", "$$", "(", ")", "E'\\''", "U&", "x"]
RULES = ["DropdbStmt", "DropStmt", "TruncateStmt", "DeleteStmt:no-where", "UpdateStmt:no-where"]


def _union(nodes: tuple[frozenset[str], ...] | None) -> frozenset[str]:
    return frozenset().union(*nodes) if nodes else frozenset()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from(FRAGMENTS) | st.sampled_from(PIECES), max_size=8))
def test_the_gate_never_lets_through_what_the_parser_rejects_or_a_rule_would_see(
    parts: list[str],
) -> None:
    text = "".join(parts)
    full = sql.analyze(text)
    enforcing = sql.SqlGate(RULES, enforcing=True).check(text)
    if full.error is not None:
        # Fail closed: never "nothing a rule asks about".
        assert enforcing.problem == sql.UNPARSED
        return
    if full.pinned is not None:
        assert enforcing.problem == sql.PINNED
        # Even where nothing else is enforced.
        assert sql.SqlGate([], enforcing=False).check(text).problem == sql.PINNED
        return
    assert enforcing.problem is None
    # The keyword shortcut skips only texts no rule node can be in.
    wanted = {n for n in RULES if n in full.nodes}
    assert wanted <= _union(enforcing.nodes)
    assert enforcing.nodes is None or len(enforcing.nodes) == full.statements


# -- COPY rows split by field (relay/pg/copymask.py) -----------------------------------

copy_fields = st.lists(
    st.text(st.sampled_from(list('ab,;"\t\n\\\r x')), max_size=8), min_size=1, max_size=6
)


def _text_row(fields: list[str], delim: str) -> bytes:
    def esc(v: str) -> str:
        v = v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
        return v.replace(delim, "\\" + delim) if delim != "\t" else v

    return (delim.join(esc(f) for f in fields) + "\n").encode()


@FAST
@given(fields=copy_fields, delim=st.sampled_from(["\t", ",", ";"]), data=st.data())
def test_copy_text_rows_are_split_at_their_delimiters_only(
    fields: list[str], delim: str, data: st.DataObject
) -> None:
    from relay.pg.copymask import CopyPlan

    which = data.draw(st.sets(st.integers(0, len(fields) - 1)))
    row = _text_row(fields, delim)
    plan = CopyPlan(frozenset(which), every=False, delimiter=ord(delim))
    out = plan.mask_row(row, lambda v: v.replace(b"a", b"*"))
    assert out == _text_row(
        [f.replace("a", "*") if i in which else f for i, f in enumerate(fields)], delim
    )


@FAST
@given(fields=copy_fields, delim=st.sampled_from([",", ";", "\t"]), data=st.data())
def test_copy_csv_rows_are_split_outside_quotes_only(
    fields: list[str], delim: str, data: st.DataObject
) -> None:
    import csv
    import io

    from relay.pg.copymask import CopyPlan

    which = data.draw(st.sets(st.integers(0, len(fields) - 1)))

    def field(v: str) -> str:
        # As PostgreSQL writes CSV: quoted when it holds a delimiter, quote, CR or LF, or
        # is empty (an unquoted empty field is NULL).
        if not v or any(c in v for c in (delim, '"', "\r", "\n")):
            return '"' + v.replace('"', '""') + '"'
        return v

    row = (delim.join(field(f) for f in fields) + "\n").encode()
    plan = CopyPlan(frozenset(which), every=False, csv=True, delimiter=ord(delim))
    out = plan.mask_row(row, lambda v: v.replace(b"a", b"*"))
    (got,) = csv.reader(io.StringIO(out.decode(), newline=""), delimiter=delim)
    assert got == [f.replace("a", "*") if i in which else f for i, f in enumerate(fields)]


# -- statements that read the same under every client encoding (relay/pg/sql.py) ------

ENCODINGS = ["shift_jis", "shift_jis_2004", "gbk", "big5", "cp949", "gb18030", "johab"]
statement_bytes = st.lists(
    st.sampled_from(
        [b"'", b"\\", b";", b"a", b"0", b" ", b"\xc3\xa9", b"\xe2\x82\xac", b"\x83", b"\x81\x30"]
    ),
    max_size=12,
).map(b"".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=statement_bytes)
def test_what_reads_the_same_keeps_its_ascii_bytes_in_every_encoding(raw: bytes) -> None:
    if not sql.reads_the_same(raw):
        return
    for enc in ENCODINGS:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue  # the server refuses it too
        # No character of several bytes takes in an ASCII one (a quote, a backslash).
        for c in text:
            b = c.encode(enc)
            assert len(b) == 1 or all(x >= 0x80 for x in b), (enc, c, b)
    assert b"\\'" not in raw


def test_reads_the_same_on_known_texts() -> None:
    assert sql.reads_the_same("SELECT 'Müller', 'café;'".encode())
    assert sql.reads_the_same(b"SELECT 'a\\d' FROM t")
    assert not sql.reads_the_same(b"SELECT E'\x83\\' ; DROP TABLE victims; -- '")
    assert not sql.reads_the_same("SELECT '€a'".encode())
    assert not sql.reads_the_same(b"SELECT 'a\\' , ' ; DROP TABLE victims; --'")
