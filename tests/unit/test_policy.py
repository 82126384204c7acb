"""Rule evaluation and target access."""

from __future__ import annotations

from pathlib import Path

import pytest

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


SHELL_RULES = """
[[rules]]
name = "no-rm-rf"
command = '^rm -rf'
action = "block"
[[rules]]
name = "restart"
command = 'systemctl (restart|stop)'
action = "approve"
[[rules]]
name = "no-shred"
argv = ["shred", "-u"]
action = "block"
[[rules]]
name = "manage"
argv = ["python3", "manage.py"]
action = "allow"
"""


def _shell(command: str, extra: str = "", rules: str = SHELL_RULES) -> tuple[str, str | None]:
    d = _target_policy(extra, rules).decide_shell(target="web", groups=["agents"], command=command)
    return d.action, d.rule_name


@pytest.mark.parametrize(
    "command",
    [
        "rm -rf x",
        "true; rm -rf x",
        "sh -c 'rm -rf x'",
        "echo $(rm -rf x)",
        "env rm -rf x",
        "rm -fr x",
        "rm -r -f x",
        "rm x -rf",
        "rm -rfv x",
        "/bin/rm -rf x",
        "'rm' -rf x",
        "r\\m -rf x",
        "sudo -u root rm -rf x",
        "ls | xargs rm -rf",
        "find . -exec rm -rf {} +",
        "sh -c \"bash -c 'rm -rf x'\"",
        "eval 'rm -rf x'",
    ],
)
def test_regex_of_literal_words_stops_every_spelling(command: str) -> None:
    assert _shell(command) == ("block", "no-rm-rf")


@pytest.mark.parametrize(
    "command",
    ["shred -u f", "shred -uz f", "shred -z -u f", "nice shred -n 1 -u f", "shred -- -u"],
)
def test_argv_rule(command: str) -> None:
    assert _shell(command) == ("block", "no-shred")


@pytest.mark.parametrize("command", ["shred f", "shred -z f", "echo shred -u", "shred --u f"])
def test_argv_rule_needs_every_element(command: str) -> None:
    assert _shell(command) == ("allow", None)


def test_double_dash_ends_options() -> None:
    # After `--`, `-rf` is a file name, not options.
    assert _shell("rm -- -rf")[0] == "allow"


@pytest.mark.parametrize(
    "command",
    ["sudo systemctl restart app", "true && systemctl stop app", "/usr/bin/systemctl restart x"],
)
def test_regex_rule_on_each_simple_command(command: str) -> None:
    assert _shell(command) == ("approve", "restart")


@pytest.mark.parametrize(
    "command",
    ["o=-rf; rm $o x", 'rm "$o" x', "rm * x", "echo -rf x | xargs rm", "systemctl $verb app"],
)
def test_words_known_only_at_run_time_that_may_match_are_opaque(command: str) -> None:
    d = _target_policy("", SHELL_RULES).decide_shell(
        target="web", groups=["agents"], command=command
    )
    assert (d.action, d.rule_name) == ("approve", "castgate:opaque")
    assert d.reason is not None and "may match" in d.reason


@pytest.mark.parametrize(
    "command",
    ["ls", "git status", "rm x", "rm /tmp/*.o", "echo rm", "ls $HOME", "grep -r foo . | head"],
)
def test_harmless_commands_allowed(command: str) -> None:
    assert _shell(command) == ("allow", None)


def test_allow_rule_vouches_for_the_command_it_names() -> None:
    assert _shell("python3 manage.py migrate") == ("allow", "manage")
    assert _shell("python3 other.py") == ("approve", "castgate:opaque")
    # ...but not for the rest of the text.
    assert _shell("python3 manage.py; eval x") == ("approve", "castgate:opaque")
    assert _shell("python3 manage.py && rm -rf /") == ("block", "no-rm-rf")


def test_structural_opaque_is_not_vouched_for() -> None:
    allow_sh = '[[rules]]\nname = "sh"\nargv = ["sh"]\naction = "allow"'
    assert _shell("sh", rules=allow_sh) == ("allow", "sh")
    assert _shell("curl -s x | sh", rules=allow_sh) == ("approve", "castgate:opaque")


def test_severity_block_beats_approve_beats_allow() -> None:
    assert _shell("systemctl restart a; rm -rf b; ls") == ("block", "no-rm-rf")
    assert _shell("ls; systemctl restart a") == ("approve", "restart")
    assert _shell("eval x; rm -rf b") == ("block", "no-rm-rf")


