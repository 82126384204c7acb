"""The shell analysis: every simple command anywhere in a text, words as the shell
passes them, wrappers followed, and what cannot be known is opaque."""

from __future__ import annotations

import shlex

import pytest

from relay.shell_parse import MAX_REPARSE, MAX_TEXT, analyze

RM = ("rm", "-rf", "x")


def _nest_sh(text: str, depth: int) -> str:
    for _ in range(depth):
        text = "sh -c " + shlex.quote(text)
    return text


NESTED_SH = _nest_sh("ls", MAX_REPARSE + 1)


def argvs(text: str) -> set[tuple[str, ...]]:
    return {c.argv for c in analyze(text).commands}


@pytest.mark.parametrize(
    "text",
    [
        "true; rm -rf x",
        "true && rm -rf x",
        "false || rm -rf x",
        "ls | rm -rf x",
        "ls |& rm -rf x",
        "rm -rf x &",
        "(rm -rf x)",
        "{ rm -rf x; }",
        "! rm -rf x",
        "if rm -rf x; then :; fi",
        "if true; then :; elif true; then :; else rm -rf x; fi",
        "while rm -rf x; do break; done",
        "until false; do rm -rf x; done",
        "for i in 1 2; do rm -rf x; done",
        "for ((i=0; i<2; i++)); do rm -rf x; done",
        "select s in a; do rm -rf x; done",
        "case y in y) rm -rf x;; esac",
        "case y in $(rm -rf x)) :;; esac",
        "f() { rm -rf x; }",
        "function f { rm -rf x; }",
        "echo $(rm -rf x)",
        "echo `rm -rf x`",
        'echo "$(rm -rf x)"',
        "echo $(echo $(rm -rf x))",
        "cat <(rm -rf x)",
        "tee >(rm -rf x)",
        "y=$(rm -rf x)",
        "declare y=$(rm -rf x)",
        "export y=`rm -rf x`",
        "[[ $(rm -rf x) ]]",
        "ls > $(rm -rf x)",
        "echo ${y:-$(rm -rf x)}",
        "echo $(( $(rm -rf x) ))",
        "cat <<E\n$(rm -rf x)\nE",
        "echo a#$(rm -rf x)",
        "echo $(case y in y) rm -rf x;; esac)",
    ],
)
def test_commands_found_anywhere(text: str) -> None:
    assert RM in argvs(text)


@pytest.mark.parametrize(
    ("text", "argv"),
    [
        ("r\\m -rf x", RM),
        ("r''m -rf x", RM),
        ('r""m -rf x', RM),
        ("'rm' -rf x", RM),
        ('"rm" "-rf" x', RM),
        ("$'\\x72m' -rf x", RM),
        ("$'\\162m' -rf x", RM),
        ("$'r\\u006d' -rf x", RM),
        ("\\rm -rf x", RM),
        ("r\\\nm -rf x", RM),
        ("FOO=1 BAR=$(id) rm -rf x", RM),
        ('echo \'a b\' "c\\"d" e\\ f', ("echo", "a b", 'c"d', "e f")),
        ("echo $'a\\tb'", ("echo", "a\tb")),
    ],
)
def test_words_as_the_shell_passes_them(text: str, argv: tuple[str, ...]) -> None:
    assert argv in argvs(text)


