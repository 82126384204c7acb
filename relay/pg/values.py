"""PostgreSQL binary-format values by type OID: masking and drawing. No I/O.

Clients such as asyncpg ask for every result column in the binary format, where a card
number is not always a run of ASCII digits: an ``int8`` is eight bytes, a ``numeric``
base-10000 digit groups, an array or a record a tree of length-prefixed values. So a
binary value is decoded by its type before it is masked:

- text-like types (text, varchar, bpchar, name, json, xml, unknown, "char", bytea, and
  jsonb/jsonpath after their version byte) are their bytes: masked in place, same
  length, like text-format values;
- numbers that can hold 13-19 digits (int8, money, xid8, numeric, float8) are decoded;
  one whose digits the masker would change becomes NULL (no number can hold ``*``);
- arrays and records are walked element by element (they carry their element types),
  an element that must become NULL is re-encoded as a NULL element; ranges and
  multiranges (whose bounds cannot be NULL) become NULL whole when a bound would change;
- anything else (an extension's type, an enum, a composite type by its own OID) is
  tried as a record or an array (the formats that describe themselves), else scanned
  as bytes and masked in place.

psycopg supplies the type registry (array, range and multirange OIDs of the built-in
types) and the scalar binary loaders the transcript draws with. The walk that masks is
our own: psycopg's loaders give Python objects and its dumpers would not give back the
same bytes (array lower bounds, numeric scales, records of anonymous types), and a value
without a card number must reach the client byte for byte as the server sent it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from psycopg.adapt import Transformer
from psycopg.postgres import types as _pg_types
from psycopg.pq import Format
from psycopg.types.multirange import MultirangeInfo
from psycopg.types.range import Range, RangeInfo

from recorder.masking import Masker

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_Q = struct.Struct("!q")
_UQ = struct.Struct("!Q")
_D = struct.Struct("!d")
_NUMHEAD = struct.Struct("!hhHh")

TEXT_OID = 25
BYTEA_OID = 17
CHAR_OID = 18
NAME_OID = 19
INT8_OID = 20
JSON_OID = 114
XML_OID = 142
UNKNOWN_OID = 705
FLOAT8_OID = 701
MONEY_OID = 790
BPCHAR_OID = 1042
VARCHAR_OID = 1043
NUMERIC_OID = 1700
RECORD_OID = 2249
JSONB_OID = 3802
JSONPATH_OID = 4072
XID8_OID = 5069

# UTF-8 text in the binary format too.
TEXT_OIDS = frozenset(
    {TEXT_OID, VARCHAR_OID, BPCHAR_OID, NAME_OID, JSON_OID, XML_OID, UNKNOWN_OID, CHAR_OID}
)
# A version byte, then text.
VERSIONED_OIDS = frozenset({JSONB_OID, JSONPATH_OID})
# Wide enough for 13-19 digits.
INT64_OIDS = frozenset({INT8_OID, MONEY_OID})
NUMBER_OIDS = frozenset({INT8_OID, MONEY_OID, XID8_OID, NUMERIC_OID, FLOAT8_OID})

ARRAY_ELEM: dict[int, int] = {}
RANGE_SUB: dict[int, int] = {}
MULTIRANGE_SUB: dict[int, int] = {}
KNOWN_OIDS: set[int] = set()
for _t in _pg_types:
    KNOWN_OIDS.add(_t.oid)
    if _t.array_oid:
        ARRAY_ELEM[_t.array_oid] = _t.oid
        KNOWN_OIDS.add(_t.array_oid)
    if isinstance(_t, RangeInfo):
        RANGE_SUB[_t.oid] = _t.subtype_oid
    elif isinstance(_t, MultirangeInfo):
        MULTIRANGE_SUB[_t.oid] = _t.subtype_oid
ARRAY_ELEM[2287] = RECORD_OID  # record[]

_MAX_DEPTH = 32
_MIN_NUMBER = 10**12  # fewer digits than 13 hold no card number


class Malformed(ValueError):
    """A binary value does not have its type's layout."""


class Unmaskable(ValueError):
    """A value may hold a card number in a form the relay cannot mask without knowing
    its type (an untyped eight-byte field of a binary COPY)."""


