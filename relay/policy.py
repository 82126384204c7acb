"""Access and command policy: which identities reach a target, and what happens to each
command (allow, hold for approval, block). Pure functions over the config."""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from recorder.config import Config, RuleConfig, TargetConfig


@dataclass(frozen=True)
class Decision:
    """What a rule says about a command; ``rule`` is None when nothing matched."""

    action: str
    rule: RuleConfig | None = None

    @property
    def rule_name(self) -> str | None:
        """Name of the deciding rule."""
        return self.rule.name if self.rule else None


ALLOW = Decision("allow")


class ScopedPolicy:
    """The rules of one identity on one target (see ``Policy.scoped``); the first
    match wins, no match means allow."""

    def __init__(self, rules: Sequence[tuple[RuleConfig, re.Pattern[str] | None]]) -> None:
        self._rules = [(rx, frozenset(rule.sql), Decision(rule.action, rule)) for rule, rx in rules]
        self.sql_nodes = frozenset(n for rule, _rx in rules for n in rule.sql)
        """Every parse-tree node name these rules ask about."""

    def decide(
        self, command: str | None = None, sql_nodes: Collection[str] | None = None
    ) -> Decision:
        """Decide a command (SSH exec or shell line, or SQL text with its parse-tree
        node names)."""
        for rx, nodes, decision in self._rules:
            if rx is None and not nodes:
                return decision  # scoped by target/group only
            if rx is not None and command is not None and rx.search(command):
                return decision
            if nodes and sql_nodes is not None and not nodes.isdisjoint(sql_nodes):
                return decision
        return ALLOW


class Policy:
    """Rules evaluated in order; the first match wins; no match means allow."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._targets = {t.name: t for t in cfg.targets}
        self._rules = [(r, re.compile(r.command) if r.command else None) for r in cfg.rules]

    def target(self, name: str) -> TargetConfig | None:
        """The target called ``name``, if any."""
        return self._targets.get(name)

    def can_access(self, groups: Sequence[str], target: TargetConfig) -> bool:
        """True when the identity shares a group with the target. A target without
        groups is reachable by nobody."""
        return bool(set(groups) & set(target.groups))

    def decide(
        self,
        *,
        target: str,
        groups: Sequence[str],
        command: str | None = None,
        sql_nodes: Collection[str] | None = None,
    ) -> Decision:
        """Decide a command (SSH exec or shell line, or SQL text with its parse-tree
        node names) for an identity with ``groups`` on ``target``."""
        return self.scoped(target, groups).decide(command, sql_nodes)

    def scoped(self, target: str, groups: Sequence[str]) -> ScopedPolicy:
        """The rules that can apply to an identity with ``groups`` on ``target``, in
        order: a session picks them once instead of on every statement."""
        gset = set(groups)
        return ScopedPolicy(
            [
                (rule, rx)
                for rule, rx in self._rules
                if (not rule.targets or target in rule.targets)
                and (not rule.groups or gset & set(rule.groups))
            ]
        )

    def rule(self, name: str) -> RuleConfig | None:
        """A rule by name."""
        return next((r for r, _ in self._rules if r.name == name), None)
