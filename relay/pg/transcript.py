"""A PostgreSQL session rendered as a psql-like terminal transcript, so auditors replay
database sessions like shell sessions: prompt with the target name, the query, the
masked result table, the row count or error, and the timing.

Only the first ``max_rows`` rows of a result are drawn (a million-row result would
bloat the cast without helping anyone read it); the row count is always exact and the
structured query log in the store has every statement.

Binary-format values are decoded by their type (relay/pg/values.py) and drawn as text;
a statement run with parameters is drawn with them (masked), the way the server's log
writes them: ``Parameters: $1 = '42'``. Nothing from the session reaches the terminal
raw: control characters in names, values, statements and messages are escaped the way
psql escapes them (``\\r``, ``\\x1B``, ``\\u009B``), so a column named with CR LF draws
no fake prompt and ESC[2J clears no auditor's screen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from recorder.masking import Masker
from relay.pg import values as pgv
from relay.pg.protocol import parse_data_row
from relay.pg.rows import row_bodies

_MAX_CELL = 60
_MAX_PARAMS = 20
# What psql escapes (C0 controls, DEL, C1 controls), and the characters that reorder or
# break lines on a terminal (bidirectional overrides, line and paragraph separators).
_OTHERS = "\\x7f-\\x9f\\u061c\\u200e\\u200f\\u2028-\\u202e\\u2066-\\u2069"
_CONTROL = re.compile(f"[\\x00-\\x08\\x0b-\\x1f{_OTHERS}]")
_CONTROL_OR_NL = re.compile(f"[\\x00-\\x08\\x0a-\\x1f{_OTHERS}]")


def _esc(m: re.Match[str]) -> str:
    c = m.group()
    if c == "\r":
        return "\\r"
    if c == "\n":
        return "\\n"
    o = ord(c)
    return f"\\x{o:02X}" if o < 0x80 else f"\\u{o:04X}"


def escape(text: str) -> str:
    """One line: every control character escaped (newlines too), tabs expanded."""
    if text.isprintable():
        return text
    return _CONTROL_OR_NL.sub(_esc, text).expandtabs(8)


def escape_lines(text: str, more: str = "  ") -> str:
    """Lines kept as lines (CR LF on the terminal), each after the first behind
    ``more`` (psql's continuation prompt for a statement), so no line the session
    wrote can pass for a prompt of the transcript's own; every other control escaped."""
    if not text.isprintable():
        text = "\n".join(line.expandtabs(8) for line in _CONTROL.sub(_esc, text).split("\n"))
    return text.replace("\n", "\r\n" + more)


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 3] + "..."


@dataclass(frozen=True, slots=True)
class Bound:
    """A statement run with parameters: its (masked) text and its Bind message body,
    decoded only when the transcript is drawn, not on the client's round trip."""

    text: str
    bind: bytes
    types: tuple[int, ...]