# -- classification ------------------------------------------------------------------------


def kind(oid: int) -> str:
    """How a binary column of this type is looked at.

    ``scan``: its card numbers, if any, are ASCII digits inside its bytes, so a scan of
    the whole row block finds them (text-like types, and fixed-width types too narrow
    for 13 digits); ``number``: a number that can hold one (checked by value);
    ``deep``: walked value by value (arrays, ranges, records, unknown types)."""
    if oid in TEXT_OIDS or oid in VERSIONED_OIDS or oid == BYTEA_OID:
        return "scan"
    if oid in NUMBER_OIDS:
        return "number"
    elem = ARRAY_ELEM.get(oid)
    if elem is not None:
        return "scan" if kind(elem) == "scan" else "deep"
    sub = RANGE_SUB.get(oid) or MULTIRANGE_SUB.get(oid)
    if sub is not None:
        return "scan" if kind(sub) == "scan" else "deep"
    if oid in KNOWN_OIDS and oid != RECORD_OID:
        return "scan"  # bool, int2/int4, float4, dates, uuid, inet...: under 13 digits
    return "deep"


def text_like(oid: int) -> bool:
    """A type whose binary value is its text: ``mask_columns`` masks it in place."""
    return oid in TEXT_OIDS or oid == BYTEA_OID


# -- masking -------------------------------------------------------------------------------


def _holds_card(masker: Masker, digits: bytes, counts: Counter[str] | None) -> bool:
    return masker.mask_bytes(digits, counts) != digits


def numeric_text(v: bytes) -> bytes | None:
    """numeric's binary value as numeric_out writes it (None for NaN and infinities)."""
    if len(v) < 8:
        raise Malformed("numeric")
    ndigits, weight, sign, dscale = _NUMHEAD.unpack_from(v, 0)
    if ndigits < 0 or len(v) != 8 + 2 * ndigits or dscale < 0:
        raise Malformed("numeric")
    if sign not in (0, 0x4000):
        if sign in (0xC000, 0xD000, 0xF000) and ndigits == 0:
            return None
        raise Malformed("numeric")
    groups = struct.unpack_from(f"!{ndigits}h", v, 8)
    if any(not 0 <= g < 10000 for g in groups):
        raise Malformed("numeric")
    if weight >= 0:
        ints = [groups[i] if i < ndigits else 0 for i in range(weight + 1)]
        head = str(ints[0]) + "".join(f"{g:04d}" for g in ints[1:])
    else:
        head = "0"
    frac = ""
    if dscale:
        need = (dscale + 3) // 4
        frac = "".join(
            f"{groups[i]:04d}" if 0 <= i < ndigits else "0000"
            for i in range(weight + 1, weight + 1 + need)
        )[:dscale]
    text = ("-" if sign == 0x4000 else "") + head + ("." + frac if frac else "")
    return text.encode()


def mask_json(v: bytes, masker: Masker, counts: Counter[str] | None = None) -> bytes:
    """A JSON document: masked in place while it stays JSON (card numbers in strings);
    a card number written as a JSON number would become ``411111******1111``, no JSON
    at all, so then the document is rebuilt with such numbers as masked strings."""
    new = masker.mask_bytes(v, counts)
    if new is v or new == v:
        return v
    try:
        json.loads(new)
        return new
    except ValueError:
        pass
    try:
        doc = json.loads(v)
    except ValueError:
        return new  # not JSON to begin with: masked as text

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return masker.mask(x)
        if isinstance(x, bool) or x is None:
            return x
        if isinstance(x, int | float):
            t = str(x)
            m = masker.mask(t)
            return m if m != t else x
        if isinstance(x, list):
            return [walk(e) for e in x]
        if isinstance(x, dict):
            return {masker.mask(k): walk(e) for k, e in x.items()}
        return x

    return json.dumps(walk(doc), ensure_ascii=False).encode()


