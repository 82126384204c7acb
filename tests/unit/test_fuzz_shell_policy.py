"""Property: a blocked command stays blocked wherever it is put (lists, pipelines,
substitutions, groups, loops, ``sh -c`` with any quoting, wrappers, option orders,
spellings of the program), and harmless commands put the same ways stay allowed."""

from __future__ import annotations

import posixpath
import shlex
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recorder.config import parse_config
from relay.policy import Policy

TARGET = """
[[targets]]
name = "web"
kind = "ssh"
address = "10.0.0.5:22"
groups = ["agents"]
"""
RULES = {
    "regex": '[[rules]]\nname = "no-rm-rf"\ncommand = "^rm -rf"\naction = "block"',
    "argv": '[[rules]]\nname = "no-rm-rf"\nargv = ["rm", "-rf"]\naction = "block"',
}
POLICIES = {k: Policy(parse_config(TARGET + v, Path())) for k, v in RULES.items()}


def _dq(text: str) -> str:
    return '"' + "".join("\\" + c if c in '"\\$`' else c for c in text) + '"'


def _backslashed(word: str) -> str:
    return "".join("\\" + c if c.isalnum() else shlex.quote(c) for c in word)


@st.composite
def quoted(draw: st.DrawFn, word: str) -> str:
    """One word spelled any way the shell turns back into ``word``."""
    style = draw(st.sampled_from(["plain", "single", "double", "backslash", "split", "ansi"]))
    if style == "plain":
        return shlex.quote(word)
    if style == "single":
        return "'" + word.replace("'", "'\\''") + "'"
    if style == "double":
        return _dq(word)
    if style == "backslash":
        return _backslashed(word)
    if style == "ansi":
        return "$'" + "".join(f"\\x{ord(c):02x}" for c in word) + "'"
    cut = draw(st.integers(0, len(word)))
    return shlex.quote(word[:cut]) + "''" + shlex.quote(word[cut:]) if word else "''"


@st.composite
def words(draw: st.DrawFn, argv: list[str]) -> str:
    return " ".join(draw(quoted(w)) for w in argv)


RM_OPTIONS = [["-rf"], ["-fr"], ["-r", "-f"], ["-f", "-r"], ["-rfv"], ["-v", "-fr"], ["-rf", "--"]]


@st.composite
def blocked(draw: st.DrawFn) -> tuple[str, str]:
    program = draw(st.sampled_from(["rm", "/bin/rm", "/usr/bin/rm", "./../../bin/rm"]))
    opts = draw(st.sampled_from(RM_OPTIONS))
    victim = "/victim"
    order = draw(st.sampled_from(["before", "after"]))
    if order == "after" and "--" not in opts:
        argv = [program, victim, *opts]
    else:
        argv = [program, *opts, victim]
    return draw(words(argv)), posixpath.basename(argv[0])


HARMLESS = [
    ["ls"],
    ["ls", "-la", "/tmp"],
    ["echo", "hello", "world"],
    ["echo", "rm", "-rf", "/victim"],
    ["grep", "-rn", "needle", "src"],
    ["git", "status"],
    ["git", "log", "--oneline", "-5"],
    ["cat", "/etc/hostname"],
    ["pwd"],
    ["uname", "-a"],
    ["wc", "-l", "file"],
    ["rm", "file"],
    ["rm", "-f", "file"],
    ["rm", "-r", "dir"],
]


@st.composite
def harmless(draw: st.DrawFn) -> tuple[str, str]:
    argv = draw(st.sampled_from(HARMLESS))
    return draw(words(argv)), posixpath.basename(argv[0])


WRAPPERS = [
    "sudo",
    "sudo -u root",
    "sudo -n --",
    "env",
    "env -i A=1",
    "nice",
    "nice -n 5",
    "nohup",
    "timeout 5",
    "timeout -s KILL 10s",
    "exec",
    "command",
    "time",
    "stdbuf -oL",
    "setsid",
    "ionice -c 3",
    "busybox",
    "A=1 B=2",
]


