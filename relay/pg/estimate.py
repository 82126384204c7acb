"""What a held statement would do, for the approver: the tables and operations read from
the parse tree, and the target's own estimate from ``EXPLAIN`` on a side connection.

The estimate must never run the statement and never hold up the decision:

- only ``EXPLAIN (FORMAT JSON)`` is sent, never ``ANALYZE``, prefixed by the relay to one
  statement sent as an extended-protocol Parse (which refuses a second statement), and
  only for statement kinds whose plain EXPLAIN plans without executing;
- inside ``BEGIN READ ONLY`` with ``statement_timeout`` and ``lock_timeout``, so a function
  the planner folds cannot write and a lock queue cannot stall it, then ``ROLLBACK``;
- with the relay's own credential for the target, on a connection of its own;
- any failure (unreachable target, timeout, an error from the server, a statement that
  cannot be explained) is returned as ``Estimate.error``, one line; the request is shown
  without an estimate and the decision goes on.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.visitors import Visitor

from recorder.config import TargetConfig
from relay.pg import protocol as p
from relay.pg.upstream import Upstream, UpstreamError, connect

# Plain EXPLAIN plans these without running them (PostgreSQL's EXPLAIN synopsis).
_EXPLAINABLE = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_OPERATION = {
    ast.InsertStmt: "insert",
    ast.UpdateStmt: "update",
    ast.DeleteStmt: "delete",
    ast.MergeStmt: "merge",
}
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


@dataclass(frozen=True)
class Touch:
    """One table a statement reads or writes."""

    operation: str
    table: str


class _Tables(Visitor):
    """Every table named anywhere in a statement, with what the statement does to it."""

    def __init__(self) -> None:
        self.found: list[Touch] = []
        self._targets: dict[int, str] = {}
        self.ctes: set[str] = set()

    def _name(self, rv: ast.RangeVar) -> str:
        parts = [x for x in (rv.catalogname, rv.schemaname, rv.relname) if x]
        return ".".join(parts)

    def visit_InsertStmt(self, ancestors: Any, node: ast.InsertStmt) -> None:
        self._targets[id(node.relation)] = "insert"

    def visit_UpdateStmt(self, ancestors: Any, node: ast.UpdateStmt) -> None:
        self._targets[id(node.relation)] = "update"

    def visit_DeleteStmt(self, ancestors: Any, node: ast.DeleteStmt) -> None:
        self._targets[id(node.relation)] = "delete"

    def visit_MergeStmt(self, ancestors: Any, node: ast.MergeStmt) -> None:
        self._targets[id(node.relation)] = "merge"

    def visit_TruncateStmt(self, ancestors: Any, node: ast.TruncateStmt) -> None:
        for rv in node.relations or ():
            self._targets[id(rv)] = "truncate"

    def visit_CommonTableExpr(self, ancestors: Any, node: ast.CommonTableExpr) -> None:
        if node.ctename:
            self.ctes.add(node.ctename)

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> None:
        touch = Touch(self._targets.get(id(node), "read"), self._name(node))
        if touch not in self.found:
            self.found.append(touch)


def touches(sql: str) -> list[Touch]:
    """The tables ``sql`` names and what it does to each (``read`` for any other use);
    empty when pglast cannot parse it (the request then shows the text alone)."""
    try:
        tree = parse_sql(sql)
    except ParseError:
        return []
    v = _Tables()
    v(tree)
    return [t for t in v.found if t.table not in v.ctes]


@dataclass(frozen=True)
class Estimate:
    """The planner's estimate of one statement, or why there is none."""

    rows: int | None = None
    cost: float | None = None
    node: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "cost": self.cost, "node": self.node, "error": self.error}


def explainable(sql: str) -> str | None:
    """None when ``sql`` is one statement plain EXPLAIN plans without running; else why not."""
    try:
        stmts = parse_sql(sql)
    except ParseError as exc:
        return f"not parsed: {exc}"
    if len(stmts) != 1:
        return "more than one statement"
    stmt = stmts[0].stmt
    if not isinstance(stmt, _EXPLAINABLE):
        return f"{type(stmt).__name__} has no plan to estimate"
    return None