def _mask_number(oid: int, v: bytes, masker: Masker, counts: Counter[str] | None) -> bytes | None:
    if oid in INT64_OIDS or oid == XID8_OID:
        if len(v) != 8:
            raise Malformed("int8")
        n = _UQ.unpack(v)[0] if oid == XID8_OID else abs(_Q.unpack(v)[0])
        if n < _MIN_NUMBER:
            return v
        return None if _holds_card(masker, str(n).encode(), counts) else v
    if oid == FLOAT8_OID:
        if len(v) != 8:
            raise Malformed("float8")
        f = abs(_D.unpack(v)[0])
        # A card number stored as a double is an integer; float8out writes it with an
        # exponent, which no reader takes for a card number, but the value still is one.
        if not math.isfinite(f) or not _MIN_NUMBER <= f < 1e20 or f != int(f):
            return v
        return None if _holds_card(masker, str(int(f)).encode(), counts) else v
    # numeric
    if len(v) >= 8:
        _n, weight, _s, dscale = _NUMHEAD.unpack_from(v, 0)
        if weight < 3 and dscale < 13:
            return v  # fewer than 13 digits on either side of the point
    text = numeric_text(v)
    if text is None:
        return v
    return None if _holds_card(masker, text, counts) else v


def mask_binary(
    oid: int,
    v: bytes,
    masker: Masker,
    counts: Counter[str] | None = None,
    depth: int = 0,
) -> bytes | None:
    """Mask one binary-format value of type ``oid``: the same object when nothing
    changed, new bytes (a container may change length), or None: the value must be
    NULL. A value that does not have its type's layout and holds something the masker
    would change becomes NULL: bytes of unknown structure are not masked in place
    where a length field could be among them."""
    try:
        return _mask(oid, v, masker, counts, depth)
    except (Malformed, struct.error):
        return v if masker.mask_bytes(v) == v else None


def _mask(
    oid: int, v: bytes, masker: Masker, counts: Counter[str] | None, depth: int
) -> bytes | None:
    if depth > _MAX_DEPTH:
        raise Malformed("nested too deep")
    if oid == JSON_OID:
        return mask_json(v, masker, counts)
    if oid in TEXT_OIDS or oid == BYTEA_OID:
        return masker.mask_bytes(v, counts)
    if oid in VERSIONED_OIDS:
        if v[:1] != b"\x01":
            raise Malformed("jsonb version")
        rest = v[1:]
        if oid == JSONB_OID:
            new = mask_json(rest, masker, counts)
        else:
            new = masker.mask_bytes(rest, counts)
        return v if new is rest else b"\x01" + new
    if oid in NUMBER_OIDS:
        return _mask_number(oid, v, masker, counts)
    elem = ARRAY_ELEM.get(oid)
    if elem is not None:
        return _mask_array(v, masker, counts, depth)
    if oid == RECORD_OID:
        return _mask_record(v, masker, counts, depth)
    sub = RANGE_SUB.get(oid)
    if sub is not None:
        return _mask_range(sub, v, masker, counts, depth)
    sub = MULTIRANGE_SUB.get(oid)
    if sub is not None:
        return _mask_multirange(sub, v, masker, counts, depth)
    if oid in KNOWN_OIDS:
        # Fixed layouts under 13 digits wide; their bytes are still scanned (in place
        # would not be safe for every layout, so a hit makes the value NULL).
        return v if masker.mask_bytes(v) == v else None
    return _mask_unknown(v, masker, counts, depth)


def _mask_unknown(
    v: bytes, masker: Masker, counts: Counter[str] | None, depth: int
) -> bytes | None:
    """A type we do not know: a composite type (record layout) or an array of one
    describes itself, a numeric's layout is strict enough to be recognised; anything
    else without a NUL byte is taken for text (enums, citext, ltree) and masked in
    place; with one (hstore, any other binary layout) it becomes NULL if it holds a
    card number."""
    if _looks_like_record(v):
        return _mask_record(v, masker, counts, depth)
    if _looks_like_array(v):
        return _mask_array(v, masker, counts, depth)
    if _looks_like_numeric(v):
        # A domain over numeric inside a record arrives by the domain's OID.
        return _mask_number(NUMERIC_OID, v, masker, counts)
    new = masker.mask_bytes(v, counts)
    if new is v or new == v:
        return v
    # JSON (a binary COPY field, a domain over json) must stay JSON.
    if v[:1] == b"\x01" and v[1:2] in (b"{", b"["):
        return b"\x01" + mask_json(v[1:], masker)
    if v.lstrip()[:1] in (b"{", b"["):
        return mask_json(v, masker)
    # Text holds no NUL; a binary layout we do not know does (in its length fields),
    # and starring a byte of one would corrupt the value: NULL instead.
    return None if b"\x00" in v else new


