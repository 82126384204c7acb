"""Masking of DataRow values, one row or a whole run of rows at a time. No I/O.

A result set arrives as thousands of DataRows back to back, and taking them one message
at a time cost ~6 us a row in Python. A *run* (the consecutive complete DataRows of one
read) is handled as one block instead:

- content masking: one scan of the whole block for anything the masker could change
  (``Masker.hit_spans``); only the rows a span touches are decoded field by field;
- ``mask_columns``: the values of masked text columns (text format, or a text-like type
  in binary) are rewritten in place by one loop over the block. Masking keeps every
  length, so the framing never changes;
- binary numbers wide enough for a card number (int8, numeric, float8, money) are not
  ASCII digits a scan can find: their values are read column by column as arrays, and
  only the rows holding one of 13 digits or more are decoded;
- columns of other binary types that can hide a number (arrays of numbers, records,
  ranges of numbers, unknown types) and masked binary columns that are not text take
  the per-row path, value by value through relay/pg/values.py.

The result is byte for byte what masking each row alone gives (tests/unit/test_pg_rows.py
checks both against each other with hypothesis).
"""

from __future__ import annotations

import bisect
import struct
from collections import Counter
from collections.abc import Sequence

import numpy as np

from recorder.masking import Masker, digits_possible
from relay.pg import protocol as p
from relay.pg import values
from relay.pg.protocol import RowRun

_I32 = struct.Struct("!i").unpack_from
_I16 = struct.Struct("!h").unpack_from
_DIGITS = b"0123456789"
# mask_columns: every ASCII letter and digit becomes '*', the rest (separators) stays.
_ALNUM_STAR = bytes(
    0x2A if (0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A) else b for b in range(256)
)
# Luhn with byte tables: ASCII digit -> its value, doubled-digit sum for the other half.
_DOUBLED = bytes.maketrans(_DIGITS, bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))
_STARS = [b"*" * n for n in range(20)]
_DOUBLED_NP = np.array((0, 2, 4, 6, 8, 1, 3, 5, 7, 9), dtype=np.int64)
# A mask_columns column in binary whose value the block pass may star in place.
_INPLACE_OIDS = (values.TEXT_OIDS - {values.JSON_OID}) | {values.BYTEA_OID}
_FEW_ROWS = 8


