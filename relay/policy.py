"""Access and command policy: which identities reach a target, and what happens to each
command (allow, hold for approval, block). Pure functions over the config."""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import regex

from recorder.config import Config, RuleConfig, TargetConfig
from relay.k8s.request import K8sRequest
from relay.k8s.rules import matches_any
from relay.shell_parse import SimpleCommand, analyze


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
REFUSED = "castgate:refused"
"""A Kubernetes request the target's settings refuse (port-forward, proxy)."""
_BUILTINS = frozenset({DEFAULT, OPAQUE})


_SEVERITY = {"allow": 0, "approve": 1, "block": 2}


def _worst(decisions: Iterable[Decision]) -> Decision:
    """The most severe decision (block > approve > allow); the first among equals."""
    best: Decision | None = None
    for d in decisions:
        if best is None or _SEVERITY[d.action] > _SEVERITY[best.action]:
            best = d
    return best if best is not None else ALLOW


class _Match(Enum):
    NO = 0
    YES = 1
    MAYBE = 2
    """Only words known at run time (``$opt``, what ``xargs`` appends) stand between
    the command and a match."""


def _tokens(args: Iterable[str]) -> frozenset[str]:
    """Arguments with short option clusters split (``-rf`` = ``-r -f``); long options
    as given; after ``--`` every word is an operand."""
    out: set[str] = set()
    ended = False
    for a in args:
        if ended or a == "-" or not a.startswith("-"):
            out.add(a)
        elif a == "--":
            ended = True
        elif a.startswith("--"):
            out.add(a)
        else:
            out.update("-" + c for c in a[1:])
    return frozenset(out)


# A regex that is only literal words (``^rm -rf``, ``git push``): also read as argv.
_LITERAL_WORDS = re.compile(
    r"\^?([A-Za-z0-9_@%+=:,./][A-Za-z0-9_@%+=:,./-]*(?: [A-Za-z0-9_@%+=:,./-]+)*)\$?"
)


@dataclass(frozen=True)
class _ShellMatcher:
    """One rule as it applies to a simple command."""

    rx: re.Pattern[str] | None
    partial: regex.Pattern[str] | None
    program: str | None
    required: frozenset[str]
    catch_all: bool
    restricts: bool
    """A block or approve rule: when in doubt it matches (an allow rule never does)."""

    def match(self, cmd: SimpleCommand) -> _Match:
        if self.catch_all:
            return _Match.YES
        if self.rx is not None:
            joined = " ".join(cmd.argv)
            if self.rx.search(joined):
                return _Match.YES
            if cmd.argv[:1] != (cmd.program,) and self.rx.search(
                " ".join((cmd.program, *cmd.argv[1:]))
            ):
                return _Match.YES
        if self.program is not None and self._program_is(cmd):
            if self.required <= _tokens(cmd.argv[1:]):
                return _Match.YES
            if self.restricts and cmd.unknown:
                return _Match.MAYBE
        if self.restricts and cmd.unknown and self.rx is not None and self._partial(cmd):
            return _Match.MAYBE
        return _Match.NO

    def _program_is(self, cmd: SimpleCommand) -> bool:
        # A path names that file (an allowed script elsewhere is another program); a
        # bare name is any program of that name.
        if self.program is not None and "/" in self.program:
            return bool(cmd.argv) and posixpath.normpath(cmd.argv[0]) == self.program
        return cmd.program == self.program

    def _partial(self, cmd: SimpleCommand) -> bool:
        """Could the rendering match once its first unknown word is expanded?"""
        first = cmd.unknown[0]
        known: list[str] = []
        for word in (cmd.program, *cmd.argv[1:]):
            if word == first:
                break
            known.append(word)
        prefix = " ".join(known) + " "
        if self.partial is None:
            return True
        m = self.partial.search(prefix, partial=True)
        return m is not None and m.start() < len(prefix) and m.end() == len(prefix)