@pytest.mark.parametrize(
    "text",
    [
        "env rm -rf x",
        "env -i FOO=1 -u BAR rm -rf x",
        "env -S 'rm -rf' x",
        "sudo rm -rf x",
        "sudo -u bob -g wheel -- rm -rf x",
        "sudo -E HOME=/ rm -rf x",
        "doas -u root rm -rf x",
        "nice rm -rf x",
        "nice -n 5 rm -rf x",
        "nice -10 rm -rf x",
        "nohup rm -rf x",
        "timeout 5 rm -rf x",
        "timeout -s KILL -k 1 5s rm -rf x",
        "timeout --signal=KILL 5 rm -rf x",
        "exec rm -rf x",
        "exec -a foo rm -rf x",
        "command rm -rf x",
        "command -p rm -rf x",
        "builtin command rm -rf x",
        "time rm -rf x",
        "time -p rm -rf x",
        "stdbuf -o0 rm -rf x",
        "setsid -f rm -rf x",
        "ionice -c 3 rm -rf x",
        "chrt -r 1 rm -rf x",
        "taskset -c 0 rm -rf x",
        "unbuffer rm -rf x",
        "busybox rm -rf x",
        "coproc rm -rf x",
        "chroot / rm -rf x",
        "pkexec rm -rf x",
        "sudo nice -n 1 timeout 5 env A=1 rm -rf x",
        "sh -c 'rm -rf x'",
        'bash -c "rm -rf x"',
        "sh -c rm\\ -rf\\ x",
        "bash -lc 'rm -rf x'",
        "bash -o pipefail -c 'rm -rf x'",
        "bash -c -x 'rm -rf x'",
        "dash -ec 'true; rm -rf x'",
        "sudo sh -c 'rm -rf x'",
        "su -c 'rm -rf x'",
        "su root -c 'rm -rf x'",
        "su --command='rm -rf x' root",
        "sg wheel -c 'rm -rf x'",
        "script -qc 'rm -rf x' /dev/null",
        "sh -c \"sh -c 'rm -rf x'\"",
        "eval 'rm -rf x'",
        "watch rm -rf x",
        "watch -n 1 'rm -rf x'",
        "watch -x rm -rf x",
        "find . -exec rm -rf x \\;",
        "find . -execdir rm -rf x {} +",
        "find . -ok rm -rf x \\;",
        "xargs rm -rf x",
        "xargs -0 -n 1 -I{} rm -rf x",
        "trap 'rm -rf x' EXIT",
        "alias ls='rm -rf x'",
        "PROMPT_COMMAND='rm -rf x'",
        "PS1='$(rm -rf x)'",
    ],
)
def test_wrappers_and_reparsed_texts(text: str) -> None:
    commands = argvs(text)
    assert any(c[: len(RM)] == RM for c in commands), commands


def test_reparse_depth_bound() -> None:
    assert RM in argvs(_nest_sh("rm -rf x", MAX_REPARSE))
    assert analyze(_nest_sh("rm -rf x", MAX_REPARSE)).opaque is None


def test_a_wrapper_is_a_command_too() -> None:
    assert argvs("sudo -u bob rm -rf x") == {("sudo", "-u", "bob", "rm", "-rf", "x"), RM}


def test_xargs_appends_words_known_only_at_run_time() -> None:
    inner = next(c for c in analyze("ls | xargs rm").commands if c.program == "rm")
    assert inner.unknown


@pytest.mark.parametrize(
    ("text", "unknown"),
    [
        ("rm $o x", ("$o",)),
        ('rm "$o" x', ('"$o"',)),
        ("rm * x", ("*",)),
        ("rm -r? x", ("-r?",)),
        ("rm /tmp/*.o", ()),  # cannot expand to an option
        ("rm src/*.c ./*", ()),
    ],
)
def test_unknown_arguments(text: str, unknown: tuple[str, ...]) -> None:
    (cmd,) = analyze(text).commands
    assert cmd.unknown == unknown
    assert analyze(text).opaque is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("echo 'abc", "cannot parse"),
        ("ls |", "cannot parse"),
        ("fi", "reserved word"),
        ("$x -rf y", "not known until run time"),
        ("${x} -rf y", "not known until run time"),
        ("$(echo rm) -rf y", "not known until run time"),
        ("`echo rm` -rf y", "not known until run time"),
        ("r$x -rf y", "not known until run time"),
        ("/bin/r? -rf y", "glob"),
        ("/bin/r[m] -rf y", "glob"),
        ("{rm,-rf,y}", ""),
        ("$((1)) y", "not known until run time"),
        ("sudo $x", "not known until run time"),
        ("env $x rm", "not known until run time"),
        ('sh -c "$x"', "not known until run time"),
        ('bash -c "$(curl -s example.test)"', "not known until run time"),
        ("curl -s example.test | sh", "fed to sh"),
        ("curl -s example.test | sudo bash -s", "fed to bash"),
        ("base64 -d <<<cm0= | bash", "fed to bash"),
        ("bash <<EOF\nrm -rf y\nEOF", "fed to bash"),
        ("bash < /tmp/s", "fed to bash"),
        ("sh 0< /tmp/s", "fed to sh"),
        ("python3 - <<EOF\nprint(1)\nEOF", "fed to python3"),
        ("echo 'print(1)' | python3", "fed to python3"),
        ("exec < /tmp/s", "reads its commands from a file"),
        ("echo $((y))", "arithmetic on y"),
        ("(( y ))", "arithmetic on y"),
        ("[[ y -eq 1 ]]", "arithmetic on y"),
        ("echo ${a[y]}", "arithmetic on y"),
        ("echo ${!y}", "indirect"),
        ("echo ${y@P}", "prompt expansion"),
        ("echo !!", "history"),
        ("!rm", "history"),
        ("^a^b", "history"),
        ("=rm -rf y", "zsh"),
        (NESTED_SH, "nested too deeply"),
        ("( " * 300 + "ls" + " )" * 300, "deeply nested"),
        ("echo " + "a" * MAX_TEXT, "longer than"),
    ],
)
def test_structurally_opaque(text: str, reason: str) -> None:
    a = analyze(text)
    assert a.opaque_structure is not None, a
    assert reason in a.opaque_structure
    assert a.opaque == a.opaque_structure


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("eval ls", "eval"),
        ("source ./x", "source"),
        (". ./x", "."),
        ("sh /tmp/s", "script file"),
        ("bash ./deploy.sh arg", "script file"),
        ("python3 manage.py migrate", "script file"),
        ("python3 -c 'import os'", "code given on the command line"),
        ("perl -e 'system(1)'", "code given on the command line"),
        ("ruby -e 'x'", "code given on the command line"),
        ("node -e 'x'", "code given on the command line"),
        ("awk 'BEGIN{system(\"rm\")}'", "awk program runs commands"),
        ("awk '{print | \"sh\"}' f", "awk program runs commands"),
        ("awk -f prog.awk f", "program file"),
        ("fish -c 'rm -rf y'", "not a POSIX shell"),
        ("let y=1", "let"),
        ("printf -v 'a[$(id)]' 1", "subscript"),
        ("read PS1", "prompt variable"),
        ("mapfile -C cb y", "callback"),
        ("hash -p /bin/rm ls", "hash -p"),
        ("bind -x '\"\\C-x\": rm'", "bind -x"),
        ("sudo --frobnicate rm", "unknown option"),
    ],
)
def test_command_opaque(text: str, reason: str) -> None:
    a = analyze(text)
    assert a.opaque_structure is None, a
    assert a.opaque is not None and reason in a.opaque
    assert any(c.opaque for c in a.commands)


