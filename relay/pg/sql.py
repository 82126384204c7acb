"""What a SQL text contains, for the statement policy: pglast node names found anywhere
in the parse tree (inside CTEs, EXPLAIN, PREPARE, ...) plus the ``:no-where``
qualifier for DELETE and UPDATE without a WHERE clause, per top-level statement.

Fail closed: on a target where anything is enforced, a text pglast cannot parse is never
passed as "nothing a rule asks about" (``UNPARSED``): pglast's grammar (PostgreSQL 17)
and the target's differ, and ``DROP TABLE t; <what pglast rejects>`` must not run
because the DROP was never seen.

Building pglast's Python tree costs tens of microseconds, so two shortcuts keep the relay
fast: results are cached by query text, and a statement whose text cannot contain any
node a rule asks about is not turned into a tree. That keyword test is sound because an
SQL keyword is always spelt out in the text (dynamic SQL inside a string is invisible to
the parser too); such a text is still parsed by libpg_query's C parser alone
(``pglast.parser.split``, about a microsecond for a pgbench statement, 20 ms for 1 MB)
to know that it parses.

Turning a tree into Python is not free: up to ~20 microseconds a byte on the relay's
event loop for dense statements (a 1 MB SELECT list took 22 s here). A statement a rule
needs parsed that is longer than ``MAX_PARSE_CHARS`` is therefore refused (rule
``castgate:statement-too-long``) rather than passed unchecked, and so is one longer than
``MAX_CHECK_CHARS`` on an enforcing target; only short texts are cached.

Pinned settings: the relay reads statements as UTF-8 with standard-conforming strings,
and the target must too (see relay/pg/relay.py, "One encoding"). A statement that would
set ``client_encoding`` or ``standard_conforming_strings`` to anything else (``SET``,
``SET NAMES``, ``set_config`` with constant arguments, a function's ``SET`` clause) is
found here (``PINNED``); what no parser can see (a function calling ``set_config``) is
caught by the relay from the target's ParameterStatus.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import VariableSetKind
from pglast.parser import ParseError, split
from pglast.visitors import Visitor

from recorder.config import RuleConfig

MAX_PARSE_CHARS = 64 * 1024
MAX_CHECK_CHARS = 4 * 1024 * 1024
_CACHE_MAX_CHARS = 4096
TOO_LONG = "castgate:statement-too-long"
# The refusal of a statement too long to check: a block by this built-in rule.
TOO_LONG_RULE = RuleConfig(name=TOO_LONG, action="block")
UNPARSED = "castgate:unparsed"
"""The built-in rule of a statement the parser rejects (the target's ``unparsed``)."""
UNPARSED_RULES = {a: RuleConfig(name=UNPARSED, action=a) for a in ("block", "approve")}
PINNED = "castgate:pinned-setting"
"""The built-in rule refusing a change of a setting the relay pins."""
PINNED_RULE = RuleConfig(name=PINNED, action="block")
FUNCTION_CALL = "castgate:function-call"
"""The built-in rule refusing the FunctionCall message where a target does not allow it."""
FUNCTION_CALL_RULE = RuleConfig(name=FUNCTION_CALL, action="block")

_UTF8 = frozenset(("utf8", "unicode"))
_ON = frozenset(("on", "true", "yes", "1"))


def _norm_encoding(value: str) -> str:
    # As PostgreSQL compares encoding names: case and punctuation do not count.
    return "".join(c for c in value.lower() if c.isalnum())


def setting_ok(name: str, value: str) -> bool:
    """True when ``value`` of the pinned setting ``name`` is the one the relay reads with
    (always True for a setting that is not pinned)."""
    name = name.lower()
    if name == "client_encoding":
        return _norm_encoding(value) in _UTF8
    if name == "standard_conforming_strings":
        return value.strip().lower() in _ON
    return True


PINNED_SETTINGS = ("client_encoding", "standard_conforming_strings")
PINNED_VALUES = {"client_encoding": "UTF8", "standard_conforming_strings": "on"}
# A statement changing a pinned setting contains one of: client_encoding, names (SET
# NAMES), standard_conforming_strings, set_config, or u& (a Unicode-escaped identifier
# or string spells a name without its letters); see ``SqlGate.check``.

# Keywords one of which must appear in the text for the statement node to be present.
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "DropdbStmt": ("drop",),
    "DropStmt": ("drop",),
    "DropRoleStmt": ("drop",),
    "DropOwnedStmt": ("drop",),
    "DeleteStmt": ("delete",),
    "UpdateStmt": ("update",),
    "InsertStmt": ("insert",),
    "MergeStmt": ("merge",),
    "TruncateStmt": ("truncate",),
    "AlterTableStmt": ("alter",),
    "AlterRoleStmt": ("alter",),
    "GrantStmt": ("grant", "revoke"),
    "GrantRoleStmt": ("grant", "revoke"),
    "CopyStmt": ("copy",),
    "CreateStmt": ("create",),
    "CreateRoleStmt": ("create",),
    "CreatedbStmt": ("create",),
    "VacuumStmt": ("vacuum", "analyze"),
    "ExplainStmt": ("explain",),
    "TransactionStmt": (
        "begin",
        "commit",
        "rollback",
        "start",
        "end",
        "abort",
        "savepoint",
        "release",
        "prepare",
    ),
    "VariableSetStmt": ("set", "reset"),
    "DoStmt": ("do",),
    "CallStmt": ("call",),
    "LockStmt": ("lock",),
    "PrepareStmt": ("prepare",),
    "ExecuteStmt": ("execute",),
    "SelectStmt": ("select", "values", "table", "with"),
}


