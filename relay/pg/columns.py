"""Which columns of a result are masked, and how: the prepared statements and portals a
session has made (their texts, parameter types and descriptions), and the
RowDescriptions, command tags and single values the target sends, matched against the
target's ``mask_columns`` once per distinct shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import Format

from recorder.masking import Masker
from relay.pg import protocol as p
from relay.pg.copymask import MaskTable
from relay.pg.requests import Execute
from relay.pg.rows import RowMasker

# Return types whose binary form is their text (masked in place) or raw bytes.
_TEXT_LIKE = frozenset((17, 18, 19, 25, 114, 142, 705, 1042, 1043, 3802))
# Cached shapes per session: a client cycling through more shapes than this is
# re-matched, never unbounded.
_CACHE = 256


@dataclass
class Columns:
    """One result shape: how its rows are masked and what the transcript draws."""

    rows: RowMasker
    names: tuple[str, ...]
    formats: tuple[int, ...]


class Prepared:
    """The session's prepared statements and portals, as the client made them."""

    def __init__(self) -> None:
        self.stmt_text: dict[str, str] = {}  # masked, as the transcript and log keep it
        self.stmt_raw: dict[str, str] = {}  # (only on targets with mask_columns, for COPY)
        self.stmt_types: dict[str, tuple[int, ...]] = {}
        self.stmt_desc: dict[str, list[p.Field] | None] = {}
        self.portal_desc: dict[str, list[p.Field] | None] = {}
        self.portal_stmt: dict[str, tuple[str, tuple[int, ...]]] = {}
        # For the transcript: each portal's Bind (its parameters).
        self.portal_bind: dict[str, bytes] = {}
        # Portals whose description the relay has asked for or seen asked.
        self.described: set[str] = set()

    def parse(self, parse: p.Parse, kept: str, raw: bool) -> None:
        self.stmt_text[parse.name] = kept
        self.stmt_types[parse.name] = parse.param_types
        if raw:
            self.stmt_raw[parse.name] = parse.query

    def bind(self, body: bytes) -> None:
        bind = p.parse_bind(body)
        self.portal_stmt[bind.portal] = (bind.statement, bind.result_formats)
        self.portal_bind[bind.portal] = body
        self.described.discard(bind.portal)

    def described_as(self, kind: str, name: str, fields: list[p.Field] | None) -> None:
        (self.stmt_desc if kind == "S" else self.portal_desc)[name] = fields


class ColumnMasking:
    """Matches result shapes against ``mask_columns`` (``keys``: table OID, column
    number) and masks what names and tags the target sends."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self.full = masker.policy.style == "full"
        self.keys: set[tuple[int, int]] = set()
        # Tables holding mask_columns, by name (for COPY TO STDOUT).
        self.copy_tables: dict[str, list[MaskTable]] = {}
        # Rows of a result whose shape is unknown: masked by content only.
        self.plain_rows = RowMasker(masker, full=self.full)
        # RowDescriptions repeat (the same statements run again and again): parsed and
        # matched once per distinct message; command tags too. With the body to send
        # instead when a name or tag had to be masked.
        self.descriptions: dict[bytes, tuple[list[p.Field], Columns | None, bytes | None]] = {}
        self.completes: dict[bytes, tuple[str, int | None, bytes | None]] = {}
        self._exec_cols: dict[tuple[Any, ...], tuple[list[p.Field], Columns]] = {}

    def columns_for(self, fields: list[p.Field]) -> Columns:
        keys = self.keys
        masked = (
            [(f.table_oid, f.attnum) in keys for f in fields] if keys else [False] * len(fields)
        )
        formats = tuple(f.format for f in fields)
        return Columns(
            rows=RowMasker(
                self.masker, masked, formats, [f.type_oid for f in fields], full=self.full
            ),
            names=tuple(f.name for f in fields),
            formats=formats,
        )

    def row_description(self, body: bytes) -> tuple[list[p.Field], Columns | None, bytes | None]:
        """Fields of a RowDescription with their names masked (a column can be named
        after a card number: ``SELECT 1 AS "4111..."``), and the masked body to send
        if any name changed. Cached per distinct body."""
        seen = self.descriptions.get(body)
        if seen is not None:
            return seen
        mask = self.masker.mask_bytes
        masked = None if mask(body) is body else p.map_row_description_names(body, mask)
        if masked is body:
            masked = None
        fields = p.parse_row_description(body if masked is None else masked)
        return fields, None, masked

    def remember(self, body: bytes, fields: list[p.Field], masked: bytes | None) -> Columns:
        """The columns of a RowDescription that answers a statement (not a Describe)."""
        cols = self.columns_for(fields)
        if len(self.descriptions) < _CACHE:
            self.descriptions[body] = (fields, cols, masked)
        return cols

    def command_complete(self, body: bytes) -> tuple[str, int | None, bytes | None]:
        done = self.completes.get(body)
        if done is None:
            masked = self.masker.mask_bytes(body)
            tag, count = p.parse_command_complete(masked)
            done = tag, count, None if masked is body else masked
            if len(self.completes) < _CACHE:
                self.completes[body] = done
        return done

    def execute_columns(self, ex: Execute, prepared: Prepared) -> Columns | None:
        """The columns of an Execute whose RowDescription went to a Describe. A
        prepared statement runs again and again: matched once per description and
        result formats, not per Execute."""
        fields = prepared.portal_desc.get(ex.portal)
        key: tuple[Any, ...]
        if fields is not None:
            source: list[p.Field] = fields
            key = ("P", ex.portal)
        else:
            desc = prepared.stmt_desc.get(ex.statement)
            if desc is None:
                return None
            source = desc
            key = ("S", ex.statement, tuple(ex.formats))
        hit = self._exec_cols.get(key)
        if hit is not None and hit[0] is source:
            return hit[1]
        cols = self.columns_for(
            source if fields is not None else p.with_formats(source, ex.formats)
        )
        if len(self._exec_cols) >= _CACHE:
            self._exec_cols.clear()
        self._exec_cols[key] = (source, cols)
        return cols

    def mask_value(self, value: bytes | None, type_oid: int, fmt: int) -> bytes | None:
        """One value of a known type and format, masked: text (and binary text-like
        types) in place, other binary values decoded by psycopg's loader and NULL when
        their text holds a match, unknown ones scanned as bytes."""
        if value is None:
            return None
        mask = self.masker.mask_bytes
        if fmt == 0 or type_oid in _TEXT_LIKE:
            masked = mask(value)
            return value if masked == value else masked
        loader = psycopg.adapters.get_loader(type_oid, Format.BINARY)
        if loader is None:
            masked = mask(value)
            return value if masked == value else masked
        try:
            text = str(loader(type_oid).load(value))
        except Exception:  # a value psycopg cannot read is not shown
            return None
        return value if self.masker.mask(text) == text else None