def _looks_like_numeric(v: bytes) -> bool:
    try:
        numeric_text(v)
    except (Malformed, struct.error):
        return False
    return True


def _looks_like_record(v: bytes) -> bool:
    try:
        _split_record(v)
    except (Malformed, struct.error):
        return False
    return True


def _looks_like_array(v: bytes) -> bool:
    try:
        _split_array(v)
    except (Malformed, struct.error):
        return False
    return True


def _split_record(v: bytes) -> list[tuple[int, int, int]]:
    """(type OID, offset of the length field, length) per field of a record."""
    (n,) = _I32.unpack_from(v, 0)
    if not 0 <= n <= 1664:  # MaxTupleAttributeNumber
        raise Malformed("record")
    pos = 4
    out = []
    for _ in range(n):
        (foid,) = _U32.unpack_from(v, pos)
        (length,) = _I32.unpack_from(v, pos + 4)
        if length < -1 or pos + 8 + max(length, 0) > len(v):
            raise Malformed("record")
        out.append((foid, pos + 4, length))
        pos += 8 + max(length, 0)
    if pos != len(v):
        raise Malformed("record")
    return out


def _split_array(v: bytes) -> tuple[int, int, list[tuple[int, int]]]:
    """(element OID, header length, (offset of the length field, length) per
    element) of an array."""
    (ndim,) = _I32.unpack_from(v, 0)
    (flags,) = _I32.unpack_from(v, 4)
    (elem,) = _U32.unpack_from(v, 8)
    if not 0 <= ndim <= 6 or flags not in (0, 1):
        raise Malformed("array")
    pos = 12
    count = 1 if ndim else 0
    for _ in range(ndim):
        (size,) = _I32.unpack_from(v, pos)
        if size < 0:
            raise Malformed("array")
        count *= size
        pos += 8
    head = pos
    if count > len(v):
        raise Malformed("array")
    out = []
    for _ in range(count):
        (length,) = _I32.unpack_from(v, pos)
        if length < -1 or pos + 4 + max(length, 0) > len(v):
            raise Malformed("array")
        out.append((pos, length))
        pos += 4 + max(length, 0)
    if pos != len(v):
        raise Malformed("array")
    return elem, head, out


def splice(v: bytes, head: int, parts: Sequence[tuple[int, int, bytes | None]]) -> bytes:
    """``v`` with each (offset of a length field, old length, new value) replaced."""
    out = bytearray(v[:head])
    prev = head
    for at, length, new in parts:
        out += v[prev:at]
        if new is None:
            out += _I32.pack(-1)
        else:
            out += _I32.pack(len(new)) + new
        prev = at + 4 + max(length, 0)
    out += v[prev:]
    return bytes(out)


def _mask_array(v: bytes, masker: Masker, counts: Counter[str] | None, depth: int) -> bytes | None:
    elem, head, items = _split_array(v)
    changed: list[tuple[int, int, bytes | None]] = []
    nulled = False
    for at, length in items:
        if length < 0:
            continue
        old = v[at + 4 : at + 4 + length]
        new = _mask(elem, old, masker, counts, depth + 1)
        if new is not old and new != old:
            changed.append((at, length, new))
            nulled = nulled or new is None
    if not changed:
        return v
    out = splice(v, head, changed)
    if nulled:
        out = out[:4] + _I32.pack(1) + out[8:]  # the has-nulls flag
    return out


def _mask_record(v: bytes, masker: Masker, counts: Counter[str] | None, depth: int) -> bytes | None:
    changed: list[tuple[int, int, bytes | None]] = []
    for foid, at, length in _split_record(v):
        if length < 0:
            continue
        old = v[at + 4 : at + 4 + length]
        new = _mask(foid, old, masker, counts, depth + 1)
        if new is not old and new != old:
            changed.append((at, length, new))
    return splice(v, 4, changed) if changed else v