class Transcript:
    """Builds transcript text; the caller writes it into the cast as output.

    This runs for every statement (thousands a second under load), so the common
    shapes are cheap: names and formats are taken as given (tuples the relay keeps per
    result shape), and a table's header lines are built once per shape and width.

    ``masker`` masks what the transcript decodes itself (binary values drawn as text,
    parameters): rows reach it masked already, but the text drawn from a binary value
    is masked again as text."""

    def __init__(self, target: str, max_rows: int = 100, masker: Masker | None = None) -> None:
        self.prompt = f"{escape(target)}=> "
        self.more = f"{escape(target)}-> "
        self.max_rows = max_rows
        self.masker = masker or Masker()
        self._names: Sequence[str] = ()
        self._formats: Sequence[int] = ()
        self._oids: Sequence[int] = ()
        self._rows: list[list[str]] = []
        self._count = 0
        self._heads: dict[tuple[Sequence[str], tuple[int, ...]], str] = {}
        self._safe: dict[Sequence[str], tuple[str, ...]] = {}

    def banner(self, identity: str, database: str) -> str:
        """First lines of the cast."""
        return f"castgate: {escape(identity)} connected to {escape(database)}\r\n"

    def query(self, stmt: str | Bound) -> str:
        """The prompt and the (already masked) statement, with its parameters."""
        if type(stmt) is str:
            return self.prompt + escape_lines(stmt, self.more) + "\r\n"
        assert isinstance(stmt, Bound)
        return self.prompt + escape_lines(stmt.text, self.more) + "\r\n" + self.parameters(stmt)

    def parameters(self, stmt: Bound) -> str:
        """``Parameters: $1 = '42', $2 = NULL`` (masked), or nothing."""
        try:
            fmts, vals = pgv.bind_params(stmt.bind)
        except (pgv.Malformed, ValueError, IndexError):
            return "Parameters: (malformed Bind)\r\n"
        if not vals:
            return ""
        types = stmt.types
        parts = []
        for i, (fmt, v) in enumerate(zip(fmts, vals, strict=True)):
            if i >= _MAX_PARAMS:
                parts.append(f"... {len(vals) - i} more")
                break
            if v is None:
                parts.append(f"${i + 1} = NULL")
                continue
            oid = types[i] if i < len(types) else 0
            text = pgv.render(oid, v) if fmt == 1 else v.decode("utf-8", "replace")
            text = _clip(escape(self.masker.mask(text)))
            parts.append(f"${i + 1} = '" + text.replace("'", "''") + "'")
        return "Parameters: " + ", ".join(parts) + "\r\n"

    def columns(
        self, names: Sequence[str], formats: Sequence[int], type_oids: Sequence[int] = ()
    ) -> None:
        """A result set starts."""
        safe = self._safe.get(names)
        if safe is None:
            safe = tuple(escape(n) for n in names)
            if len(self._safe) < 256:
                self._safe[names] = safe
        self._names = safe
        self._formats = formats
        self._oids = type_oids
        self._rows = []
        self._count = 0

    def add_rows(self, raw: bytes, count: int) -> None:
        """A run of ``count`` (already masked) DataRows, framed; only the rows that
        will be drawn are decoded."""
        room = self.max_rows - len(self._rows)
        if room > 0:
            for body in row_bodies(raw, min(room, count)):
                self.row(parse_data_row(body))
            count -= min(room, count)
        self._count += count

    def row(self, values: Sequence[bytes | None]) -> None:
        """One (already masked) row."""
        self._count += 1
        if len(self._rows) < self.max_rows:
            fmts = self._formats
            n = len(fmts)
            if 1 in fmts:
                self._rows.append(
                    [
                        self._binary(v, i) if i < n and fmts[i] == 1 else _cell(v)
                        for i, v in enumerate(values)
                    ]
                )
            else:
                self._rows.append([_cell(v) for v in values])

    def _binary(self, value: bytes | None, i: int) -> str:
        if value is None:
            return ""
        oid = self._oids[i] if i < len(self._oids) else 0
        return _clip(escape(self.masker.mask(pgv.render(oid, value))))

    def complete(self, tag: str, elapsed_ms: float) -> str:
        """The table (if any), the command tag or row count, and the timing."""
        names = self._names
        count = self._count
        if names:
            rows = self._rows
            ncols = len(names)
            widths = [len(n) for n in names]
            if rows:
                # Column by column (rows are as wide as the names; a malformed shorter
                # row only leaves the widths of the columns it lacks as they are).
                for i, col in enumerate(zip(*rows, strict=False)):
                    if i >= ncols:
                        break
                    widest = max(map(len, col))
                    if widest > widths[i]:
                        widths[i] = widest
            key = (names, tuple(widths))
            head = self._heads.get(key)
            if head is None:
                head = (
                    " "
                    + " | ".join(n.center(w) for n, w in zip(names, widths, strict=False))
                    + "\r\n-"
                    + "-+-".join("-" * w for w in widths)
                    + "-\r\n"
                )
                if len(self._heads) < 64:
                    self._heads[key] = head
            out = [head]
            if ncols == 1:
                w = widths[0]
                out += [" " + (r[0] if r else "").ljust(w) + "\r\n" for r in rows]
            else:
                out += [
                    " " + " | ".join([c.ljust(w) for c, w in zip(r, widths, strict=False)]) + "\r\n"
                    for r in rows
                ]
            hidden = count - len(rows)
            if hidden > 0:
                out.append(f"... {hidden} more rows not drawn\r\n")
            out.append("(1 row)\r\n" if count == 1 else f"({count} rows)\r\n")
            text = "".join(out)
        else:
            text = escape(tag) + "\r\n" if tag else ""
        self._names = ()
        self._rows = []
        self._count = 0
        return f"{text}Time: {elapsed_ms:.3f} ms\r\n\r\n"

    def error(self, severity: str, message: str, detail: str | None) -> str:
        """An error or notice as psql prints it."""
        text = f"{escape(severity)}:  {escape_lines(message)}\r\n"
        if detail:
            text += f"DETAIL:  {escape_lines(detail)}\r\n"
        self._names = ()
        self._rows = []
        return text


def _cell(value: bytes | None) -> str:
    if value is None:
        return ""
    return _clip(escape(value.decode("utf-8", "replace")))
