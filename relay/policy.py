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
    reason: str | None = None
    """Why the relay decided without a user rule (an opaque command, the default)."""

    @property
    def rule_name(self) -> str | None:
        """Name of the deciding rule."""
        return self.rule.name if self.rule else None


ALLOW = Decision("allow")

DEFAULT = "castgate:default"
OPAQUE = "castgate:opaque"


def _builtin(name: str, action: str) -> RuleConfig:
    # Built-in rules carry no approver groups: anyone in the approver role may decide.
    return RuleConfig.model_validate({"name": name, "action": action})


class ScopedPolicy:
    """The rules of one identity on one target (see ``Policy.scoped``); the first
    match wins, no match means the target's ``default`` (allow unless set)."""

    def __init__(
        self,
        rules: Sequence[tuple[RuleConfig, re.Pattern[str] | None]],
        target: TargetConfig | None = None,
    ) -> None:
        self._rules = [
            (rx, frozenset(rule.sql), bool(rule.argv), Decision(rule.action, rule))
            for rule, rx in rules
        ]
        self.sql_nodes = frozenset(n for rule, _rx in rules for n in rule.sql)
        """Every parse-tree node name these rules ask about."""
        default = target.default if target is not None else "allow"
        self.default = (
            ALLOW if default == "allow" else Decision(default, _builtin(DEFAULT, default), DEFAULT)
        )
        """What no rule matches gets."""
        self.enforcing = bool(rules) or default != "allow"
        """True when anything is enforced here: a rule applies, or the default is not
        allow. Where nothing is, an opaque command has nothing to be checked against."""
        opaque = target.opaque if target is not None else None
        if opaque is None:
            opaque = "approve" if self.enforcing else "allow"
        self._opaque_action = opaque

    def opaque(self, reason: str) -> Decision:
        """The decision for a command the relay cannot parse or follow; ``reason`` says
        why, in words a refusal and the command log can quote."""
        action = self._opaque_action
        if action == "allow":
            return Decision("allow", None, reason)
        return Decision(action, _builtin(OPAQUE, action), reason)

    def decide(
        self, command: str | None = None, sql_nodes: Collection[str] | None = None
    ) -> Decision:
        """Decide a command (SQL text with its parse-tree node names, or a plain text
        searched by ``command`` regexes)."""
        for rx, nodes, has_argv, decision in self._rules:
            if rx is None and not nodes and not has_argv:
                return decision  # scoped by target/group only
            if rx is not None and command is not None and rx.search(command):
                return decision
            if nodes and sql_nodes is not None and not nodes.isdisjoint(sql_nodes):
                return decision
        return self.default

    def decide_shell(self, command: str) -> Decision:
        """Decide an SSH exec command or shell line."""
        return self.decide(command)


class Policy:
    """Rules evaluated in order; the first match wins; no match means the target's
    ``default``."""

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

    def decide_shell(self, *, target: str, groups: Sequence[str], command: str) -> Decision:
        """Decide an SSH exec command or shell line for ``groups`` on ``target``."""
        return self.scoped(target, groups).decide_shell(command)

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
            ],
            self._targets.get(target),
        )

    def rule(self, name: str) -> RuleConfig | None:
        """A rule by name."""
        return next((r for r, _ in self._rules if r.name == name), None)