@st.composite
def composed(
    draw: st.DrawFn, core: st.SearchStrategy[tuple[str, str]], depth: int = 0
) -> tuple[str, bool, bool, str]:
    """A text that runs ``core``; the flags: a simple command, and one that cannot be
    fully known (eval, or xargs appending words to ``rm``); the program of a simple one."""
    if depth >= 3 or draw(st.booleans()):
        text, program = draw(core)
        return text, True, False, program
    inner, simple, held, program = draw(composed(core, depth + 1))
    other = draw(harmless())[0]
    how = draw(
        st.sampled_from(
            [
                "seq_before",
                "seq_after",
                "and",
                "or",
                "pipe_in",
                "pipe_out",
                "background",
                "subshell",
                "group",
                "subst",
                "subst_quoted",
                "backticks",
                "procsub",
                "assign_subst",
                "if",
                "while",
                "for",
                "case",
                "function",
                "sh_c",
                "bash_c",
                "sh_c_dq",
                "su_c",
                "eval",
                "wrapper",
                "xargs",
                "find",
                "watch",
                "negate",
            ]
        )
    )
    if how == "wrapper":
        if not simple:
            return f"sudo sh -c {shlex.quote(inner)}", True, held, "sh"
        return f"{draw(st.sampled_from(WRAPPERS))} {inner}", True, held, program
    if how in ("xargs", "find") and not simple:
        how = "sh_c"
    if how == "xargs":
        return f"{other} | xargs {inner}", False, held or program == "rm", ""
    if how == "find":
        return f"find . -exec {inner} \\;", True, held, "find"
    if how == "backticks" and "`" in inner:
        how = "subst"
    # `$((` opens an arithmetic expansion, `((` an arithmetic command in bash (and two
    # subshells in dash): tests/unit/test_policy.py has those.
    pad = " " if inner.startswith("(") else ""
    texts = {
        "seq_before": f"{other}; {inner}",
        "seq_after": f"{inner}; {other}",
        "and": f"{other} && {inner}",
        "or": f"false || {inner}",
        "pipe_in": f"{other} | {inner}",
        "pipe_out": f"{inner} | {other}",
        "background": f"{inner} & {other}",
        "subshell": f"({pad}{inner}{pad})",
        "group": f"{{ {inner}; }}",
        "subst": f"echo $({pad}{inner}{pad})",
        "subst_quoted": f'echo "$({pad}{inner}{pad})"',
        "backticks": f"echo `{inner}`",
        "procsub": f"cat <({pad}{inner}{pad})",
        "assign_subst": f"out=$({pad}{inner}{pad})",
        "if": f"if {other}; then {inner}; fi",
        "while": f"while {inner}; do break; done",
        "for": f"for i in 1 2; do {inner}; done",
        "case": f"case a in a) {inner};; esac",
        "function": f"f() {{ {inner}; }}",
        "sh_c": f"sh -c {shlex.quote(inner)}",
        "bash_c": f"bash -c {draw(quoted(inner))}",
        "sh_c_dq": f"sh -c {_dq(inner)}",
        "su_c": f"su -c {shlex.quote(inner)}",
        "eval": f"eval {shlex.quote(inner)}",
        "watch": f"watch -n 1 {shlex.quote(inner)}",
        "negate": f"! {inner}",
    }
    # tree-sitter-bash cannot read `! compound`: fail-closed (held), never allowed.
    misread = how == "negate" and inner.split()[0] in (
        "if",
        "while",
        "for",
        "case",
        "{",
        "f()",
        "!",
    )
    return texts[how], False, held or how == "eval" or misread, ""


@pytest.mark.parametrize("form", sorted(RULES))
@given(text=composed(blocked()))
@settings(max_examples=300, deadline=None)
def test_blocked_anywhere(form: str, text: tuple[str, bool, bool, str]) -> None:
    d = POLICIES[form].decide_shell(target="web", groups=["agents"], command=text[0])
    assert (d.action, d.rule_name) == ("block", "no-rm-rf"), text[0]


@pytest.mark.parametrize("form", sorted(RULES))
@given(text=composed(harmless()))
@settings(max_examples=300, deadline=None)
def test_harmless_allowed(form: str, text: tuple[str, bool, bool, str]) -> None:
    command, _simple, held, _program = text
    d = POLICIES[form].decide_shell(target="web", groups=["agents"], command=command)
    # eval is always held (opaque), and what xargs appends to `rm` may be `-rf`.
    if held:
        assert d.action == "approve" and d.rule_name == "castgate:opaque", command
    else:
        assert (d.action, d.rule_name) == ("allow", None), command