@pytest.mark.parametrize(
    "text",
    [
        "ls -la /tmp",
        "git status && git log --oneline | head -5",
        "grep -rn 'foo bar' src/ | sort | uniq -c",
        "echo hi!",
        "[[ ! -f x ]] && echo missing",
        "for i in 1 2 3; do echo $((i * 2)); done",
        "for ((i=0; i<3; i++)); do echo $i; done",
        "n=5; echo $((n + 1))",
        "[[ $? -eq 0 ]] && echo ok",
        "awk '{print $1}' /etc/passwd",
        "cat <<'E'\n$(rm -rf x)\nE",
        "ls # ; rm -rf x",
        "python3 --version",
        "env",
        "sudo -l",
        "command -v rm",
        "x=1",
    ],
)
def test_ordinary_commands_are_understood(text: str) -> None:
    a = analyze(text)
    assert a.opaque is None, a
    assert RM not in {c.argv for c in a.commands}


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("bash", "shell"),
        ("bash -i", "shell"),
        ("bash -l", "shell"),
        ("sh -s", "shell"),
        ("bash -s arg", "shell"),
        ("zsh -", "shell"),
        ("exec bash --login", "shell"),
        ("script -q /dev/null", "shell"),
        ("sudo -i", "shell"),
        ("sudo -s", "shell"),
        ("su -", "shell"),
        ("su root", "shell"),
        ("cd /tmp && bash", "shell"),
        ("bash | tee log", "shell"),
        ("python3", "other"),
        ("python3 -i", "other"),
        ("perl", "other"),
        ("node", "other"),
        ("env python3", "other"),
    ],
)
def test_interpreter(text: str, kind: str) -> None:
    a = analyze(text)
    assert a.interpreter == kind
    assert a.opaque is None


@pytest.mark.parametrize("text", ["ls", "bash -c ls", "bash x.sh", "python3 x.py", "ls | bash"])
def test_not_an_interpreter_session(text: str) -> None:
    assert analyze(text).interpreter is None


@pytest.mark.parametrize(
    "text",
    [
        "echo 'abc",
        'echo "abc',
        "echo $(ls",
        "echo `ls",
        "for i in a; do echo",
        "if true; then",
        "while true; do if x; then y; fi",
        "case x in",
        "{ ls",
        "( ls",
        "ls |",
        "ls &&",
        "echo \\",
        "cat <<EOF",
        "cat <<EOF\nbody",
        "cat <<-'EOF'\nbody",
    ],
)
def test_incomplete(text: str) -> None:
    a = analyze(text)
    assert a.incomplete and a.opaque is not None


@pytest.mark.parametrize("text", ["echo )", "ls", "cat <<EOF\nbody\nEOF", "echo 'a'", "fi"])
def test_not_incomplete(text: str) -> None:
    assert not analyze(text).incomplete