def _be32(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The signed big-endian int32 at each offset."""
    b = buf
    v = (
        (b[at].astype(np.int64) << 24)
        | (b[at + 1].astype(np.int64) << 16)
        | (b[at + 2].astype(np.int64) << 8)
        | b[at + 3].astype(np.int64)
    )
    signed: np.ndarray = np.where(v >= 1 << 31, v - (1 << 32), v)
    return signed


def _be16(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The signed big-endian int16 at each offset."""
    v = (buf[at].astype(np.int64) << 8) | buf[at + 1].astype(np.int64)
    signed: np.ndarray = np.where(v >= 1 << 15, v - (1 << 16), v)
    return signed


def luhn_digits(v: bytes) -> bool:
    """Luhn check of an ASCII digit string (the caller checked ``isdigit``)."""
    odd = v[-1::-2]
    return (sum(odd) - 48 * len(odd) + sum(v[-2::-2].translate(_DOUBLED))) % 10 == 0


def row_bodies(raw: bytes, limit: int) -> list[bytes]:
    """The bodies of the first ``limit`` rows of a run."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw) and len(out) < limit:
        (length,) = _I32(raw, pos + 1)
        out.append(raw[pos + 5 : pos + 1 + length])
        pos += 1 + length
    return out


class RowMasker:
    """Masks the DataRows of one result shape.

    Args:
        masker: the relay's content masker.
        masked: per column, whether ``mask_columns`` names it.
        formats: per column, 0 text or 1 binary (missing columns count as text).
        type_oids: per column, the type OID (used for binary values).
        full: ``masking.style = "full"`` (a card number in a masked column is hidden
            whole instead of keeping bin6-last4).
    """

    def __init__(
        self,
        masker: Masker,
        masked: Sequence[bool] = (),
        formats: Sequence[int] = (),
        type_oids: Sequence[int] = (),
        *,
        full: bool = False,
    ) -> None:
        self.masker = masker
        self.masked = list(masked)
        self.formats = list(formats)
        self.type_oids = list(type_oids)
        self.full = full
        self.any_masked = any(self.masked)
        n = max(len(self.masked), len(self.formats))
        kinds = [values.kind(self._oid(i)) if self._fmt(i) == 1 else "text" for i in range(n)]
        self._text_cols = [
            i
            for i, m in enumerate(self.masked)
            if m and (self._fmt(i) == 0 or self._oid(i) in _INPLACE_OIDS)
        ]
        # Binary numbers, checked by value as arrays in the block pass.
        self._numbers = [(i, self._oid(i)) for i, k in enumerate(kinds) if k == "number"]
        # bytea in the text format is hex: its digits are not the value's.
        self._hex = [self._fmt(i) == 0 and values.hex_text(self._oid(i)) for i in range(n)]
        deep = "deep" in kinds or any(self._hex)
        # Rows that counting ASCII digits cannot clear.
        self._opaque = deep or bool(self._numbers)
        # The block path: masked columns all starred in place, no value that must be
        # walked, custom patterns safe to scan in a block.
        self._block = masker.block_safe and len(self._text_cols) == sum(self.masked) and not deep
        self._customs = bool(masker.policy.patterns)

    def _fmt(self, i: int) -> int:
        return self.formats[i] if i < len(self.formats) else 0

    def _oid(self, i: int) -> int:
        return self.type_oids[i] if i < len(self.type_oids) else 0

    # -- one row -----------------------------------------------------------------

    def mask_row(self, body: bytes, counts: Counter[str] | None = None) -> bytes:
        """Mask a DataRow body. Masking a value mostly keeps its length and it is
        rewritten in place; a value that becomes NULL (a binary number holding a card
        number, a masked binary column that is not text) or an array that loses an
        element to NULL makes the row be framed again."""
        masker = self.masker
        custom = self._customs and (not masker.block_safe or masker.custom_in(body))
        if not self.any_masked and not custom and not self._opaque and not digits_possible(body):
            return body
        end = len(body)
        if end < 2:
            raise p.ProtocolError("malformed DataRow message")
        (n,) = _I16(body, 0)
        pos = 2
        changes: list[tuple[int, int, bytes | None]] = []
        resized = False
        for i in range(n):
            if pos + 4 > end:
                raise p.ProtocolError("malformed DataRow message")
            (length,) = _I32(body, pos)
            pos += 4
            if length < 0:
                continue
            if pos + length > end:
                # A short value would be masked into a row of another length.
                raise p.ProtocolError("malformed DataRow message")
            v = body[pos : pos + length]
            new = self._mask_field(i, v, counts, custom)
            if new is not v and new != v:
                changes.append((pos - 4, length, new))
                resized = resized or new is None or len(new) != length
            pos += length
        if not changes:
            return body
        if resized:
            return values.splice(body, 2, changes)
        out = bytearray(body)
        for at, length, new in changes:
            assert new is not None
            out[at + 4 : at + 4 + length] = new
        return bytes(out)

    def _mask_field(
        self, i: int, v: bytes, counts: Counter[str] | None, custom: bool
    ) -> bytes | None:
        fmt = self._fmt(i)
        if i < len(self.masked) and self.masked[i]:
            if fmt == 0:
                return self.mask_value(v, counts)
            return values.mask_column_binary(self._oid(i), v, self.mask_value, counts)
        if fmt == 0:
            if i < len(self._hex) and self._hex[i]:
                return values.mask_hex_text(v, self.masker, counts)
            new = self.masker.mask_bytes(v, counts, customs=custom)
            if new is v or new == v:
                return v
            oid = self._oid(i)
            if oid in (values.JSON_OID, values.JSONB_OID):
                return values.mask_json(v, self.masker)
            if oid in values.NUMBER_OIDS:
                return None  # a number with stars in it is no number a client can read
            if values.number_array(oid):
                return values.mask_number_array_text(v, self.masker)
            return new
        return values.mask_binary(self._oid(i), v, self.masker, counts)

    def mask_value(self, v: bytes, counts: Counter[str] | None = None) -> bytes:
        """A text value of a ``mask_columns`` column: a card number keeps its
        bin6-last4 form, anything else is hidden whole (same length)."""
        if counts is not None:
            counts["mask_columns"] += 1
        # The common case, a bare card number, without the scanner.
        if 13 <= len(v) <= 19 and v.isdigit():
            if not luhn_digits(v):
                return _STARS[len(v)]
            if counts is not None:
                counts["pan"] += 1
            if self.full:
                return _STARS[len(v)]
            return v[:6] + _STARS[len(v) - 10] + v[-4:]
        masked = self.masker.mask_bytes(v, counts)
        return masked if masked != v else v.translate(_ALNUM_STAR)

    # -- a run of rows -----------------------------------------------------------

    def mask_run(self, run: RowRun, counts: Counter[str] | None = None) -> bytes:
        """Mask every row of a run; the result is framed like the input."""
        raw = run.raw
        # A few rows holding binary numbers: a row at a time costs less than the fixed
        # cost of reading the numbers as arrays.
        if not self._block or (self._numbers and run.nrows <= _FEW_ROWS):
            return self._per_row(raw, counts)
        starts = run.starts
        out: bytearray | bytes = raw
        slow: set[int] = set()
        if self._text_cols:
            if starts is None:
                starts = self._starts(raw)
            out, bad = self._mask_columns(raw, starts, counts)
            slow.update(bad)
        spans = self.masker.hit_spans(bytes(out) if out is not raw else raw)
        again: set[int] = set()
        if spans:
            # Rows a span touches are masked again from their original bytes, whole.
            if starts is None:
                starts = self._starts(raw)
            for s, e in spans:
                first = bisect.bisect_right(starts, s) - 1
                last = bisect.bisect_right(starts, max(s, e - 1)) - 1
                again.update(range(max(first, 0), last + 1))
        if self._numbers:
            if starts is None:
                starts = self._starts(raw)
            again.update(self._number_rows(raw, starts))
        for k in again:
            if k not in slow and counts is not None and self._text_cols:
                # This row's masked columns were counted by the block pass.
                assert starts is not None
                a = starts[k]
                b = starts[k + 1] if k + 1 < len(starts) else len(raw)
                recount: Counter[str] = Counter()
                self._mask_columns_py(raw[a:b], recount)
                counts.subtract(recount)
            slow.add(k)
        if not slow:
            return bytes(out) if out is not raw else raw
        assert starts is not None
        pieces: list[bytes] = []
        prev = 0
        view = memoryview(out)
        for k in sorted(slow):
            a = starts[k]
            b = starts[k + 1] if k + 1 < len(starts) else len(raw)
            pieces.append(view[prev:a].tobytes())
            pieces.append(p.message(b"D", self.mask_row(raw[a + 5 : b], counts)))
            prev = b
        pieces.append(view[prev:].tobytes())
        return b"".join(pieces)

    def _number_rows(self, raw: bytes, starts: list[int]) -> list[int]:
        """Rows whose binary numbers (int8, numeric, float8, money, xid8) could hold a
        card number, found with the columns read as arrays: a value of 13 digits or
        more, or one not laid out as its type says. Rows this walk cannot take
        (malformed, fewer columns) are returned too: the row path decides them."""
        buf = np.frombuffer(raw, dtype=np.uint8)
        s = np.asarray(starts, dtype=np.int64)
        ends = s + 1 + _be32(buf, s + 1)
        ok = ends - s >= 7
        nf = np.where(ok, _be16(buf, np.where(ok, s + 5, 0)), 0)
        oids = dict(self._numbers)
        last = self._numbers[-1][0]
        ok &= nf > last
        f = s + 7
        suspect = np.zeros(len(starts), dtype=bool)
        for i in range(last + 1):
            ok &= f + 4 <= ends
            fi = np.where(ok, f, 0)
            length = _be32(buf, fi)
            pos = fi + 4
            f = pos + np.maximum(length, 0)
            ok &= f <= ends
            oid = oids.get(i)
            if oid is None:
                continue
            if oid == values.NUMERIC_OID:
                head = ok & (length >= 8)
                at = np.where(head, pos, 0)
                weight = _be16(buf, at + 2)
                dscale = _be16(buf, at + 6)
                suspect |= head & ((weight >= 3) | (dscale >= 13))
                suspect |= ok & (length >= 0) & (length < 8)
                continue
            eight = ok & (length == 8)
            at = np.where(eight, pos, 0)
            octets = buf[at[:, None] + np.arange(8)].copy()
            if oid == values.FLOAT8_OID:
                big = np.abs(octets.view(">f8").ravel()) >= float(10**12)
            elif oid == values.XID8_OID:
                big = octets.view(">u8").ravel() >= 10**12
            else:
                n = octets.view(">i8").ravel()
                big = (n >= 10**12) | (n <= -(10**12))
            suspect |= eight & big
            suspect |= ok & (length >= 0) & (length != 8)
        suspect |= ~ok
        return np.flatnonzero(suspect).tolist()

    def _mask_columns(
        self, raw: bytes, starts: list[int], counts: Counter[str] | None
    ) -> tuple[bytearray, list[int]]:
        """Rewrite the masked text columns of every row in place, all rows at once
        (numpy): the rows' fields are walked column by column as arrays, card-number
        shaped values (13-19 digits) are Luhn-checked and starred as arrays; other
        values go through ``mask_value``. Returns the new bytes and the rows this pass
        could not take (malformed, or fewer columns than a masked one): the caller
        masks those alone, which raises ProtocolError for a malformed one."""
        out = bytearray(raw)
        buf = np.frombuffer(raw, dtype=np.uint8)
        s = np.asarray(starts, dtype=np.int64)
        ends = s + 1 + _be32(buf, s + 1)  # the decoder checked each row's frame
        ok = ends - s >= 7
        nf = np.where(ok, _be16(buf, np.where(ok, s + 5, 0)), 0)
        cols = self._text_cols
        last = cols[-1]
        ok &= nf > last
        f = s + 7
        values: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(last + 1):
            ok &= f + 4 <= ends
            fi = np.where(ok, f, 0)
            length = _be32(buf, fi)
            pos = fi + 4
            f = pos + np.maximum(length, 0)
            ok &= f <= ends
            if i in cols:
                values.append((pos, length))
        stars: list[np.ndarray] = []
        slow_values: list[tuple[int, int]] = []
        n_masked = n_pan = 0
        for pos, length in values:
            take = ok & (length >= 0)
            pos, length = pos[take], length[take]
            shaped = (length >= 13) & (length <= 19)
            n_masked += int(np.count_nonzero(shaped))
            for w in np.unique(length[shaped]).tolist():
                at = pos[length == w]
                idx = at[:, None] + np.arange(w)
                digits = buf[idx].astype(np.int64) - 48
                isdigit = ((digits >= 0) & (digits <= 9)).all(axis=1)
                total = digits[:, w - 1 :: -2].sum(axis=1) + _DOUBLED_NP[
                    np.clip(digits[:, w - 2 :: -2], 0, 9)
                ].sum(axis=1)
                valid = isdigit & (total % 10 == 0)
                n_pan += int(np.count_nonzero(valid))
                if self.full:
                    stars.append(idx[isdigit].ravel())
                else:
                    stars.append(idx[isdigit & ~valid].ravel())
                    stars.append(idx[valid][:, 6 : w - 4].ravel())
                # Shaped like a card number but not all digits: the general path.
                n_masked -= int(np.count_nonzero(~isdigit))
                slow_values.extend(
                    zip(at[~isdigit].tolist(), [w] * int((~isdigit).sum()), strict=True)
                )
            other = ~shaped
            slow_values.extend(zip(pos[other].tolist(), length[other].tolist(), strict=True))
        if stars:
            np.frombuffer(out, dtype=np.uint8)[np.concatenate(stars)] = 0x2A
        for a, w in slow_values:
            out[a : a + w] = self.mask_value(raw[a : a + w], counts)
        if counts is not None:
            if n_masked:
                counts["mask_columns"] += n_masked
            if n_pan:
                counts["pan"] += n_pan
        return out, np.flatnonzero(~ok).tolist()

    def _per_row(self, raw: bytes, counts: Counter[str] | None) -> bytes:
        pieces = []
        pos = 0
        n = len(raw)
        while pos < n:
            (length,) = _I32(raw, pos + 1)
            end = pos + 1 + length
            body = raw[pos + 5 : end]
            new = self.mask_row(body, counts)
            pieces.append(raw[pos:end] if new is body else p.message(b"D", new))
            pos = end
        return b"".join(pieces)

    @staticmethod
    def _starts(raw: bytes) -> list[int]:
        starts = []
        pos = 0
        n = len(raw)
        while pos < n:
            starts.append(pos)
            (length,) = _I32(raw, pos + 1)
            pos += 1 + length
        return starts

    def _mask_columns_py(self, raw: bytes, counts: Counter[str] | None) -> bytearray:
        """``_mask_columns`` in plain Python, value by value through ``mask_value``: it
        counts the columns of a row the block pass took before the row was flagged for
        masking alone. Malformed rows raise ProtocolError."""
        out = bytearray(raw)
        cols = self._text_cols
        last = cols[-1]
        pos = 0
        n = len(raw)
        while pos < n:
            (length,) = _I32(raw, pos + 1)
            rend = pos + 1 + length
            if rend - pos < 7:
                raise p.ProtocolError("malformed DataRow message")
            (nf,) = _I16(raw, pos + 5)
            f = pos + 7
            for i in range(nf if nf <= last else last + 1):
                if f + 4 > rend:
                    raise p.ProtocolError("malformed DataRow message")
                (fl,) = _I32(raw, f)
                f += 4
                if fl < 0:
                    continue
                e = f + fl
                if e > rend:
                    raise p.ProtocolError("malformed DataRow message")
                if i in cols:
                    out[f:e] = self.mask_value(raw[f:e], counts)
                f = e
            pos = rend
        return out