def _range_bounds(v: bytes) -> list[bytes]:
    if not v:
        raise Malformed("range")
    flags = v[0]
    pos = 1
    bounds = []
    if not flags & 0x01:  # not empty
        for inf in (0x08, 0x10):
            if not flags & inf:
                (length,) = _I32.unpack_from(v, pos)
                if length < 0 or pos + 4 + length > len(v):
                    raise Malformed("range")
                bounds.append(v[pos + 4 : pos + 4 + length])
                pos += 4 + length
    if pos != len(v):
        raise Malformed("range")
    return bounds


def _mask_range(
    sub: int, v: bytes, masker: Masker, counts: Counter[str] | None, depth: int
) -> bytes | None:
    for b in _range_bounds(v):
        new = _mask(sub, b, masker, counts, depth + 1)
        if new is not b and new != b:
            return None  # a bound cannot be NULL, nor masked into another order
    return v


def _mask_multirange(
    sub: int, v: bytes, masker: Masker, counts: Counter[str] | None, depth: int
) -> bytes | None:
    (n,) = _I32.unpack_from(v, 0)
    pos = 4
    for _ in range(max(n, 0)):
        (length,) = _I32.unpack_from(v, pos)
        if length < 0 or pos + 4 + length > len(v):
            raise Malformed("multirange")
        if _mask_range(sub, v[pos + 4 : pos + 4 + length], masker, counts, depth + 1) is None:
            return None
        pos += 4 + length
    if n < 0 or pos != len(v):
        raise Malformed("multirange")
    return v


_HEX_RUN = re.compile(rb"\\x((?:[0-9A-Fa-f]{2})+)")


def mask_hex_text(v: bytes, masker: Masker, counts: Counter[str] | None = None) -> bytes:
    """A text-format value that is or may hold a bytea: bytea's text form is ``\\x``
    and hex, whose digits are not the value's, so every such run is decoded, masked
    and written in hex again (same length; hex the text masker starred is written
    again too). Used for bytea, bytea[], records and unknown types in text."""
    out = masker.mask_bytes(v, counts)
    if b"\\x" not in v:
        return out
    buf: bytearray | None = None
    for m in _HEX_RUN.finditer(v):
        raw = bytes.fromhex(m.group(1).decode("ascii"))
        new = masker.mask_bytes(raw, counts)
        if new != raw or out[m.start(1) : m.end(1)] != m.group(1):
            if buf is None:
                buf = bytearray(out)
            buf[m.start(1) : m.end(1)] = new.hex().encode()
    return bytes(buf) if buf is not None else out


def hex_text(oid: int) -> bool:
    """Whether a text-format value of this type can hold a bytea in hex: bytea and
    its arrays, records, arrays of records, and types we do not know (composites)."""
    if oid in (BYTEA_OID, RECORD_OID):
        return True
    elem = ARRAY_ELEM.get(oid)
    if elem is not None:
        return hex_text(elem)
    return oid not in KNOWN_OIDS and oid != 0


_ARRAY_TOKENS = re.compile(rb"([{},])")


def mask_number_array_text(v: bytes, masker: Masker, counts: Counter[str] | None = None) -> bytes:
    """A text-format array of numbers (``{<card number>,7}``): an element holding
    a card number becomes NULL, as a number does in a row (stars are no number)."""
    new = masker.mask_bytes(v, counts)
    if new is v or new == v:
        return v
    return b"".join(
        b"NULL" if len(t) > 1 and masker.mask_bytes(t) != t else t for t in _ARRAY_TOKENS.split(v)
    )


def number_array(oid: int) -> bool:
    """An array type whose elements are numbers wide enough for a card number."""
    elem = ARRAY_ELEM.get(oid)
    return elem is not None and (elem in NUMBER_OIDS or number_array(elem))


def mask_column_binary(
    oid: int, v: bytes, star: Any, counts: Counter[str] | None = None
) -> bytes | None:
    """A binary value of a ``mask_columns`` column: text-like values hidden in place
    by ``star`` (the text-format rule), json as a JSON string of stars of the same
    length (so the client still parses it), anything else NULL."""
    if oid == JSON_OID:
        return json_stars(v, counts)
    if oid in TEXT_OIDS or oid == BYTEA_OID:
        masked: bytes = star(v, counts)
        return masked
    if oid == JSONB_OID and v[:1] == b"\x01":
        return b"\x01" + json_stars(v[1:], counts)
    if counts is not None:
        counts["mask_columns"] += 1
    return None