@dataclass(frozen=True)
class Analysis:
    """What the parser found in one SQL text."""

    nodes: frozenset[str]
    statements: int
    error: str | None = None
    per_statement: tuple[frozenset[str], ...] = ()
    """Node names of each top-level statement (a multi-statement text is decided
    statement by statement: ``SELECT 1; DROP ...`` is not "a SelectStmt")."""
    pinned: str | None = None
    """Why a statement would change a pinned setting, if one would."""


@dataclass(frozen=True)
class Check:
    """The gate's verdict on one text: node names per statement (None: no rule could
    care), or a problem (``TOO_LONG``, ``UNPARSED``, ``PINNED``) and why."""

    nodes: tuple[frozenset[str], ...] | None = None
    problem: str | None = None
    reason: str | None = None


NOTHING = Check()


def _const_str(node: Any) -> str | None:
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return str(node.val.sval)
    return None


class _Collector(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: set[str] = set()
        self.pinned: str | None = None

    def visit(self, ancestors: Any, node: Any) -> None:
        name = type(node).__name__
        self.nodes.add(name)
        if isinstance(node, ast.DeleteStmt | ast.UpdateStmt) and node.whereClause is None:
            self.nodes.add(f"{name}:no-where")
        elif isinstance(node, ast.VariableSetStmt):
            self._set(node)
        elif isinstance(node, ast.FuncCall):
            self._set_config(node)

    def _set(self, node: ast.VariableSetStmt) -> None:
        # RESET, SET ... TO DEFAULT and FROM CURRENT go back to the session's start value,
        # which the relay pinned: only an explicit value can change it.
        setting = (node.name or "").lower()
        if setting not in PINNED_SETTINGS or node.kind != VariableSetKind.VAR_SET_VALUE:
            return
        values = [_const_str(a) for a in node.args or ()]
        if len(values) != 1 or values[0] is None or not setting_ok(setting, values[0]):
            self.pinned = f"{setting} is pinned to {PINNED_VALUES[setting]} by the relay"

    def _set_config(self, node: ast.FuncCall) -> None:
        fname = node.funcname[-1] if node.funcname else None
        if not isinstance(fname, ast.String) or (fname.sval or "").lower() != "set_config":
            return
        args = node.args or ()
        setting = _const_str(args[0]) if args else None
        # A name computed at run time is left to the ParameterStatus check.
        if setting is None or setting.lower() not in PINNED_SETTINGS:
            return
        value = _const_str(args[1]) if len(args) > 1 else None
        if value is None or not setting_ok(setting, value):
            low = setting.lower()
            self.pinned = f"{low} is pinned to {PINNED_VALUES[low]} by the relay"


def analyze(text: str) -> Analysis:
    """Parse ``text`` (any number of statements) and collect node names; short texts
    are cached (a cache of long ones could hold gigabytes)."""
    return _analyze_cached(text) if len(text) <= _CACHE_MAX_CHARS else _analyze(text)


@lru_cache(maxsize=16384)
def _analyze_cached(text: str) -> Analysis:
    return _analyze(text)


def _analyze(text: str) -> Analysis:
    try:
        stmts = parse_sql(text)
    except ParseError as exc:
        return Analysis(frozenset(), 0, str(exc))
    every: set[str] = set()
    each = []
    pinned = None
    for stmt in stmts:
        collector = _Collector()
        collector(stmt)
        every |= collector.nodes
        each.append(frozenset(collector.nodes))
        pinned = pinned or collector.pinned
    return Analysis(frozenset(every), len(stmts), None, tuple(each), pinned)


def parse_error(text: str) -> str | None:
    """Why libpg_query's parser rejects ``text``, or None when it parses (no Python tree
    is built: a microsecond for a short statement)."""
    return _parse_error_cached(text) if len(text) <= _CACHE_MAX_CHARS else _parse_error(text)


@lru_cache(maxsize=16384)
def _parse_error_cached(text: str) -> str | None:
    return _parse_error(text)


def _parse_error(text: str) -> str | None:
    try:
        split(text, with_parser=True)
    except ParseError as exc:
        return str(exc)
    return None


class SqlGate:
    """Decides cheaply how much of a text must be parsed for the configured rules: not
    at all (no rule, nothing enforced, no pinned setting named), for validity only (no
    node a rule asks about can be there), or into node names."""

    def __init__(self, rule_nodes: Iterable[str], enforcing: bool = False) -> None:
        words: set[str] = set()
        self.always = False
        for node in rule_nodes:
            base = node.split(":", 1)[0]
            kws = _KEYWORDS.get(base)
            if kws is None:
                self.always = True  # a node we have no keyword for: parse everything
            else:
                words.update(kws)
        self.enforcing = enforcing
        """Every text must parse (the target enforces something)."""
        # A few substring tests of the lowercased text: several times cheaper than one
        # case-insensitive alternation (this runs for every statement).
        self._words = tuple(sorted(words))

    def check(self, text: str) -> Check:
        """The verdict on ``text`` (see ``Check``)."""
        low = text.lower()
        # (Loops and ``or`` chains: generator expressions cost more than the tests.)
        care = self.always
        if not care:
            for w in self._words:
                if w in low:
                    care = True
                    break
        pin = (
            "set_config" in low
            or "client_encoding" in low
            or "names" in low
            or "standard_conforming_strings" in low
            or "u&" in low
        )
        if not care and not pin:
            if not self.enforcing:
                return NOTHING
            if len(text) > MAX_CHECK_CHARS:
                return Check(None, TOO_LONG, "too long to check")
            error = parse_error(text)
            return NOTHING if error is None else Check(None, UNPARSED, error)
        if len(text) > MAX_PARSE_CHARS:
            if not care and not self.enforcing:
                # Only a pinned setting's name: left to the ParameterStatus check.
                return NOTHING
            if not care and len(text) <= MAX_CHECK_CHARS:
                error = parse_error(text)
                return NOTHING if error is None else Check(None, UNPARSED, error)
            return Check(None, TOO_LONG, "too long to check")
        found = analyze(text)
        if found.error is not None:
            if self.enforcing:
                return Check(None, UNPARSED, found.error)
            # Nothing else is enforced here, but whether a pinned setting changes is.
            return Check(None, PINNED, f"cannot check the statement ({found.error})")
        if found.pinned is not None:
            return Check(found.per_statement, PINNED, found.pinned)
        return Check(found.per_statement if care else None)

    def nodes(self, text: str) -> frozenset[str] | None:
        """Node names of ``text`` if a rule could care, else None; ``{TOO_LONG}`` when a
        rule could care but the text is too long to parse."""
        chk = self.check(text)
        if chk.problem == TOO_LONG:
            return frozenset((TOO_LONG,))
        if chk.nodes is None:
            return None
        return frozenset().union(*chk.nodes)


# -- COPY TO STDOUT: which columns of its rows ``mask_columns`` cover ------------------


@dataclass(frozen=True)
class CopyOut:
    """A ``COPY ... TO STDOUT`` statement, as far as masking its rows needs: the table and
    columns, or (``table`` None) the relations a ``COPY (query)`` reads, and the format."""

    schema: str | None
    table: str | None
    columns: tuple[str, ...] | None
    reads: frozenset[str]
    format: str = "text"
    delimiter: str = "\t"
    quote: str = '"'
    escape: str = '"'
    header: bool = False


class _Relations(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def visit(self, ancestors: Any, node: Any) -> None:
        if isinstance(node, ast.RangeVar) and node.relname:
            self.names.add(node.relname)


def _copy_options(options: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for opt in options or ():
        if not isinstance(opt, ast.DefElem) or not opt.defname:
            continue
        arg = opt.arg
        value = ""
        if isinstance(arg, ast.String):
            value = arg.sval or ""
        elif isinstance(arg, ast.Boolean):
            value = "true" if arg.boolval else "false"
        elif arg is None:
            value = "true"
        out[opt.defname.lower()] = value
    return out


def copies_out(text: str) -> list[CopyOut] | None:
    """The ``COPY ... TO STDOUT`` statements of ``text``, in order; None when it does not
    parse (or is too long to)."""
    if len(text) > MAX_PARSE_CHARS:
        return None
    try:
        stmts = parse_sql(text)
    except ParseError:
        return None
    found = []
    for raw in stmts:
        stmt = raw.stmt
        if not isinstance(stmt, ast.CopyStmt) or stmt.is_from or stmt.filename is not None:
            continue
        opts = _copy_options(stmt.options)
        fmt = opts.get("format", "text").lower()
        delimiter = opts.get("delimiter", "," if fmt == "csv" else "\t")
        quote = opts.get("quote", '"')
        header = opts.get("header", "false").lower() not in ("false", "off", "0", "no")
        reads = _Relations()
        if stmt.query is not None:
            reads(stmt.query)
        rel = stmt.relation
        found.append(
            CopyOut(
                rel.schemaname if rel is not None else None,
                rel.relname if rel is not None else None,
                tuple(str(c.sval) for c in stmt.attlist) if stmt.attlist else None,
                frozenset(reads.names),
                fmt,
                delimiter,
                quote,
                opts.get("escape", quote),
                header,
            )
        )
    return found


# -- statements that read the same whatever the pinned settings -----------------------

# Lead bytes of two-byte characters in Shift JIS (the rest of 0x80-0xFF are single).
_SJIS_LEAD = frozenset([*range(0x81, 0xA0), *range(0xE0, 0xFD)])
_GLUED = re.compile(rb"[\x80-\xff][\x21-\x7e]")


def _swallows(raw: bytes, width: Callable[[bytes, int], int]) -> bool:
    """True when a multibyte character, as ``width`` (the server's mblen for one
    encoding) cuts ``raw``, takes in an ASCII byte."""
    i = 0
    n = len(raw)
    while i < n:
        w = width(raw, i)
        if w > 1 and any(b < 0x80 for b in raw[i + 1 : i + w]):
            return True
        i += w
    return False


def _sjis(raw: bytes, i: int) -> int:
    return 2 if raw[i] in _SJIS_LEAD else 1


def _highbit(raw: bytes, i: int) -> int:  # GBK, UHC, BIG5
    return 2 if raw[i] >= 0x80 else 1


def _euc(raw: bytes, i: int) -> int:  # JOHAB
    b = raw[i]
    return 3 if b == 0x8F else (2 if b >= 0x80 else 1)


def _gb18030(raw: bytes, i: int) -> int:
    if raw[i] < 0x80:
        return 1
    nxt = raw[i + 1] if i + 1 < len(raw) else 0
    return 4 if 0x30 <= nxt <= 0x39 else 2


def reads_the_same(raw: bytes) -> bool:
    """True when the statement bytes ``raw`` split into the same tokens under every
    client_encoding PostgreSQL offers and with standard_conforming_strings off: no
    multibyte character of SJIS, GBK, UHC, BIG5, JOHAB or GB18030 would take in an
    ASCII byte (a quote, a backslash, a semicolon), and no backslash stands before a
    quote (the only place where a backslash escape moves a string's end)."""
    if b"\\'" in raw:
        return False
    if raw.isascii() or _GLUED.search(raw) is None:
        return True  # (an ASCII byte a character could take in follows a high byte)
    return not any(_swallows(raw, w) for w in (_sjis, _highbit, _euc, _gb18030))
