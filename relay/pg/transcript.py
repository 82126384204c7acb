"""A PostgreSQL session rendered as a psql-like terminal transcript, so auditors replay
database sessions like shell sessions: prompt with the target name, the query, the
masked result table, the row count or error, and the timing.

Only the first ``max_rows`` rows of a result are drawn (a million-row result would
bloat the cast without helping anyone read it); the row count is always exact and the
structured query log in the store has every statement.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.pg.protocol import parse_data_row
from relay.pg.rows import row_bodies

_MAX_CELL = 60


def _cell(value: bytes | None, fmt: int) -> str:
    if value is None:
        return ""
    if fmt == 1:
        return f"\\x{value[:16].hex()}" + ("..." if len(value) > 16 else "")
    text = value.decode("utf-8", "replace").replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 3] + "..."


class Transcript:
    """Builds transcript text; the caller writes it into the cast as output.

    This runs for every statement (thousands a second under load), so the common
    shapes are cheap: names and formats are taken as given (tuples the relay keeps per
    result shape), and a table's header lines are built once per shape and width."""

    def __init__(self, target: str, max_rows: int = 100) -> None:
        self.prompt = f"{target}=> "
        self.max_rows = max_rows
        self._names: Sequence[str] = ()
        self._formats: Sequence[int] = ()
        self._rows: list[list[str]] = []
        self._count = 0
        self._heads: dict[tuple[Sequence[str], tuple[int, ...]], str] = {}

    def banner(self, identity: str, database: str) -> str:
        """First lines of the cast."""
        return f"castgate: {identity} connected to {database}\r\n"

    def query(self, text: str) -> str:
        """The prompt and the (already masked) statement."""
        return self.prompt + text.replace("\n", "\r\n") + "\r\n"

    def columns(self, names: Sequence[str], formats: Sequence[int]) -> None:
        """A result set starts."""
        self._names = names
        self._formats = formats
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
            self._rows.append([_cell(v, fmts[i] if i < n else 0) for i, v in enumerate(values)])

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
            text = tag + "\r\n" if tag else ""
        self._names = ()
        self._rows = []
        self._count = 0
        return f"{text}Time: {elapsed_ms:.3f} ms\r\n\r\n"

    def error(self, severity: str, message: str, detail: str | None) -> str:
        """An error or notice as psql prints it."""
        text = f"{severity}:  {message}\r\n"
        if detail:
            text += f"DETAIL:  {detail}\r\n"
        self._names = ()
        self._rows = []
        return text