def _bind(values: Sequence[bytes | None], formats: Sequence[int]) -> bytes:
    body = b"\0\0" + _I16.pack(len(formats)) + b"".join(_I16.pack(f) for f in formats)
    body += _I16.pack(len(values))
    for v in values:
        body += _I32.pack(-1) if v is None else _I32.pack(len(v)) + v
    return p.message(b"B", body + _I16.pack(0))


def plan_estimate(plan_json: bytes) -> Estimate:
    """Rows and cost from ``EXPLAIN (FORMAT JSON)`` output. For a write the top node is
    ModifyTable, whose own row count is that of its RETURNING; the rows it would change
    are its input's."""
    try:
        top = json.loads(plan_json)[0]["Plan"]
        node = str(top["Node Type"])
        rows_of = top
        if node == "ModifyTable" and top.get("Plans"):
            rows_of = top["Plans"][0]
            node = f"{top.get('Operation', 'Modify')} on {top.get('Relation Name', '?')}"
        return Estimate(int(rows_of["Plan Rows"]), float(top["Total Cost"]), node)
    except (ValueError, LookupError, TypeError) as exc:
        return Estimate(error=f"unreadable plan: {exc}")


async def _exchange(up: Upstream, data: bytes, timeout: float) -> tuple[list[bytes], str | None]:
    """Send ``data`` and read to ReadyForQuery: DataRow first values and the first error."""
    up.writer.write(data)
    await up.writer.drain()
    dec = p.MessageDecoder()
    rows: list[bytes] = []
    error: str | None = None
    while True:
        chunk = await asyncio.wait_for(up.pipe.read(65536), timeout)
        if not chunk:
            raise UpstreamError("the target closed the connection")
        for msg in dec.feed(chunk):
            if msg.type == b"D":
                first = p.parse_data_row(msg.body)[0]
                rows.append(first or b"")
            elif msg.type == b"E" and error is None:
                fields = dict(p.parse_fields(msg.body))
                error = f"{fields.get('M', 'error')} ({fields.get('C', '')})"
            elif msg.type == b"Z":
                return rows, error


async def estimate(
    target: TargetConfig,
    sql: str,
    params: Sequence[bytes | None] = (),
    formats: Sequence[int] = (),
    types: Sequence[int] = (),
    *,
    timeout: float = 2.0,
) -> Estimate:
    """The target's estimate for ``sql`` with its bound parameters (values as the client
    sent them, with their formats and the Parse's type OIDs). Never raises."""
    why = explainable(sql)
    if why is not None:
        return Estimate(error=why)
    ms = max(1, int(timeout * 1000))
    # The server ends the statement at ``timeout``; the relay waits longer for it to say
    # so (a loaded machine), and gives up only if the server does not answer at all.
    wait = timeout * 2 + 5
    try:
        up = await connect(target, {"application_name": "castgate-estimate"}, timeout=timeout)
    except UpstreamError as exc:
        return Estimate(error=str(exc))
    try:
        # lock_timeout first: a statement waiting on a lock says so, not "timeout".
        setup = p.query(
            f"BEGIN READ ONLY; SET LOCAL statement_timeout = {ms};"
            f" SET LOCAL lock_timeout = {max(1, ms // 2)}"
        )
        _, error = await _exchange(up, setup, wait)
        if error is not None:
            return Estimate(error=error)
        run = (
            p.parse_msg("", "EXPLAIN (FORMAT JSON) " + sql, types)
            + _bind(params, formats)
            + p.message(b"E", b"\0" + _I32.pack(0))
            + p.message(b"S")
        )
        rows, error = await _exchange(up, run, wait)
        await _exchange(up, p.query("ROLLBACK"), wait)
        if error is not None:
            return Estimate(error=error)
        return plan_estimate(b"".join(rows))
    except (OSError, TimeoutError, UpstreamError, p.ProtocolError) as exc:
        return Estimate(error=str(exc) or f"no answer within {timeout:g} s")
    finally:
        try:
            up.writer.write(p.message(b"X"))
            up.writer.close()
        except OSError:
            pass