def json_stars(v: bytes, counts: Counter[str] | None = None) -> bytes:
    """A JSON document of ``len(v)`` bytes that says nothing: a string of stars."""
    if counts is not None:
        counts["mask_columns"] += 1
    n = len(v)
    return b'"' + b"*" * (n - 2) + b'"' if n >= 2 else b"0" * n


# -- drawing (the transcript) ----------------------------------------------------------


_TX = Transformer()


def render(oid: int, v: bytes) -> str:
    """A binary value as psql would show it (near enough for a reader)."""
    try:
        if oid in TEXT_OIDS:
            return v.decode("utf-8", "replace")
        if oid in VERSIONED_OIDS and v[:1] == b"\x01":
            return v[1:].decode("utf-8", "replace")
        if oid == BYTEA_OID:
            return "\\x" + v.hex()
        if oid == NUMERIC_OID:
            t = numeric_text(v)
            return "NaN" if t is None else t.decode()
        if oid not in KNOWN_OIDS:
            if _looks_like_record(v):
                oid = RECORD_OID
            elif _looks_like_array(v):
                return _pg_text(_render_array(v))
            elif _looks_like_numeric(v):
                t = numeric_text(v)
                return "NaN" if t is None else t.decode()
            else:
                return v.decode("utf-8")  # else drawn in hex, below
        if oid in ARRAY_ELEM:
            return _pg_text(_render_array(v))
        if oid == RECORD_OID:
            return _render_record(v)
        return _pg_text(_TX.get_loader(oid, Format.BINARY).load(v))
    except Exception:
        return "\\x" + v.hex()


def _render_array(v: bytes) -> list[str | None]:
    elem, _head, items = _split_array(v)
    return [None if n < 0 else render(elem, v[at + 4 : at + 4 + n]) for at, n in items]


def _render_record(v: bytes) -> str:
    parts = []
    for foid, at, n in _split_record(v):
        if n < 0:
            parts.append("")
        else:
            s = render(foid, v[at + 4 : at + 4 + n])
            parts.append(_quote(s, '(),"\\ ') if s else '""')
    return "(" + ",".join(parts) + ")"


