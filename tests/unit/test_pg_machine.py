"""The PostgreSQL proxy machine driven by byte scripts, without sockets: what each side
sends goes in, what the other side gets (and what is logged and transcribed) comes out,
the way psycopg tests its generators."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest

from recorder.masking import Masker
from relay.pg import protocol as p
from relay.pg.machine import (
    COLUMNS,
    COMPLETE,
    ERROR,
    ROWS,
    ClientStep,
    PgMachine,
    ServerStep,
    SessionEnd,
)
from relay.pg.requests import Bind, Describe, Execute, Parse, Query, Sync
from relay.policy import Decision

PAN = "4111111111111111"
MASKED = "411111******1111"
CARDS = 16400  # the table OID the scripts' RowDescriptions name


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def row_description(*fields: tuple[str, int, int, int, int]) -> bytes:
    """(name, table OID, column number, type OID, format) per column."""
    body = struct.pack("!h", len(fields))
    for name, table, attnum, oid, fmt in fields:
        body += name.encode() + b"\0" + struct.pack("!IhIhih", table, attnum, oid, -1, -1, fmt)
    return msg(b"T", body)


def bind(portal: str, stmt: str, params: Iterable[bytes], result_formats: Iterable[int]) -> bytes:
    params, result_formats = list(params), list(result_formats)
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!hh", 0, len(params))
    for v in params:
        body += struct.pack("!i", len(v)) + v
    body += struct.pack("!h", len(result_formats))
    body += b"".join(struct.pack("!h", f) for f in result_formats)
    return msg(b"B", body)


def execute(portal: str = "") -> bytes:
    return msg(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


SYNC = msg(b"S")
READY = msg(b"Z", b"I")


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def types(data: bytes | bytearray) -> list[bytes]:
    return [m.type for m in p.MessageDecoder().feed(bytes(data))]


def allow(text: str) -> Decision:
    return Decision("allow")


def machine(masked: set[tuple[int, int]] | None = None, decide: object = allow) -> PgMachine:
    m = PgMachine(Masker(), decide, 1 << 16)  # type: ignore[arg-type]
    m.target = "appdb"
    m.masking.keys = masked or set()
    return m


def feed_server(m: PgMachine, data: bytes, chunk: int | None = None) -> ServerStep:
    """``data`` from the target in reads of ``chunk`` bytes; the steps merged."""
    if chunk is None:
        return m.server_data(data)
    out = ServerStep(items=[])
    for i in range(0, len(data), chunk):
        step = m.server_data(data[i : i + chunk])
        out.send = bytes(out.send) + bytes(step.send)
        assert out.items is not None and step.items is not None
        out.items += step.items
        out.logs += step.logs
        out.ready = out.ready or step.ready
    return out


def test_simple_query_passes_as_it_came_and_is_logged_and_transcribed() -> None:
    m = machine()
    q = p.query("SELECT 1 AS n")
    step = m.client_data(q)
    assert step.send is q and step.said == ["SELECT 1 AS n"] and step.slow is None
    assert [type(r) for r in m.pending] == [Query] and m.statements == 1
    answer = row_description(("n", 0, 0, 23, 0)) + p.data_row([b"1"]) + complete("SELECT 1")
    answer += READY
    got = m.server_data(answer)
    assert got.send is answer  # nothing to mask: the read itself goes on
    assert [r[:3] for r in got.logs] == [("SELECT 1 AS n", "SELECT 1", 1)]
    assert got.items is not None and [i[0] for i in got.items] == [COLUMNS, ROWS, COMPLETE]
    assert got.ready and not m.pending and m.txn_status == b"I"


def test_card_numbers_in_rows_names_and_tags_are_masked() -> None:
    m = machine()
    m.client_data(p.query(f'SELECT note AS "{PAN}"'))
    answer = (
        row_description((PAN, 0, 0, 25, 0))
        + p.data_row([f"paid with {PAN}".encode()])
        + complete("SELECT 1")
        + READY
    )
    got = m.server_data(answer)
    assert PAN.encode() not in got.send and MASKED.encode() in got.send
    assert types(got.send) == [b"T", b"D", b"C", b"Z"]


def test_an_extended_pipeline_asks_for_the_columns_and_swallows_the_answer() -> None:
    m = machine(masked={(CARDS, 2)})
    script = (
        p.parse_msg("s1", "SELECT pan FROM cards WHERE id = $1")
        + bind("", "s1", [b"1"], [1])
        + execute()
        + SYNC
    )
    step = m.client_data(script)
    # The relay's own Describe goes just before the Execute.
    assert types(step.send) == [b"P", b"B", b"D", b"E", b"S"]
    assert [type(r) for r in m.pending] == [Parse, Bind, Describe, Execute, Sync]
    hidden = m.pending[2]
    assert isinstance(hidden, Describe) and hidden.hidden
    answer = (
        msg(b"1")
        + msg(b"2")
        + row_description(("pan", CARDS, 2, 25, 1))
        + p.data_row([PAN.encode()])
        + complete("SELECT 1")
        + READY
    )
    got = m.server_data(answer)
    # The client never asked for a RowDescription: none reaches it.
    assert types(got.send) == [b"1", b"2", b"D", b"C", b"Z"]
    assert PAN.encode() not in got.send
    assert [r[:2] for r in got.logs] == [("SELECT pan FROM cards WHERE id = $1", "SELECT 1")]
    assert not m.pending


def test_binary_rows_of_masked_columns_are_masked_where_the_client_described() -> None:
    m = machine(masked={(CARDS, 2)})
    script = (
        p.parse_msg("", "SELECT id, pan FROM cards")
        + bind("", "", [], [1, 1])
        + p.describe("P", "")
        + execute()
        + SYNC
    )
    assert types(m.client_data(script).send) == [b"P", b"B", b"D", b"E", b"S"]
    desc = row_description(("id", CARDS, 1, 23, 1), ("pan", CARDS, 2, 1043, 1))
    rows = p.data_row([struct.pack("!i", 1), PAN.encode()]) + p.data_row(
        [struct.pack("!i", 2), b"5555555555554444"]
    )
    got = m.server_data(msg(b"1") + msg(b"2") + desc + rows + complete("SELECT 2") + READY)
    assert types(got.send) == [b"1", b"2", b"T", b"D", b"D", b"C", b"Z"]
    assert PAN.encode() not in got.send and b"5555555555554444" not in got.send
    values = [
        p.parse_data_row(x.body) for x in p.MessageDecoder().feed(bytes(got.send)) if x.type == b"D"
    ]
    assert [v[0] for v in values] == [struct.pack("!i", 1), struct.pack("!i", 2)]


def test_an_error_mid_pipeline_skips_to_the_sync_and_the_next_pipeline_goes_on() -> None:
    m = machine()
    first = p.parse_msg("", "SELECT 1/0") + bind("", "", [], []) + execute() + SYNC
    second = p.parse_msg("", "SELECT 2") + bind("", "", [], []) + execute() + SYNC
    m.client_data(first + second)
    error = p.error_response("22012", f"division by zero near {PAN}")
    answer = (
        msg(b"1")
        + error
        + READY
        + msg(b"1")
        + msg(b"2")
        + row_description(("?column?", 0, 0, 23, 0))
        + p.data_row([b"2"])
        + complete("SELECT 1")
        + READY
    )
    got = m.server_data(answer)
    # The failed pipeline's hidden Describe answer never came; the second's is swallowed.
    assert types(got.send) == [b"1", b"E", b"Z", b"1", b"2", b"D", b"C", b"Z"]
    assert PAN.encode() not in got.send and MASKED.encode() in got.send
    assert [r[:2] for r in got.logs] == [
        ("SELECT 1/0", "error"),
        ("SELECT 2", "SELECT 1"),
    ]
    assert got.items is not None and ERROR in [i[0] for i in got.items]
    assert not m.pending


def test_copy_out_in_text_is_masked_by_content_and_copy_in_goes_as_typed() -> None:
    m = machine()
    m.client_data(p.query("COPY cards TO STDOUT"))
    out_resp = msg(b"H", struct.pack("!bhh", 0, 1, 0))
    data = msg(b"d", f"1\t{PAN}\n".encode())
    got = m.server_data(out_resp + data + msg(b"c") + complete("COPY 1") + READY)
    assert types(got.send) == [b"H", b"d", b"c", b"C", b"Z"]
    assert PAN.encode() not in got.send and MASKED.encode() in got.send

    copy_in = p.query("COPY cards FROM STDIN")
    assert m.client_data(copy_in).send is copy_in
    m.server_data(msg(b"G", struct.pack("!bhh", 0, 1, 0)))
    typed = msg(b"d", f"2\t{PAN}\n".encode()) + msg(b"c")
    step = m.client_data(typed)
    assert step.send is typed  # the database gets what the agent typed
    got = m.server_data(complete("COPY 1") + READY)
    assert [r[:2] for r in got.logs] == [("COPY cards FROM STDIN", "COPY 1")]


def _binary_copy(*tuples: list[bytes]) -> bytes:
    out = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
    for fields in tuples:
        out += struct.pack("!h", len(fields))
        out += b"".join(struct.pack("!i", len(f)) + f for f in fields)
    return out + struct.pack("!h", -1)


def test_binary_copy_out_is_masked_across_messages_and_refused_where_it_cannot_be() -> None:
    m = machine()
    m.client_data(p.query("COPY cards TO STDOUT (FORMAT binary)"))
    stream = _binary_copy([struct.pack("!i", 1), PAN.encode()])
    head = m.server_data(msg(b"H", struct.pack("!bhhh", 1, 2, 1, 1)))
    assert types(head.send) == [b"H"]
    cut = len(stream) // 2  # a tuple split between two CopyData messages
    got = m.server_data(msg(b"d", stream[:cut]) + msg(b"d", stream[cut:]) + msg(b"c"))
    sent = b"".join(x.body for x in p.MessageDecoder().feed(bytes(got.send)) if x.type == b"d")
    assert PAN.encode() not in sent and MASKED.encode() in sent and len(sent) == len(stream)
    m.server_data(complete("COPY 1") + READY)

    m.client_data(p.query("COPY (SELECT 4111111111111111::int8) TO STDOUT (FORMAT binary)"))
    m.server_data(msg(b"H", struct.pack("!bhh", 1, 1, 1)))
    as_int8 = _binary_copy([struct.pack("!q", int(PAN))])
    with pytest.raises(SessionEnd, match="cannot mask"):
        m.server_data(msg(b"d", as_int8))

    m = machine()
    m.client_data(p.query("COPY cards TO STDOUT (FORMAT binary)"))
    m.server_data(msg(b"H", struct.pack("!bhh", 1, 1, 1)))
    with pytest.raises(p.ProtocolError, match="malformed binary COPY"):
        m.server_data(msg(b"d", b"NOTCOPY\n\xff\r\n\x00" + bytes(8)))


def test_a_held_statement_stops_the_fast_path_and_a_refusal_reads_as_an_error() -> None:
    def decide(text: str) -> Decision:
        return Decision("approve" if text.startswith("DELETE") else "allow")

    m = machine(decide=decide)
    before, held, after = p.query("SELECT 1"), p.query("DELETE FROM cards"), p.query("SELECT 2")
    step = m.client_data(before + held + after)
    # What came before the held statement goes; it and what follows wait for the session.
    assert bytes(step.send) == before
    assert step.slow is not None and [x.raw() for x in step.slow] == [held, after]
    assert [r.text for r in m.pending if isinstance(r, Query)] == ["SELECT 1"]
    # The session refuses it: the target gets a statement that fails at analysis ...
    m.refused("DELETE FROM cards")
    sentinel = m.sentinel("castgate: denied by an approver")
    assert "castgate-refused-" in sentinel
    nonce = sentinel.split("castgate-refused-")[1].rstrip('"')
    m.server_data(row_description(("?column?", 0, 0, 23, 0)) + p.data_row([b"1"]))
    got = m.server_data(complete("SELECT 1") + READY)
    assert len(got.logs) == 1
    error = p.error_response("42P01", f'relation "pg_catalog.castgate-refused-{nonce}" missing')
    got = m.server_data(error + READY)
    # ... and its error becomes the relay's, unlogged (the enforcement logged it).
    fields = dict(p.parse_fields(next(p.MessageDecoder().feed(bytes(got.send))).body))
    assert fields["M"] == "castgate: denied by an approver" and fields["C"] == "42501"
    assert got.logs == [] and not m.sentinels and not m.pending


def test_a_notification_is_masked_and_keeps_its_process_id() -> None:
    m = machine()
    plain = p.notification(4242, b"payments", b"order 17 done")
    assert m.server_data(plain).send is plain
    got = m.server_data(p.notification(4242, b"payments", f"card {PAN}".encode()))
    pid, channel, payload = p.parse_notification(
        next(p.MessageDecoder().feed(bytes(got.send))).body
    )
    assert (pid, channel, payload) == (4242, b"payments", f"card {MASKED}".encode())


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_messages_split_across_reads_come_out_whole_and_masked(chunk: int) -> None:
    m = machine()
    query = p.query("SELECT note FROM cards")
    for i in range(0, len(query), chunk):
        m.client_data(query[i : i + chunk])
    assert [r.text for r in m.pending if isinstance(r, Query)] == ["SELECT note FROM cards"]
    answer = (
        row_description(("note", 0, 0, 25, 0))
        + p.data_row([f"paid with {PAN}".encode()])
        + p.data_row([b"nothing here"])
        + complete("SELECT 2")
        + READY
    )
    got = feed_server(m, answer, chunk)
    whole = machine()
    whole.client_data(query)
    assert bytes(got.send) == bytes(whole.server_data(answer).send)
    assert PAN.encode() not in got.send and types(got.send) == [b"T", b"D", b"D", b"C", b"Z"]
    assert [(r[0], r[2]) for r in got.logs] == [("SELECT note FROM cards", 2)]


def test_an_unknown_message_type_from_either_side_ends_the_session() -> None:
    m = machine()
    with pytest.raises(p.ProtocolError, match="unexpected message type b'Z'"):
        m.client_data(msg(b"Z", b"I"))
    m = machine()
    m.client_data(p.query("SELECT 1"))
    with pytest.raises(p.ProtocolError, match="from the target"):
        m.server_data(msg(b"?", PAN.encode()))


def test_terminate_and_function_call_go_to_the_session() -> None:
    m = machine()
    step: ClientStep = m.client_data(msg(b"X"))
    assert step.send == b"" and step.slow is not None and step.slow[0].type == b"X"
    with pytest.raises(p.ProtocolError, match="without a FunctionCall"):
        m.server_data(msg(b"V", struct.pack("!i", 1) + b"1"))


def test_a_pinned_setting_changing_ends_the_session() -> None:
    m = machine()
    ok = p.parameter_status("client_encoding", "UTF8")
    assert m.server_data(ok).send is ok
    with pytest.raises(SessionEnd, match="client_encoding changed to 'SJIS'"):
        m.server_data(p.parameter_status("client_encoding", "SJIS"))


def test_a_statement_whose_meaning_could_change_waits_behind_running_ones() -> None:
    m = machine()
    m.client_data(p.query("SELECT pg_sleep(1)"))
    # A backslash before a quote reads differently with standard_conforming_strings off.
    step = m.client_data(p.query("SELECT 'a\\' OR 1=1 --'"))
    assert step.slow is not None and m.runs_pending() and m.answers_coming()
    m.server_data(complete("SELECT 1") + READY)
    assert not m.runs_pending()


def test_the_postgresql_relay_reaches_into_no_other_objects_underscore_attributes() -> None:
    """Not asyncio's stream buffers, not another module's internals: only ``self``'s
    and ``cls``'s own (a private API would need an adapter module that says so)."""
    import ast
    from pathlib import Path

    import relay.pg

    found = []
    for path in sorted(Path(relay.pg.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