@lru_cache(maxsize=1024)
def _shell_matcher(
    command: str | None, argv: tuple[str, ...], action: str, has_sql: bool
) -> _ShellMatcher:
    restricts = action != "allow"
    rx = re.compile(command) if command else None
    partial: regex.Pattern[str] | None = None
    program: str | None = None
    required: frozenset[str] = frozenset()
    if command:
        try:
            partial = regex.compile(command)
        except regex.error:
            partial = None  # fall back to "may match" whenever words are unknown
        literal = _LITERAL_WORDS.fullmatch(command)
        if literal and restricts:
            # Widening is safe only for a rule that restricts: `^rm -rf` then also
            # stops `rm -fr`, `rm -r -f`, `/bin/rm -rf`; an allow rule stays as written.
            words = literal.group(1).split(" ")
            program, required = posixpath.basename(words[0]), _tokens(words[1:])
    if argv:
        program = posixpath.normpath(argv[0]) if "/" in argv[0] else argv[0]
        required = _tokens(argv[1:])
    return _ShellMatcher(
        rx,
        partial,
        program,
        required,
        catch_all=not command and not argv and not has_sql,
        restricts=restricts,
    )


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
        self._shell = [
            (
                _shell_matcher(rule.command, tuple(rule.argv), rule.action, bool(rule.sql)),
                Decision(rule.action, rule),
            )
            for rule, _rx in rules
            if rule.command or rule.argv or not rule.sql
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
        searched by ``command`` regexes).

        A block or approve rule's ``sql`` nodes match anywhere in the tree. An allow
        rule's match one statement kind at a time: every kind of statement the text holds
        (``WITH d AS (DELETE ...) SELECT ...`` holds a DeleteStmt and a SelectStmt) is
        decided on its own and the most severe decision wins, so an allow rule for
        SelectStmt does not let a DELETE inside a SELECT through in allowlist mode."""
        if sql_nodes is None:
            # (Every statement a rule needs no tree for, on the PostgreSQL fast path.)
            for rx, nodes, has_argv, decision in self._rules:
                if rx is None and not nodes and not has_argv:
                    return decision
                if rx is not None and command is not None and rx.search(command):
                    return decision
            return self.default
        units = [n for n in sql_nodes if n.endswith("Stmt") and n != "RawStmt"]
        if not units:
            return self._decide_unit(command, sql_nodes, None)
        return _worst(self._decide_unit(command, sql_nodes, u) for u in sorted(units))

    def _decide_unit(
        self, command: str | None, sql_nodes: Collection[str] | None, unit: str | None
    ) -> Decision:
        for rx, nodes, has_argv, decision in self._rules:
            if rx is None and not nodes and not has_argv:
                return decision  # scoped by target/group only
            if rx is not None and command is not None and rx.search(command):
                return decision
            if not nodes or sql_nodes is None:
                continue
            if decision.action == "allow" and unit is not None:
                qualified = {n for n in sql_nodes if n.startswith(unit + ":")}
                if unit in nodes or not nodes.isdisjoint(qualified):
                    return decision
            elif not nodes.isdisjoint(sql_nodes):
                return decision
        return self.default

    def decide_shell(self, command: str) -> Decision:
        """Decide an SSH exec command or shell line: each simple command found anywhere
        in it by the rules in order (first match wins; none: the target's ``default``),
        what cannot be understood as ``opaque``; the most severe decision wins."""
        analysis = analyze(command)
        decisions = []
        for cmd in analysis.commands:
            decision = self.decide_simple(cmd)
            if cmd.speculative and (decision.rule is None or decision.rule.name in _BUILTINS):
                continue  # only what a rule says about it counts
            decisions.append(decision)
        if analysis.opaque_structure is not None:
            decisions.append(self.opaque(analysis.opaque_structure))
        if not decisions:
            # Nothing runs (a comment, an assignment): only a rule that covers
            # everything on the target applies.
            return next((d for m, d in self._shell if m.catch_all), ALLOW)
        return _worst(decisions)

    def decide_simple(self, cmd: SimpleCommand) -> Decision:
        """Decide one simple command."""
        decision = self.default
        for matcher, rule_decision in self._shell:
            found = matcher.match(cmd)
            if found is _Match.YES:
                decision = rule_decision
                break
            if found is _Match.MAYBE:
                assert rule_decision.rule is not None
                decision = self.opaque(
                    f"{cmd.program} with {cmd.unknown[0]} (known only at run time) may match"
                    f" rule {rule_decision.rule.name}"
                )
                break
        if cmd.opaque is not None and not (
            decision.action == "allow" and decision.rule is not None
        ):
            # Only an allow rule naming this command vouches for what it hides.
            decision = _worst([decision, self.opaque(cmd.opaque)])
        return decision


class Policy:
    """Rules evaluated in order; the first match wins; no match means the target's
    ``default``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._targets = {t.name: t for t in cfg.targets}
        # A k8s rule is about Kubernetes requests only: to the SSH and SQL paths, a rule
        # without command, argv or sql would otherwise be a catch-all.
        self._rules = [
            (r, re.compile(r.command) if r.command else None) for r in cfg.rules if not r.k8s
        ]
        self._all_rules = [(r, re.compile(r.command) if r.command else None) for r in cfg.rules]

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
        return next((r for r, _ in self._all_rules if r.name == name), None)

    def scoped_k8s(self, target: str, groups: Sequence[str]) -> K8sScopedPolicy:
        """The rules that can apply to ``groups`` on the Kubernetes ``target``, in order
        (k8s rules, catch-alls, and command rules for exec commands)."""
        gset = set(groups)
        return K8sScopedPolicy(
            [
                (rule, rx)
                for rule, rx in self._all_rules
                if (not rule.targets or target in rule.targets)
                and (not rule.groups or gset & set(rule.groups))
            ],
            self._targets.get(target),
        )

    def decide_k8s(self, *, target: str, groups: Sequence[str], request: K8sRequest) -> Decision:
        """Decide a classified Kubernetes request for ``groups`` on ``target``."""
        return self.scoped_k8s(target, groups).decide(request)


class K8sScopedPolicy:
    """The rules of one identity on one Kubernetes target (see ``Policy.scoped_k8s``).

    A request is decided by the first rule whose ``k8s`` patterns name it, or that names
    nothing but its targets and groups (a catch-all); none: the target's ``default``. An
    exec's command is also decided by the ``command``/``argv`` rules through the shell
    parser, as an SSH exec would be, and the more severe decision wins; only what such a
    rule (or an opaque command) says counts there, so that ``allow exec:pods@dev`` in
    allowlist mode is not undone by the default."""

    def __init__(
        self,
        rules: Sequence[tuple[RuleConfig, re.Pattern[str] | None]],
        target: TargetConfig | None,
    ) -> None:
        self._target = target
        self._base = ScopedPolicy(rules, target)
        self._request_rules = [
            (rule, Decision(rule.action, rule))
            for rule, _rx in rules
            if rule.k8s or not (rule.command or rule.argv or rule.sql)
        ]
        # The command check counts only what a command rule (or an opaque command)
        # says: with the default set aside, an unmatched command is a plain allow.
        lenient = (
            target.model_copy(update={"default": "allow", "opaque": self._base._opaque_action})
            if target is not None
            else None
        )
        self._commands = ScopedPolicy(
            [(rule, rx) for rule, rx in rules if rule.command or rule.argv], lenient
        )

    def decide(self, request: K8sRequest) -> Decision:
        """Decide one classified request."""
        if request.kind == "discovery":
            return ALLOW  # kubectl's negotiation before every command, no cluster data
        if request.kind == "opaque":
            return self._base.opaque(f"unclassified request: {request.reason}")
        refused = self._refused(request)
        if refused is not None:
            return refused
        decision = self._base.default
        for rule, rule_decision in self._request_rules:
            if not rule.k8s or matches_any(
                tuple(rule.k8s), request, restricts=rule.action != "allow"
            ):
                decision = rule_decision
                break
        if request.verb == "exec" and request.command:
            by_command = self._commands.decide_shell(shlex.join(request.command))
            decision = _worst([decision, by_command])
        return decision

    def _refused(self, request: K8sRequest) -> Decision | None:
        target = self._target
        if request.verb == "portforward" and not (target and target.allow_port_forward):
            why = "port-forward is off for this target (allow_port_forward)"
        elif request.verb == "proxy" and not (target and target.allow_proxy):
            why = "the proxy subresource is off for this target (allow_proxy)"
        else:
            return None
        return Decision("block", _builtin(REFUSED, "block"), why)