def test_allowlist_mode_on_shell_commands() -> None:
    rules = (
        '[[rules]]\nname = "ls"\nargv = ["ls"]\naction = "allow"\n'
        '[[rules]]\nname = "status"\ncommand = "^git status$"\naction = "allow"'
    )
    assert _shell("ls -la", 'default = "block"', rules) == ("allow", "ls")
    assert _shell("git status", 'default = "block"', rules) == ("allow", "status")
    # An allow regex is taken as written: it is never widened.
    assert _shell("git status -uall", 'default = "block"', rules)[0] == "block"
    assert _shell("ls; rm x", 'default = "block"', rules) == ("block", "castgate:default")
    assert _shell("ls $(rm x)", 'default = "block"', rules) == ("block", "castgate:default")
    assert _shell("sudo ls", 'default = "block"', rules) == ("block", "castgate:default")
    assert _shell("eval ls", 'default = "block"', rules)[0] == "block"
    # Nothing runs: nothing to refuse.
    assert _shell("# note", 'default = "block"', rules) == ("allow", None)


def test_opaque_on_a_target_without_rules_is_allowed() -> None:
    assert _shell("eval x", rules="")[0] == "allow"
    assert _shell("eval x", 'opaque = "block"', rules="") == ("block", "castgate:opaque")


def test_catch_all_rule_still_covers_every_shell_command() -> None:
    p = policy()
    d = p.decide_shell(target="prod", groups=["x"], command="ls")
    assert d.rule_name == "prod-everything"
    assert p.decide_shell(target="prod", groups=["x"], command="# x").rule_name == "prod-everything"
    # A SQL-only rule says nothing about shell commands.
    assert p.decide_shell(target="web", groups=["x"], command="dropdb x").action == "allow"


def test_opaque_decision_carries_its_reason() -> None:
    d = _target_policy("", SHELL_RULES).decide_shell(
        target="web", groups=["agents"], command="curl x | bash"
    )
    assert d.action == "approve" and d.reason is not None and "bash" in d.reason


@pytest.mark.parametrize(
    "command", ["((rm -rf x))", "rm=1 rf=2 x=3; ((rm -rf /x))", "ls; ((rm -rf /\\x))"]
)
def test_what_dash_would_run_counts_for_rules(command: str) -> None:
    # dash runs `((cmd))` as two nested subshells; bash evaluates arithmetic.
    assert _shell(command) == ("block", "no-rm-rf")


def test_what_dash_would_run_does_not_count_otherwise() -> None:
    rules = '[[rules]]\nname = "ls"\nargv = ["ls"]\naction = "allow"'
    assert _shell("i=0; ((i++)); ls", 'default = "block"', rules) == ("allow", "ls")


def test_argv_with_a_path_names_that_file() -> None:
    rules = '[[rules]]\nname = "hc"\nargv = ["/opt/app/bin/hc.sh"]\naction = "allow"'
    assert _shell("/opt/app/bin/hc.sh -v", 'default = "block"', rules) == ("allow", "hc")
    assert _shell("/opt/app/bin/../bin/hc.sh", 'default = "block"', rules) == ("allow", "hc")
    # A script of the same name elsewhere (one the agent wrote) is another program.
    assert _shell("./hc.sh", 'default = "block"', rules)[0] == "block"
    assert _shell("hc.sh", 'default = "block"', rules)[0] == "block"


def test_sql_allow_rules_allow_one_statement_kind_at_a_time() -> None:
    from relay.pg.sql import analyze as analyze_sql

    p = _target_policy(
        'default = "block"',
        '[[rules]]\nname = "no-unbounded"\nsql = ["DeleteStmt:no-where"]\naction = "block"\n'
        '[[rules]]\nname = "reads"\nsql = ["SelectStmt"]\naction = "allow"\n'
        '[[rules]]\nname = "deletes"\nsql = ["DeleteStmt"]\naction = "allow"',
    )
    scoped = p.scoped("web", ["agents"])

    def rule(sql: str) -> str | None:
        return scoped.decide(sql, analyze_sql(sql).nodes).rule_name

    assert rule("SELECT * FROM cards WHERE id = 1") == "reads"
    # A write inside a read is decided as a write: allowlist mode holds.
    assert rule("WITH d AS (UPDATE cards SET pan = '' RETURNING 1) SELECT * FROM d") == (
        "castgate:default"
    )
    assert rule("INSERT INTO log SELECT * FROM cards") == "castgate:default"
    # Each kind allowed: allowed (the first statement kind's rule is named).
    assert rule("WITH d AS (DELETE FROM cards WHERE id = 1 RETURNING 1) SELECT 1") == "deletes"
    # A block rule still matches anywhere.
    assert rule("WITH d AS (DELETE FROM cards RETURNING 1) SELECT 1") == "no-unbounded"
