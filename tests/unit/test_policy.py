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
