"""``mask_columns`` in COPY TO STDOUT rows (text and CSV formats): which fields of each
row belong to a masked column, and those fields masked in place. No I/O.

The server sends one row per CopyData message. A COPY of a table (pg_dump's ``COPY
public.cards (id, pan) TO stdout``) names its columns, or means all of them in order;
a ``COPY (query)`` reading a table with masked columns, or a COPY statement the relay
cannot read, has every field masked: the relay cannot tell which field comes from the
masked column, and a starred field is better than a leaked one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from relay.pg.sql import CopyOut


@dataclass(frozen=True)
class MaskTable:
    """A table holding ``mask_columns``: its schema, columns in order, masked ones."""

    schema: str
    columns: tuple[str, ...]
    masked: frozenset[str]


@dataclass
class CopyPlan:
    """Which fields of a COPY's rows to mask (``every``: all of them) and how its rows
    are split."""

    positions: frozenset[int]
    every: bool
    csv: bool = False
    delimiter: int = 0x09
    quote: int = 0x22
    escape: int = 0x22
    header: bool = False
    _rows: int = field(default=0, repr=False)

    def mask_row(self, row: bytes, mask_value: Callable[[bytes], bytes]) -> bytes:
        """``row`` with its masked fields passed through ``mask_value`` (NULLs stay)."""
        self._rows += 1
        if self.header and self._rows == 1:
            return row  # column names, not data
        end = len(row) - 1 if row.endswith(b"\n") else len(row)
        spans = self._split(row, end)
        out = bytearray()
        pos = 0
        for i, (s, e) in enumerate(spans):
            if not (self.every or i in self.positions):
                continue
            value = row[s:e]
            if (value == b"\\N" and not self.csv) or (self.csv and not value):
                continue  # NULL
            out += row[pos:s]
            out += mask_value(value)
            pos = e
        if not out:
            return row
        out += row[pos:]
        return bytes(out)

    def _split(self, row: bytes, end: int) -> list[tuple[int, int]]:
        delim = self.delimiter
        special = self.quote if self.csv else 0x5C
        if special not in row[:end]:
            # Nothing quoted or escaped: every delimiter byte separates fields.
            spans = []
            start = 0
            find = row.find
            while True:
                at = find(bytes((delim,)), start, end)
                if at < 0:
                    spans.append((start, end))
                    return spans
                spans.append((start, at))
                start = at + 1
        return self._split_csv(row, end) if self.csv else self._split_text(row, end)

    def _split_text(self, row: bytes, end: int) -> list[tuple[int, int]]:
        spans = []
        start = i = 0
        while i < end:
            c = row[i]
            if c == 0x5C:  # a backslash escapes the next byte (a delimiter in the data)
                i += 2
                continue
            if c == self.delimiter:
                spans.append((start, i))
                start = i + 1
            i += 1
        spans.append((start, end))
        return spans

    def _split_csv(self, row: bytes, end: int) -> list[tuple[int, int]]:
        spans = []
        start = i = 0
        quoted = False
        q, esc, delim = self.quote, self.escape, self.delimiter
        while i < end:
            c = row[i]
            if quoted:
                if c == esc and esc != q and i + 1 < end and row[i + 1] in (q, esc):
                    i += 2
                    continue
                if c == q:
                    if esc == q and i + 1 < end and row[i + 1] == q:
                        i += 2
                        continue
                    quoted = False
            elif c == q:
                quoted = True
            elif c == delim:
                spans.append((start, i))
                start = i + 1
            i += 1
        spans.append((start, end))
        return spans


def _byte(value: str, default: int) -> int:
    raw = value.encode()
    return raw[0] if len(raw) == 1 else default


def plan(copy: CopyOut | None, tables: Mapping[str, Sequence[MaskTable]]) -> CopyPlan | None:
    """The plan for one COPY TO STDOUT (None: no masked column in it); ``copy`` None
    when the statement could not be read (every field is masked)."""
    if copy is None:
        return CopyPlan(frozenset(), every=True)
    csv = copy.format == "csv"
    quote = _byte(copy.quote, 0x22)

    def make(positions: frozenset[int], every: bool) -> CopyPlan:
        return CopyPlan(
            positions,
            every,
            csv=csv,
            delimiter=_byte(copy.delimiter, 0x2C if csv else 0x09),
            quote=quote,
            escape=_byte(copy.escape, quote),
            header=copy.header,
        )

    if copy.table is None:
        return make(frozenset(), True) if any(n in tables for n in copy.reads) else None
    positions: set[int] = set()
    for table in _candidates(copy, tables):
        cols: Iterable[str] = copy.columns if copy.columns is not None else table.columns
        positions.update(i for i, c in enumerate(cols) if c in table.masked)
    return make(frozenset(positions), False) if positions else None


def _candidates(copy: CopyOut, tables: Mapping[str, Sequence[MaskTable]]) -> list[MaskTable]:
    # An unqualified name may be any schema's table of that name (the session's
    # search_path decides): each is taken, masking more rather than less.
    found = tables.get(copy.table or "", ())
    return [t for t in found if copy.schema is None or t.schema == copy.schema]
