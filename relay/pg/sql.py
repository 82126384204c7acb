"""What a SQL text contains, for the statement policy: pglast node names found anywhere
in the parse tree (inside CTEs, EXPLAIN, PREPARE, ...) plus the ``:no-where``
qualifier for DELETE and UPDATE without a WHERE clause.

Parsing costs tens of microseconds, so two shortcuts keep the relay fast: results are
cached by query text, and a statement whose text cannot contain any node a rule asks
about is not parsed at all. That keyword test is sound because an SQL keyword is always
spelt out in the text (dynamic SQL inside a string is invisible to the parser too).

Parsing is not free: up to ~20 microseconds a byte on the relay's event loop for dense
statements (a 1 MB SELECT list took 22 s here). A statement a rule needs parsed that is
longer than ``MAX_PARSE_CHARS`` is therefore refused (rule ``castgate:statement-too-long``)
rather than passed unchecked, and only short texts are cached.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.visitors import Visitor

from recorder.config import RuleConfig

MAX_PARSE_CHARS = 64 * 1024
_CACHE_MAX_CHARS = 4096
TOO_LONG = "castgate:statement-too-long"
# The refusal of a statement too long to check: a block by this built-in rule.
TOO_LONG_RULE = RuleConfig(name=TOO_LONG, action="block")

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


class _Collector(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: set[str] = set()

    def visit(self, ancestors: Any, node: Any) -> None:
        name = type(node).__name__
        self.nodes.add(name)
        if isinstance(node, ast.DeleteStmt | ast.UpdateStmt) and node.whereClause is None:
            self.nodes.add(f"{name}:no-where")


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
    collector = _Collector()
    for stmt in stmts:
        collector(stmt)
    return Analysis(frozenset(collector.nodes), len(stmts), None)


class SqlGate:
    """Decides cheaply whether a text needs parsing for the configured rules."""

    def __init__(self, rule_nodes: Iterable[str]) -> None:
        words: set[str] = set()
        self.always = False
        for node in rule_nodes:
            base = node.split(":", 1)[0]
            kws = _KEYWORDS.get(base)
            if kws is None:
                self.always = True  # a node we have no keyword for: parse everything
            else:
                words.update(kws)
        self.enabled = bool(words) or self.always
        # A few substring tests of the lowercased text: several times cheaper than one
        # case-insensitive alternation (this runs for every statement).
        self._words = tuple(sorted(words))

    def nodes(self, text: str) -> frozenset[str] | None:
        """Node names of ``text`` if a rule could care, else None (nothing to match);
        ``{TOO_LONG}`` when a rule could care but the text is too long to parse."""
        if not self.enabled:
            return None
        if not self.always:
            low = text.lower()
            if not any(w in low for w in self._words):
                return None
        if len(text) > MAX_PARSE_CHARS:
            return frozenset((TOO_LONG,))
        return analyze(text).nodes
