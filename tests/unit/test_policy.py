"""Rule evaluation and target access."""

from __future__ import annotations

from pathlib import Path

from recorder.config import parse_config
from relay.policy import Policy

CFG = """
[[targets]]
name = "web"
kind = "ssh"
address = "10.0.0.5:22"
groups = ["agents", "sre"]
[[targets]]
name = "closed"
kind = "ssh"
address = "10.0.0.6:22"
[[rules]]
name = "no-drop"
sql = ["DropdbStmt"]
action = "block"
[[rules]]
name = "push"
command = '^git-receive-pack'
targets = ["gitsrv"]
groups = ["agents"]
action = "approve"
[[rules]]
name = "restart"
command = 'systemctl (restart|stop)'
action = "approve"
approvers = ["sre"]
timeout = "10m"
[[rules]]
name = "prod-everything"
targets = ["prod"]
action = "approve"
"""


def policy() -> Policy:
    return Policy(parse_config(CFG, Path("/etc/castgate/castgate.toml")))


def test_first_match_wins_and_no_match_allows() -> None:
    p = policy()
    d = p.decide(target="web", groups=["agents"], command="sudo systemctl restart app")
    assert (d.action, d.rule_name) == ("approve", "restart")
    assert d.rule is not None and d.rule.timeout == 600.0
    assert p.decide(target="web", groups=["agents"], command="uptime").action == "allow"


def test_rule_scoping_by_target_and_group() -> None:
    p = policy()
    push = "git-receive-pack '/srv/repo.git'"
    assert p.decide(target="gitsrv", groups=["agents"], command=push).rule_name == "push"
    assert p.decide(target="gitsrv", groups=["sre"], command=push).action == "allow"
    assert p.decide(target="web", groups=["agents"], command=push).action == "allow"
    # A rule with neither command nor sql covers everything on its targets.
    assert p.decide(target="prod", groups=["x"], command="ls").rule_name == "prod-everything"


def test_sql_rules_need_parse_nodes() -> None:
    p = policy()
    assert p.decide(target="web", groups=["a"], command="DROP DATABASE x").action == "allow"
    d = p.decide(target="db", groups=["a"], command="drop database x", sql_nodes={"DropdbStmt"})
    assert d.rule_name == "no-drop"


def test_target_access_by_group() -> None:
    p = policy()
    web, closed = p.target("web"), p.target("closed")
    assert web is not None and closed is not None
    assert p.can_access(["agents"], web)
    assert not p.can_access(["contractors"], web)
    assert not p.can_access(["agents", "sre"], closed)  # no groups: nobody
    assert p.target("nope") is None


def _target_policy(extra: str, rules: str = "") -> Policy:
    text = f"""
[[targets]]
name = "web"
kind = "ssh"
address = "10.0.0.5:22"
groups = ["agents"]
{extra}
{rules}
"""
    return Policy(parse_config(text, Path()))


def test_default_block_is_allowlist_mode() -> None:
    p = _target_policy(
        'default = "block"',
        '[[rules]]\nname = "uptime"\ncommand = "^uptime$"\naction = "allow"',
    )
    assert p.decide(target="web", groups=["agents"], command="uptime").action == "allow"
    d = p.decide(target="web", groups=["agents"], command="rm x")
    assert d.action == "block"
    assert d.rule_name == "castgate:default"
    # An allow-only target still has something to enforce: opaque commands are held.
    assert p.scoped("web", ["agents"]).opaque("parse error").action == "approve"


def test_opaque_is_approved_where_rules_apply_and_allowed_where_none_do() -> None:
    bare = _target_policy("")
    assert bare.scoped("web", ["agents"]).opaque("eval").action == "allow"
    ruled = _target_policy("", '[[rules]]\nname = "x"\ncommand = "^rm"\naction = "block"')
    d = ruled.scoped("web", ["agents"]).opaque("eval")
    assert (d.action, d.rule_name, d.reason) == ("approve", "castgate:opaque", "eval")
    strict = _target_policy('opaque = "block"')
    assert strict.scoped("web", ["agents"]).opaque("eval").action == "block"