def _quote(s: str, special: str) -> str:
    if any(c in special for c in s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def _pg_text(obj: object) -> str:
    """A loaded Python value in PostgreSQL's text form."""
    if obj is None:
        return "NULL"
    if isinstance(obj, bool):
        return "t" if obj else "f"
    if isinstance(obj, str):
        return obj
    if isinstance(obj, bytes | bytearray | memoryview):
        return "\\x" + bytes(obj).hex()
    if isinstance(obj, Decimal):
        return format(obj, "f")
    if isinstance(obj, float):
        return repr(obj).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(obj, list):
        return (
            "{"
            + ",".join("NULL" if x is None else _quote(_pg_text(x), '{},"\\ ') for x in obj)
            + "}"
        )
    if isinstance(obj, tuple):
        return (
            "(" + ",".join("" if x is None else _quote(_pg_text(x), '(),"\\ ') for x in obj) + ")"
        )
    if isinstance(obj, dt.datetime):
        return obj.isoformat(" ")
    if isinstance(obj, dt.date | dt.time):
        return obj.isoformat()
    if isinstance(obj, Range):
        if obj.isempty:
            return "empty"
        lo = "" if obj.lower is None else _pg_text(obj.lower)
        hi = "" if obj.upper is None else _pg_text(obj.upper)
        return f"{obj.bounds[0]}{lo},{hi}{obj.bounds[1]}"
    if isinstance(obj, dict):
        return json.dumps(obj)
    return str(obj)


# -- wire pieces the relay hands us ---------------------------------------------------------


def bind_params(body: bytes) -> tuple[list[int], list[bytes | None]]:
    """The parameter formats (one per parameter) and values of a Bind body."""
    pos = body.index(b"\0") + 1
    pos = body.index(b"\0", pos) + 1
    (nfmt,) = _I16.unpack_from(body, pos)
    if nfmt < 0:
        raise Malformed("Bind")
    fmts = list(struct.unpack_from(f"!{nfmt}h", body, pos + 2))
    pos += 2 + 2 * nfmt
    (n,) = _I16.unpack_from(body, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(max(n, 0)):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        if pos + length > len(body):
            raise Malformed("Bind")
        values.append(body[pos : pos + length])
        pos += length
    if nfmt == 0:
        fmts = [0] * len(values)
    elif nfmt == 1:
        fmts = fmts * len(values)
    elif nfmt != len(values):
        raise Malformed("Bind")
    return fmts, values


def parameter_types(body: bytes) -> tuple[int, ...]:
    """The OIDs of a ParameterDescription."""
    (n,) = _I16.unpack_from(body, 0)
    return struct.unpack_from(f"!{max(n, 0)}I", body, 2)


# -- COPY ... TO STDOUT (FORMAT binary) --------------------------------------------------

_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


class CopyBinaryMasker:
    """Masks a binary COPY stream field by field. No RowDescription comes for COPY, so
    each field is an untyped value (``mask_binary`` with OID 0: a record, an array or a
    numeric recognised by their layouts, anything else scanned as bytes in place). The
    stream's framing into CopyData messages is free, so complete tuples are released
    and a tuple cut between two messages waits for its end.

    A binary int8 or float8 field cannot be told from a timestamp or any other eight
    bytes, so it can be neither masked nor made NULL without corrupting other data: an
    eight-byte field that, read as int8 or as float8, is a card number raises
    ``Unmaskable`` (the relay ends the session; a text or csv COPY is masked by
    content). Other eight-byte fields pass."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self._buf = b""
        self._header = True
        self._done = False

    def feed(self, data: bytes, counts: Counter[str] | None = None) -> bytes:
        """The masked complete part of what has come so far."""
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        if self._header:
            if n < 19:
                self._buf = buf
                return b""
            if buf[:11] != _COPY_SIGNATURE:
                raise Malformed("COPY binary signature")
            (ext,) = _I32.unpack_from(buf, 15)
            if ext < 0:
                raise Malformed("COPY binary header")
            if n < 19 + ext:
                self._buf = buf
                return b""
            pos = 19 + ext
            out.append(buf[:pos])
            self._header = False
        while pos + 2 <= n and not self._done:
            (nf,) = _I16.unpack_from(buf, pos)
            if nf == -1:
                out.append(buf[pos : pos + 2])
                pos += 2
                self._done = True
                break
            if nf < 0:
                raise Malformed("COPY binary tuple")
            fields: list[tuple[int, int, bytes | None]] = []
            f = pos + 2
            complete = True
            for _ in range(nf):
                if f + 4 > n:
                    complete = False
                    break
                (length,) = _I32.unpack_from(buf, f)
                if length < -1:
                    raise Malformed("COPY binary field")
                if f + 4 + max(length, 0) > n:
                    complete = False
                    break
                if length > 0:
                    v = buf[f + 4 : f + 4 + length]
                    if length == 8 and self._eight_bytes_hold_a_card(v):
                        raise Unmaskable("an eight-byte field of a binary COPY")
                    new = mask_binary(0, v, self.masker, counts)
                    if new is not v and new != v:
                        fields.append((f - pos, length, new))
                f += 4 + max(length, 0)
            if not complete:
                break
            row = buf[pos:f]
            out.append(splice(row, 2, fields) if fields else row)
            pos = f
        if self._done and pos < n:
            raise Malformed("data after the COPY binary trailer")
        self._buf = buf[pos:]
        return b"".join(out)

    def _eight_bytes_hold_a_card(self, v: bytes) -> bool:
        for oid in (INT8_OID, FLOAT8_OID):
            with contextlib.suppress(Malformed):
                if _mask_number(oid, v, self.masker, None) is None:
                    return True
        return False

    def finish(self) -> bytes:
        """What is left at CopyDone (nothing, in a well-formed stream): held bytes
        that are no tuple are scanned as bytes."""
        rest, self._buf = self._buf, b""
        return self.masker.mask_bytes(rest)
