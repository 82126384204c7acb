"""What an SSH exec command or shell line runs, for the command policy: the simple
commands found anywhere in it, whether it starts an interpreter that reads further
commands from its input, and, when the text cannot be understood, why (it is opaque).

The text is parsed with tree-sitter's bash grammar (a real shell grammar, not a
tokenizer), then walked: every ``command`` node anywhere in the tree is a simple command
(lists, pipelines, subshells, groups, if/for/while/case bodies, function bodies, command
and process substitutions, here-document bodies that expand). Words are resolved the
way the shell passes them (quote removal, backslash escapes, ANSI-C ``$'..'``,
concatenations). Programs that run other programs are followed: wrappers (``env``,
``sudo``, ``nice``, ``timeout``, ``xargs``, ...) yield their inner command as a simple
command of its own, ``sh -c TEXT``/``su -c TEXT``/``watch TEXT``/``eval TEXT``/``trap``/
``alias`` texts are parsed again (to a bounded depth), ``find -exec`` commands are
commands.

What the relay cannot know is *opaque*, with a short reason: a parse error, a word in
command position whose value is only known at run time (a variable, substitution, glob,
brace or arithmetic expansion), ``eval``/``source``, text fed to a shell or interpreter
through a pipe, here-document or file, interpreter code or script files, arithmetic on
a variable (bash evaluates its value as an expression, and ``a[$(cmd)]`` in it runs
``cmd``), history expansion, past the size bounds. An opaque reason that belongs to one
simple command (``python3 manage.py``: the script is invisible) is kept on that command,
so that an ``allow`` rule naming the command can vouch for it; the others belong to the
text (``ShellAnalysis.opaque_structure``) and nothing vouches for them.

Analysis is pure and cached: a shell line is analysed on every Enter.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import tree_sitter_bash
from tree_sitter import Language, Node, Parser

Interpreter = Literal["shell", "other"]

MAX_TEXT = 256 * 1024
"""Longer texts are opaque: the work per text is bounded."""
MAX_NODES = 20_000
"""Parse-tree nodes visited per text (all nested re-parses included)."""
MAX_REPARSE = 4
"""``sh -c "sh -c '...'"`` nesting followed; deeper is opaque."""
MAX_NEST = 150
"""Parse-tree depth followed (``$($($(...)))``); deeper is opaque."""
_CACHED_TEXT = 4096


@dataclass(frozen=True)
class SimpleCommand:
    """One simple command: its words as the shell would pass them (quotes removed).

    A wrapper (``sudo rm -rf x``) is a simple command and so is the command it runs
    (``rm -rf x``): both run, and a rule may be about either."""

    argv: tuple[str, ...]
    unknown: tuple[str, ...] = ()
    """Words whose value is only known at run time (``$opt``, ``*.txt``, what ``xargs``
    appends); in ``argv`` they appear as their source text. A rule that could match
    once they are expanded cannot be ruled out."""
    opaque: str | None = None
    """Why what this command runs is invisible (a script file, interpreter code,
    ``eval``); an ``allow`` rule matching this command vouches for it."""
    speculative: bool = False
    """Run only by some shells (dash runs ``((rm -rf x))`` as two subshells, bash
    evaluates it as arithmetic): a block or approve rule matching it counts, nothing
    else does."""

    @property
    def program(self) -> str:
        """Basename of the program run (``/bin/rm`` is ``rm``)."""
        return posixpath.basename(self.argv[0]) if self.argv else ""


@dataclass(frozen=True)
class ShellAnalysis:
    """What one text runs."""

    commands: tuple[SimpleCommand, ...]
    """Every simple command found anywhere in the text."""
    opaque: str | None = None
    """Why the text cannot be fully understood (a parse error, ``eval``, a variable in
    command position, ...); None when every command it runs is in ``commands``."""
    interpreter: Interpreter | None = None
    """Set when the text starts an interpreter that reads commands from its standard
    input or terminal (``bash``, ``bash -i``, ``sh -s``, ``script``: "shell";
    ``python3``, ``perl``: "other"); what is typed into it is not in ``commands``."""
    incomplete: bool = False
    """The text ends inside a construct (an open quote, ``for ... do`` without ``done``,
    a here-document): more lines would complete it. Implies ``opaque``."""
    opaque_structure: str | None = None
    """The part of ``opaque`` that belongs to no single command (a parse error, a
    variable in command position, text piped into a shell): nothing vouches for it."""


_LANGUAGE = Language(tree_sitter_bash.language())

_SHELLS = frozenset(
    {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "rbash", "yash", "posh", "lksh"}
)
_FOREIGN_SHELLS = frozenset({"fish", "csh", "tcsh", "nu", "xonsh", "elvish"})
_INTERPRETERS = re.compile(
    r"(python[0-9.]*|pypy[0-9.]*|perl[0-9.]*|ruby[0-9.]*|irb|node|nodejs|deno|bun|lua[0-9.]*"
    r"|luajit|tclsh[0-9.]*|wish|expect|php[0-9.]*|Rscript|R|julia|guile|gawk-?|"
    r"jshell|groovy|scala|erl|iex|elixir|ghci|osascript|pwsh|powershell)"
)
_INFO_FLAGS = frozenset({"--version", "-V", "--help", "-h", "-v", "-version"})
_AWKS = frozenset({"awk", "gawk", "mawk", "nawk", "busybox-awk"})
_RESERVED = frozenset(
    {"then", "else", "elif", "fi", "do", "done", "esac", "in", "}", "{", "!", "[[", "]]"}
)
# Builtins that take variable names (a subscript in a name is evaluated as arithmetic).
_NAME_BUILTINS = frozenset(
    {
        "printf",
        "read",
        "declare",
        "typeset",
        "local",
        "export",
        "readonly",
        "unset",
        "mapfile",
        "readarray",
        "getopts",
        "wait",
        "test",
        "[",
        "let",
        "shift",
        "eval",
    }
) - {"eval", "shift"}
_SCRIPT_LONG_ARG = frozenset(
    {
        "command",
        "echo",
        "log-in",
        "log-out",
        "log-io",
        "log-timing",
        "logging-format",
        "output-limit",
    }
)
_OPENING_RESERVED = frozenset({"if", "while", "until", "for", "case", "select", "function"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_PROMPT_VARS = frozenset({"PROMPT_COMMAND", "PS0", "PS1", "PS2", "PS3", "PS4"})
_SPECIAL_VARS = frozenset({"?", "#", "$", "!", "-", "0"})
_ARITH_TEST_OPS = frozenset({"-eq", "-ne", "-lt", "-le", "-gt", "-ge"})
# A '!' that bash's history expansion acts on (interactive shells): not before a
# blank, '=' or '(' and not '$!' or '${!'.
_HISTORY = re.compile(r"(?<![$\\{])!(?![\s=(]|$)")


@dataclass(frozen=True)
class _Word:
    value: str | None
    """The word as the shell passes it; None when only known at run time."""
    text: str
    """Source text."""
    why: str = ""
    """Why the value is unknown ("a variable", "a glob")."""


@dataclass(frozen=True)
class _Wrapper:
    """How a program that runs a command parses its own options."""

    short_arg: str = ""
    """Short options that take a value (attached or the next word)."""
    short_flags: str = ""
    long_arg: frozenset[str] = frozenset()
    long_flags: frozenset[str] = frozenset()
    short_optional: str = ""
    """Short options whose value is only ever attached (``xargs -i{}``)."""
    operands: int = 0
    """Words between the options and the command (``timeout DURATION``)."""
    assignments: bool = False
    """``NAME=value`` words may precede the command (``env``, ``sudo``)."""
    numeric: bool = False
    """``-N`` is an option (``nice -10``)."""


def _w(
    short_arg: str = "",
    short_flags: str = "",
    long_arg: str = "",
    long_flags: str = "",
    **kw: object,
) -> _Wrapper:
    return _Wrapper(
        short_arg,
        short_flags,
        frozenset(long_arg.split()),
        frozenset(long_flags.split()) | {"help", "version"},
        **kw,  # type: ignore[arg-type]
    )


_WRAPPERS: dict[str, _Wrapper] = {
    "env": _w(
        "uCS",
        "i0v",
        "unset chdir split-string block-signal default-signal ignore-signal",
        "ignore-environment null debug list-signal-handling",
        assignments=True,
    ),
    "sudo": _w(
        "ughpCDRrtTUc",
        "AbEeHiKklnPSsVvBN",
        "user group host prompt close-from chdir chroot role type command-timeout other-user"
        " login-class preserve-env",
        "askpass background edit set-home login remove-timestamp reset-timestamp list"
        " non-interactive preserve-groups stdin shell validate bell",
        assignments=True,
    ),
    "doas": _w("uC", "nsL"),
    "pkexec": _w("", "", "user", "disable-internal-agent keep-cwd"),
    "nice": _w("n", "", "adjustment", "", numeric=True),
    "nohup": _w(),
    "timeout": _w("sk", "v", "signal kill-after", "preserve-status foreground verbose", operands=1),
    "exec": _w("a", "cl"),
    "command": _w("", "pvV"),
    "builtin": _w(),
    "time": _w("fo", "apqv", "format output", "append portability verbose quiet"),
    "stdbuf": _w("ioe", "", "input output error"),
    "setsid": _w("", "cfw", "", "ctty fork wait"),
    "ionice": _w("cnpPu", "th", "class classdata pid pgid uid", "ignore"),
    "chrt": _w(
        "TPD",
        "abdfiomrRpv",
        "sched-runtime sched-period sched-deadline",
        "all-tasks batch deadline fifo idle max other pid rr reset-on-fork verbose",
        operands=1,
    ),
    "taskset": _w("", "acp", "", "all-tasks cpu-list pid", operands=1),
    "unbuffer": _w("", "p"),
    "coproc": _w(),
    "chroot": _w("", "", "userspec groups", "skip-chdir", operands=1),
    "xargs": _w(
        "adEILnPs",
        "0oprtx",
        "arg-file delimiter eof max-lines max-args max-procs max-chars process-slot-var",
        "null interactive no-run-if-empty open-tty exit verbose show-limits replace",
        short_optional="eil",
    ),
    "watch": _w(
        "nq",
        "bcCdegprtwx",
        "interval",
        "beep color no-color differences errexit"
        " chgexit precise no-rerun no-title no-wrap exec no-linewrap",
    ),
    "strace": _w("abeEIoOpPsSuUX", "cCdDfFhiknqrtTvVwxyzZ"),
    "ltrace": _w("aAeEfFlnopsu", "bcCdhiLrStTVw"),
}


class _Budget:
    def __init__(self) -> None:
        self.nodes = 0


class _Walk:
    """One walk over a text and what it re-parses."""

    def __init__(self, src: bytes, depth: int, budget: _Budget, out: _Result) -> None:
        self.src = src
        self.depth = depth
        self.budget = budget
        self.out = out
        self.int_vars: set[str] = set()
        self.redirect_starts: set[int] = set()

    def text(self, node: Node) -> str:
        return self.src[node.start_byte : node.end_byte].decode("utf-8", "surrogateescape")

    # ---- the tree ---------------------------------------------------------------

    def walk(self, node: Node, nest: int = 0, stdin_fed: bool = False) -> None:
        self.budget.nodes += 1
        if self.budget.nodes > MAX_NODES or nest > MAX_NEST:
            self.out.structural("too large or deeply nested to check")
            return
        kind = node.type
        if node.is_error or kind == "ERROR":
            self.out.structural("cannot parse")
        elif node.is_missing:
            self.out.structural(f"cannot parse (missing {kind!r})")
            return
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, node, nest, stdin_fed)
            return
        if node.is_named and kind not in _PLAIN and not node.is_error:
            self.out.structural(f"unsupported shell construct: {kind}")
        self.children(node, nest)

    def children(self, node: Node, nest: int, stdin_fed: bool = False) -> None:
        for child in node.children:
            self.walk(child, nest + 1, stdin_fed)

    def _pipeline(self, node: Node, nest: int, stdin_fed: bool) -> None:
        stages = [c for c in node.children if c.is_named and c.type != "comment"]
        for i, child in enumerate(stages):
            self.walk(child, nest + 1, stdin_fed or i > 0)
        for child in node.children:
            if not child.is_named:
                self.walk(child, nest + 1)

    def _redirected(self, node: Node, nest: int, stdin_fed: bool) -> None:
        redirects = node.children_by_field_name("redirect")
        feeds = stdin_fed or any(_feeds_stdin(self, c) for c in redirects)
        # The grammar reads the 0 of `sh 0< file` as an argument: bash reads an fd.
        self.redirect_starts.update(c.start_byte for c in redirects)
        for child in node.children:
            if child in node.children_by_field_name("redirect"):
                self.walk(child, nest + 1)
            else:
                self.walk(child, nest + 1, feeds)

    def _heredoc_redirect(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        start = next((c for c in node.children if c.type == "heredoc_start"), None)
        quoted = start is not None and any(q in self.text(start) for q in "'\"\\")
        for child in node.children:
            # A quoted delimiter turns expansion off: the body is data, nothing runs.
            if child.type == "heredoc_body" and quoted:
                continue
            self.walk(child, nest + 1)

    def _arith(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        self.arith_vars(node)
        self.children(node, nest)

    def _compound(self, node: Node, nest: int, stdin_fed: bool) -> None:
        if node.children and node.children[0].type == "((":
            self.arith_vars(node)
        self.children(node, nest, stdin_fed)

    def _c_for(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        for child in node.children:
            if child.type == "do_group" or child.type == "compound_statement":
                self.walk(child, nest + 1)
            else:
                self.arith_vars(child)
                self.children(child, nest + 1)

    def _for(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        var = node.child_by_field_name("variable")
        values = node.children_by_field_name("value")
        if var is not None and values and all(self.text(v).isdigit() for v in values):
            self.int_vars.add(self.text(var))
        self.children(node, nest)

    def _subscript(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        index = node.child_by_field_name("index")
        if index is not None:
            self.arith_vars(index, top=True)
        self.children(node, nest)

    def _expansion(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        # ${a[i]}: the index is arithmetic; ${!x}: the value of x names a variable,
        # and an array reference in it is evaluated.
        parts = [c.type for c in node.children]
        if "!" in parts[:2]:
            self.out.structural("indirect expansion ${!...}")
        if self.text(node).endswith("@P}"):
            # Prompt expansion of a value: a $(...) in the value runs.
            self.out.structural("prompt expansion ${...@P}")
        if "[" in parts:
            i = parts.index("[")
            for child in node.children[i + 1 :]:
                if child.type == "]":
                    break
                self.arith_vars(child, top=True)
        self.children(node, nest)

    def _test(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        for sub in _descendants(node):
            if sub.type == "binary_expression":
                op = sub.child_by_field_name("operator")
                if op is not None and self.text(op) in _ARITH_TEST_OPS:
                    for side in (sub.child_by_field_name("left"), sub.child_by_field_name("right")):
                        if side is not None:
                            self.arith_operand(side)
        self.children(node, nest)

    def _assignment(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        name = node.child_by_field_name("name")
        value = node.child_by_field_name("value")
        if name is not None and value is not None:
            var = self.text(name)
            if var in _PROMPT_VARS:
                # Run (or expanded) at every prompt: what they hold runs later.
                word = self.word(value)
                if word.value is None:
                    self.out.structural(f"{var} set to a value not known until run time")
                elif var == "PROMPT_COMMAND":
                    self.reparse(word.value, var)
                else:
                    # Expanded like a string: what substitutions it holds run.
                    quoted = word.value.replace("\\", "\\\\").replace('"', '\\"')
                    self.reparse(f': "{quoted}"', var, carrier=True)
            if value.type == "number":
                self.int_vars.add(var)
        self.children(node, nest)

    def _declaration(self, node: Node, nest: int, stdin_fed: bool) -> None:
        # declare/export/local/readonly: a builtin; its assignments are walked below.
        self.simple([_Word(self.text(c), self.text(c)) for c in node.children], stdin_fed)
        self.children(node, nest)

    def _function(self, node: Node, nest: int, _stdin_fed: bool) -> None:
        # The body runs whenever the function is called: its commands are checked now.
        self.children(node, nest)

    def arith_vars(self, node: Node, top: bool = False) -> None:
        """Fail closed on arithmetic that reads a variable not set to a number here."""
        stack = [node]
        while stack:
            sub = stack.pop()
            self.budget.nodes += 1
            if sub.type in ("command_substitution", "process_substitution"):
                continue
            if sub.type == "variable_assignment" or (
                sub.type == "binary_expression"
                and (op := sub.child_by_field_name("operator")) is not None
                and self.text(op) == "="
            ):
                left = sub.child_by_field_name("left") or sub.child_by_field_name("name")
                right = sub.child_by_field_name("right") or sub.child_by_field_name("value")
                if right is not None:
                    stack.append(right)
                if left is not None and left.type == "variable_name":
                    self.int_vars.add(self.text(left))
                continue
            if sub.type in ("variable_name", "simple_expansion", "expansion") or (
                top and sub.type == "word" and re.search(r"[A-Za-z_]", self.text(sub))
            ):
                name = self.text(sub).lstrip("${").rstrip("}")
                if name not in self.int_vars and name not in _SPECIAL_VARS:
                    self.out.structural(
                        f"arithmetic on {self.text(sub)} (its value is evaluated and can run commands)"
                    )
                    return
                continue
            stack.extend(reversed(sub.children))

    def arith_operand(self, node: Node) -> None:
        text = self.text(node)
        if text.lstrip("-").isdigit():
            return
        self.arith_vars(node, top=True)

    # ---- commands -----------------------------------------------------------------

    def _command(self, node: Node, nest: int, stdin_fed: bool) -> None:
        groups: list[list[Node]] = []
        for i, child in enumerate(node.children):
            fname = node.field_name_for_child(i)
            if child.is_missing:
                continue
            if fname == "name":
                target = (
                    child.children[0] if child.type == "command_name" and child.children else child
                )
                if target.is_missing:
                    self.out.structural("cannot parse (a command is missing)")
                    continue
            elif fname == "argument":
                if child.type == "number" and child.end_byte in self.redirect_starts:
                    continue
                target = child
            else:
                if fname == "redirect" and _feeds_stdin(self, child):
                    stdin_fed = True
                continue
            # Pieces with nothing between them are one word to bash, however the
            # grammar splits them (it does after a quoted piece: `a' '\b`).
            if groups and groups[-1][-1].end_byte == target.start_byte:
                groups[-1].append(target)
            else:
                groups.append([target])
        words = [self.word(g[0]) if len(g) == 1 else self.joined(g) for g in groups]
        if words:
            self.simple(words, stdin_fed)
        self.children(node, nest)

    def joined(self, group: list[Node]) -> _Word:
        pieces = [self.word(n) for n in group]
        text = self.src[group[0].start_byte : group[-1].end_byte].decode("utf-8", "surrogateescape")
        unknown = next((p for p in pieces if p.value is None), None)
        if unknown is not None:
            return _Word(None, text, unknown.why)
        if _brace(text):
            return _Word(None, text, "a brace expansion")
        return _Word("".join(p.value or "" for p in pieces), text)

    def reparse(self, text: str, what: str, carrier: bool = False) -> None:
        """Analyse ``text`` as commands too; with ``carrier``, its first command is
        only the vehicle of the substitutions in its words and runs nothing."""
        if self.depth + 1 > MAX_REPARSE:
            self.out.structural(f"{what}: nested too deeply to check")
            return
        first = len(self.out.commands)
        _analyze_into(text, self.depth + 1, self.budget, self.out)
        if carrier and len(self.out.commands) > first:
            del self.out.commands[first]

    def simple(self, words: list[_Word], stdin_fed: bool, vouch: bool = True) -> None:
        head = words[0]
        if head.value is None:
            self.out.structural(
                f"command name {head.text} is not known until run time ({head.why})"
            )
            return
        if head.value.startswith("=") and len(head.value) > 1:
            # zsh expands =cmd to the path of cmd.
            self.out.structural(f"command name {head.text} (zsh equals expansion)")
            return
        if head.value in _RESERVED or head.value in _OPENING_RESERVED:
            # Where the grammar and bash disagree (`! if ...`): fail closed, and still
            # check the words after the keyword as the command bash would see.
            self.out.structural(f"misplaced reserved word {head.value!r}")
            if len(words) > 1:
                self.simple(words[1:], stdin_fed)
            return
        # A glob that starts with a literal character other than '-' cannot expand to
        # an option ('/tmp/*', 'src/*.c'): as an argument it is as good as known.
        unknown = tuple(w.text for w in words[1:] if w.value is None and not _safe_glob(w))
        argv = tuple(w.value if w.value is not None else w.text for w in words)
        prog = posixpath.basename(head.value)
        index = len(self.out.commands)
        self.out.add(SimpleCommand(argv, unknown))
        reason = self.follow(prog, words, stdin_fed)
        if reason is not None:
            self.out.commands[index] = SimpleCommand(argv, unknown, reason)

    def follow(self, prog: str, words: list[_Word], stdin_fed: bool) -> str | None:
        """Follow what ``words`` runs besides itself; returns an opaque reason that a
        rule matching this command can vouch for."""
        if prog in ("eval",):
            args = words[1:]
            if all(w.value is not None for w in args):
                self.reparse(" ".join(w.value or "" for w in args), "eval")
            return "eval runs text as commands"
        if prog in ("source", "."):
            return f"{prog} runs the commands in a file"
        if prog in _SHELLS:
            return self.shell(prog, words, stdin_fed)
        if prog in _FOREIGN_SHELLS:
            if len(words) == 1 and not stdin_fed:
                self.out.interpreter_found("shell")
                return None
            return f"{prog} is not a POSIX shell: its commands are not checked"
        if prog in _AWKS:
            return self.awk(words)
        if prog == "find":
            self.find(words, stdin_fed)
            return None
        if prog in ("su", "runuser", "sg"):
            return self.su(prog, words, stdin_fed)
        if prog == "script":
            return self.script(words, stdin_fed)
        if prog in ("tmux", "screen"):
            if len(words) == 1 and not stdin_fed:
                self.out.interpreter_found("shell")
                return None
            return f"{prog} runs commands given as arguments"
        if prog == "busybox":
            if len(words) > 1:
                self.simple(words[1:], stdin_fed)
            return None
        if prog == "alias":
            for w in words[1:]:
                if w.value is None:
                    return "alias with a value not known until run time"
                name, eq, value = w.value.partition("=")
                if eq:
                    self.reparse(value, f"alias {name}")
            return None
        if prog == "trap":
            args = [w for w in words[1:] if w.value not in ("--",)]
            if args and args[0].value is not None and args[0].value.startswith("-"):
                return None  # trap -l / -p: list
            if args:
                if args[0].value is None:
                    return "trap with a command not known until run time"
                self.reparse(args[0].value, "trap")
            return None
        if prog in _NAME_BUILTINS:
            for w in words[1:]:
                v = w.value if w.value is not None else w.text
                if "[" in v and ("$" in v or "`" in v):
                    return f"{prog}: a variable name whose subscript is evaluated"
                name, eq, _value = v.partition("=")
                if eq and name in _PROMPT_VARS and _ASSIGNMENT.match(v):
                    continue  # the assignment itself is walked: its value is checked
                if any(var in v for var in _PROMPT_VARS):
                    return f"{prog} sets a prompt variable (run at every prompt)"
        if prog in ("mapfile", "readarray") and any(
            (w.value or "-C").startswith("-C") for w in words[1:]
        ):
            return f"{prog} -C runs a callback"
        if prog in ("let",):
            return "let evaluates arithmetic (a variable's value can run commands)"
        if prog == "hash" and any(w.value == "-p" or w.value is None for w in words[1:]):
            return "hash -p makes a name run another program"
        if prog == "enable" and any((w.value or "").startswith("-f") for w in words[1:]):
            return "enable -f loads code into the shell"
        if prog == "bind" and any((w.value or "-x").startswith("-x") for w in words[1:]):
            return "bind -x runs commands on a key"
        if prog == "complete" and any((w.value or "-C").startswith("-C") for w in words[1:]):
            return "complete -C runs a command on completion"
        if _INTERPRETERS.fullmatch(prog):
            return self.interpreter(prog, words, stdin_fed)
        spec = _WRAPPERS.get(prog)
        if spec is not None:
            return self.wrapper(prog, spec, words, stdin_fed)
        return None

    def wrapper(self, prog: str, spec: _Wrapper, words: list[_Word], stdin_fed: bool) -> str | None:
        i = 1
        opts: list[str] = []
        split_string: str | None = None
        while i < len(words):
            w = words[i]
            if w.value is None:
                if spec.assignments and _ASSIGNMENT.match(w.text):
                    i += 1  # NAME=$value: only the value is unknown
                    continue
                self.out.structural(f"{prog}: argument {w.text} is not known until run time")
                return None
            v = w.value
            if v == "--":
                i += 1
                break
            if v.startswith("--") and len(v) > 2:
                name, eq, val = v[2:].partition("=")
                matches = [o for o in spec.long_arg | spec.long_flags if o.startswith(name)]
                exact = name if name in spec.long_arg | spec.long_flags else None
                if exact is None and len(matches) == 1:
                    exact = matches[0]  # getopt_long accepts unambiguous abbreviations
                if exact is None:
                    return f"{prog}: unknown option {v}"
                opts.append("--" + exact)
                if exact in spec.long_arg and not eq:
                    i += 1
                    val = words[i].value or "" if i < len(words) else ""
                if exact == "split-string":
                    split_string = val
                i += 1
                continue
            if v.startswith("-") and len(v) > 1:
                if spec.numeric and v[1:].isdigit():
                    i += 1
                    continue
                j = 1
                while j < len(v):
                    c = v[j]
                    opts.append("-" + c)
                    if c in spec.short_arg:
                        val = v[j + 1 :]
                        if not val:
                            i += 1
                            val = words[i].value or "" if i < len(words) else ""
                        if c == "S" and prog == "env":
                            split_string = val
                        break
                    if c in spec.short_optional:
                        break
                    if c not in spec.short_flags:
                        return f"{prog}: unknown option -{c}"
                    j += 1
                i += 1
                continue
            if spec.assignments and _ASSIGNMENT.match(v):
                i += 1
                continue
            break
        rest = words[i:]
        if split_string is not None:
            # env -S splits its value into words placed before the rest.
            text = split_string + " " + " ".join(shlex.quote(w.value or "") for w in rest)
            self.reparse(text, "env -S")
            return None
        for _ in range(spec.operands):
            if rest and rest[0].value is None:
                self.out.structural(f"{prog}: argument {rest[0].text} is not known until run time")
                return None
            rest = rest[1:]
        if prog == "command" and ("-v" in opts or "-V" in opts):
            return None  # prints what a name is; runs nothing
        if prog == "sudo" and {"-e", "--edit", "-l", "--list", "-v", "-k", "-K"} & set(opts):
            return None if not ({"-e", "--edit"} & set(opts)) else "sudo -e opens an editor"
        if not rest:
            starts_shell = (
                (prog == "sudo" and bool({"-i", "-s", "--login", "--shell"} & set(opts)))
                or (prog == "doas" and "-s" in opts)
                or prog in ("pkexec", "chroot")
            )
            if starts_shell:
                return self.stdin_shell(prog, stdin_fed)
            if prog == "exec" and stdin_fed:
                self.out.structural("exec < file: the shell reads its commands from a file")
                return None
            if prog == "xargs":
                rest = [_Word("echo", "echo")]
            else:
                return None
        if prog == "watch" and "-x" not in opts and "--exec" not in opts:
            if any(w.value is None for w in rest):
                self.out.structural("watch: command not known until run time")
                return None
            self.reparse(" ".join(w.value or "" for w in rest), "watch")
            return None
        if prog == "xargs":
            rest = [*rest, _Word(None, "(arguments read by xargs)", "xargs input")]
        self.simple(rest, stdin_fed and prog not in ("xargs",))
        return None

    def stdin_shell(self, prog: str, stdin_fed: bool) -> str | None:
        if stdin_fed:
            self.out.structural(f"commands fed to {prog} through a pipe, here-document or file")
            return None
        self.out.interpreter_found("shell")
        return None

    def shell(self, prog: str, words: list[_Word], stdin_fed: bool) -> str | None:
        i = 1
        has_c = has_s = False
        while i < len(words):
            w = words[i]
            if w.value is None:
                self.out.structural(f"{prog}: argument {w.text} is not known until run time")
                return None
            v = w.value
            if v in ("-", "--"):
                i += 1
                break
            if v in _INFO_FLAGS and len(words) == 2:
                return None
            if v.startswith("--"):
                if v in ("--rcfile", "--init-file"):
                    i += 1
                elif v in ("--pretty-print", "--dump-strings", "--dump-po-strings"):
                    return None  # prints, runs nothing
                i += 1
                continue
            if v[:1] in "-+" and len(v) > 1:
                for c in v[1:]:
                    if c == "c":
                        has_c = True
                    elif c == "s":
                        has_s = True
                    elif c in "oO":
                        i += 1  # the option name
                i += 1
                continue
            break
        operands = words[i:]
        if has_c:
            if not operands:
                return None  # "-c: option requires an argument"
            if operands[0].value is None:
                self.out.structural(f"{prog} -c with text not known until run time")
                return None
            self.reparse(operands[0].value, f"{prog} -c")
            return None
        if operands and not has_s:
            return f"{prog} runs the script file {operands[0].text} (its content is not visible)"
        return self.stdin_shell(prog, stdin_fed)

    def su(self, prog: str, words: list[_Word], stdin_fed: bool) -> str | None:
        command: _Word | None = None
        positional: list[_Word] = []
        i = 1
        while i < len(words):
            w = words[i]
            v = w.value
            if v is None:
                if command is None and i > 0 and words[i - 1].value in ("-c", "--command"):
                    command = w
                else:
                    positional.append(w)
            elif v in ("-c", "--command"):
                i += 1
                if i < len(words):
                    command = words[i]
            elif v.startswith("--command="):
                command = _Word(v.partition("=")[2], v)
            elif v.startswith("-c") and prog != "sg":
                command = _Word(v[2:], v)
            elif v in (
                "-s",
                "--shell",
                "-g",
                "--group",
                "-G",
                "--supp-group",
                "-u",
                "--user",
                "-w",
            ):
                i += 1
            elif v.startswith("-") and v != "-":
                pass
            elif v != "-":
                positional.append(w)
            i += 1
        if prog == "sg" and command is None and len(positional) > 1:
            rest = positional[1:]
            if any(w.value is None for w in rest):
                self.out.structural("sg: command not known until run time")
                return None
            self.reparse(" ".join(w.value or "" for w in rest), "sg")
            return None
        if command is not None:
            if command.value is None:
                self.out.structural(f"{prog} -c with text not known until run time")
                return None
            self.reparse(command.value, f"{prog} -c")
            return None
        if len(positional) > 1:
            return f"{prog}: arguments passed to a shell"
        return self.stdin_shell(prog, stdin_fed)

    def script(self, words: list[_Word], stdin_fed: bool) -> str | None:
        command: _Word | None = None
        i = 1
        while i < len(words):
            v = words[i].value
            if v is None:
                self.out.structural(f"script: argument {words[i].text} is not known until run time")
                return None
            nxt = words[i + 1] if i + 1 < len(words) else _Word("", "")
            if v.startswith("--"):
                name, eq, val = v[2:].partition("=")
                if name == "command":
                    command = _Word(val, v) if eq else nxt
                if name in _SCRIPT_LONG_ARG and not eq:
                    i += 1
            elif v.startswith("-") and len(v) > 1:
                for j, c in enumerate(v[1:], start=2):
                    if c in "cEIOBTmo":
                        val_word = _Word(v[j:], v) if v[j:] else nxt
                        if not v[j:]:
                            i += 1
                        if c == "c":
                            command = val_word
                        break
            i += 1
        if command is not None:
            if command.value is None:
                self.out.structural("script -c with text not known until run time")
                return None
            self.reparse(command.value, "script -c")
            return None
        return self.stdin_shell("script", stdin_fed)

    def interpreter(self, prog: str, words: list[_Word], stdin_fed: bool) -> str | None:
        args = words[1:]
        if any(w.value is None for w in args):
            return f"{prog} with arguments not known until run time"
        values = [w.value or "" for w in args]
        if values and all(v in _INFO_FLAGS for v in values):
            return None
        if all(v in ("-i", "-q", "-u", "-B", "-E", "-s", "-I", "-", "-w") for v in values):
            if stdin_fed:
                self.out.structural(f"code fed to {prog} through a pipe, here-document or file")
                return None
            self.out.interpreter_found("other")
            return None
        if any(v[:2] in ("-c", "-e", "-E", "-r", "-p", "-m", "-x") for v in values):
            return f"{prog} runs code given on the command line"
        return f"{prog} runs a script file (its content is not visible)"

    def awk(self, words: list[_Word]) -> str | None:
        i = 1
        while i < len(words):
            w = words[i]
            if w.value is None:
                return "awk with a program not known until run time"
            v = w.value
            if v in ("-f", "--file") or v.startswith("-f") or v.startswith("--file="):
                return "awk runs a program file"
            if v in ("-v", "-F", "--assign", "--field-separator"):
                i += 2
                continue
            if v == "--":
                i += 1
                break
            if v.startswith("-") and len(v) > 1:
                i += 1
                continue
            break
        if i >= len(words):
            return None
        program = words[i].value
        if program is None:
            return "awk with a program not known until run time"
        if re.search(r"system|\||@load|getline", program):
            return "awk program runs commands (system, pipes)"
        return None

    def find(self, words: list[_Word], stdin_fed: bool) -> None:
        i = 1
        while i < len(words):
            v = words[i].value
            if v in ("-exec", "-execdir", "-ok", "-okdir"):
                j = i + 1
                while j < len(words) and words[j].value not in (";", "+"):
                    j += 1
                inner = words[i + 1 : j]
                if inner:
                    self.simple(inner, stdin_fed)
                i = j
            i += 1

    # ---- words --------------------------------------------------------------------

    def word(self, node: Node) -> _Word:
        """The value the shell gives ``node`` (None when it depends on run time)."""
        text = self.text(node)
        parts: list[str] = []
        why = self._word_value(node, parts, top=True)
        if why:
            return _Word(None, text, why)
        return _Word("".join(parts), text)

    def _word_value(self, node: Node, parts: list[str], top: bool = False) -> str:
        kind = node.type
        text = self.text(node)
        if kind in ("word", "command_name") and not node.named_children:
            if _glob(text):
                return "a glob"
            parts.append(_unescape(text))
            return ""
        if kind == "number":
            parts.append(text)
            return ""
        if kind == "raw_string":
            parts.append(text[1:-1])
            return ""
        if kind == "ansi_c_string":
            parts.append(_ansi_c(text[2:-1]))
            return ""
        if kind in ("string", "translated_string"):
            pos = node.start_byte + (2 if kind == "translated_string" else 1)
            end = node.end_byte - 1
            for child in node.children:
                if child.start_byte < pos:
                    continue
                if child.start_byte > pos:
                    parts.append(
                        _dq_unescape(
                            self.src[pos : child.start_byte].decode("utf-8", "surrogateescape")
                        )
                    )
                if child.type == "string_content":
                    parts.append(_dq_unescape(self.text(child)))
                elif child.type == '"':
                    pos = child.end_byte
                    continue
                else:
                    return _why(child.type)
                pos = child.end_byte
            if pos < end:
                parts.append(_dq_unescape(self.src[pos:end].decode("utf-8", "surrogateescape")))
            return ""
        if kind in ("concatenation", "command_name"):
            skeleton = []
            pos = node.start_byte
            for child in node.children:
                if child.start_byte > pos:
                    gap = self.src[pos : child.start_byte].decode("utf-8", "surrogateescape")
                    skeleton.append(gap)
                    parts.append(_unescape(gap))
                if child.type == "word":
                    skeleton.append(self.text(child))
                else:
                    skeleton.append("Q")
                why = self._word_value(child, parts)
                if why:
                    return why
                pos = child.end_byte
            if pos < node.end_byte:
                gap = self.src[pos : node.end_byte].decode("utf-8", "surrogateescape")
                skeleton.append(gap)
                parts.append(_unescape(gap))
            joined = "".join(skeleton)
            if _brace(joined):
                return "a brace expansion"
            if _glob(joined):
                return "a glob"
            return ""
        return _why(kind)


def _why(kind: str) -> str:
    return {
        "simple_expansion": "a variable",
        "expansion": "a variable",
        "command_substitution": "a command substitution",
        "process_substitution": "a process substitution",
        "arithmetic_expansion": "an arithmetic expansion",
        "brace_expression": "a brace expansion",
        "extglob_pattern": "a glob",
    }.get(kind, kind.replace("_", " "))


def _descendants(node: Node) -> list[Node]:
    out: list[Node] = []
    stack = list(node.children)
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children)
    return out


def _feeds_stdin(walk: _Walk, redirect: Node) -> bool:
    """True when a redirection replaces standard input (``<``, ``<>``, here-docs)."""
    if redirect.type in ("heredoc_redirect", "herestring_redirect"):
        return True
    if redirect.type != "file_redirect":
        return False
    fd = redirect.child_by_field_name("descriptor")
    ops = [c.type for c in redirect.children if not c.is_named]
    reads = any(op in ("<", "<>", "<&", "<&-") for op in ops)
    return reads and (fd is None or walk.text(fd) == "0")


_GLOB = re.compile(r"(?<!\\)(?:\\\\)*[*?\[]")
_BRACE = re.compile(r"(?<!\\)\{[^{}\s]*(?:,|\.\.)[^{}\s]*(?<!\\)\}")


def _safe_glob(word: _Word) -> bool:
    return word.why == "a glob" and word.text[:1] not in (
        "*",
        "?",
        "[",
        "-",
        "'",
        '"',
        "$",
        "\\",
        "",
    )


def _glob(text: str) -> bool:
    return bool(_GLOB.search(text)) or (text.startswith(("@(", "!(", "+(")) and ")" in text)


def _brace(text: str) -> bool:
    return bool(_BRACE.search(text))


def _unescape(text: str) -> str:
    """Unquoted backslashes: ``\\x`` is ``x``, a backslash-newline is nothing."""
    return re.sub(
        r"\\(.)|\\$", lambda m: "" if m.group(1) in (None, "\n") else m.group(1), text, flags=re.S
    )


def _dq_unescape(text: str) -> str:
    return re.sub(r"\\([$`\"\\\n])", lambda m: "" if m.group(1) == "\n" else m.group(1), text)


_ANSI = {
    "a": "\a",
    "b": "\b",
    "e": "\x1b",
    "E": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "'": "'",
    '"': '"',
    "?": "?",
}


def _ansi_c(body: str) -> str:
    def repl(m: re.Match[str]) -> str:
        s = m.group(0)[1:]
        if s[0] in _ANSI:
            return _ANSI[s[0]]
        if s[0] in "01234567":
            return chr(int(s, 8) & 0xFF)
        if s[0] in "xuU":
            digits = s[1:]
            return chr(int(digits, 16)) if digits else m.group(0)
        if s[0] == "c" and len(s) > 1:
            return chr(ord(s[1].upper()) ^ 0x40)
        return m.group(0)

    return re.sub(
        r"\\(?:[abeEfnrtv\\'\"?]|[0-7]{1,3}|x[0-9A-Fa-f]{1,2}|u[0-9A-Fa-f]{1,4}|U[0-9A-Fa-f]{1,8}|c.)",
        repl,
        body,
    )


_PLAIN = frozenset(
    {
        "program",
        "list",
        "subshell",
        "compound_statement",
        "do_group",
        "if_statement",
        "elif_clause",
        "else_clause",
        "while_statement",
        "case_statement",
        "case_item",
        "negated_command",
        "variable_assignments",
        "file_redirect",
        "herestring_redirect",
        "heredoc_start",
        "heredoc_body",
        "heredoc_content",
        "heredoc_end",
        "word",
        "number",
        "raw_string",
        "ansi_c_string",
        "string",
        "string_content",
        "translated_string",
        "concatenation",
        "simple_expansion",
        "command_substitution",
        "process_substitution",
        "variable_name",
        "special_variable_name",
        "comment",
        "file_descriptor",
        "array",
        "binary_expression",
        "unary_expression",
        "ternary_expression",
        "postfix_expression",
        "parenthesized_expression",
        "test_operator",
        "regex",
        "extglob_pattern",
        "brace_expression",
        "command_name",
        "unset_command",
    }
)

_HANDLERS = {
    "command": _Walk._command,
    "pipeline": _Walk._pipeline,
    "redirected_statement": _Walk._redirected,
    "heredoc_redirect": _Walk._heredoc_redirect,
    "arithmetic_expansion": _Walk._arith,
    "compound_statement": _Walk._compound,
    "c_style_for_statement": _Walk._c_for,
    "for_statement": _Walk._for,
    "subscript": _Walk._subscript,
    "expansion": _Walk._expansion,
    "test_command": _Walk._test,
    "variable_assignment": _Walk._assignment,
    "declaration_command": _Walk._declaration,
    "function_definition": _Walk._function,
}


@dataclass
class _Result:
    commands: list[SimpleCommand] = field(default_factory=list)
    structure: str | None = None
    parse_error: bool = False
    interpreter: Interpreter | None = None

    def structural(self, reason: str) -> None:
        if self.structure is None:
            self.structure = reason

    def add(self, cmd: SimpleCommand) -> None:
        self.commands.append(cmd)

    def interpreter_found(self, kind: Interpreter) -> None:
        if self.interpreter != "shell":
            self.interpreter = kind


def _parser() -> Parser:
    return Parser(_LANGUAGE)


_PARSER = _parser()


def _analyze_into(text: str, depth: int, budget: _Budget, out: _Result) -> None:
    if len(text) > MAX_TEXT:
        out.structural(f"longer than {MAX_TEXT} characters")
        return
    if "\x00" in text:
        out.structural("contains a NUL byte")
    _parse_walk(text, depth, budget, out)
    if out.structure and out.structure.startswith("misplaced reserved word") and "!" in text:
        # The grammar cannot read `! compound` (`! if ...`, `! case ...`); without the
        # `!` (it only inverts the exit status) the same commands run.
        _parse_walk(_BANG.sub(r"\1", text), depth, budget, out)
    if "((" in text or "))" in text:
        # dash (sh on Debian) runs `((cmd))` as nested subshells where bash evaluates
        # arithmetic: what the other reading runs counts when a rule names it.
        side = _Result()
        _parse_walk(text.replace("((", "( (").replace("))", ") )"), depth, budget, side)
        out.commands.extend(
            SimpleCommand(c.argv, c.unknown, c.opaque, speculative=True) for c in side.commands
        )
    if "\\\n" in text:
        # bash removes a backslash-newline before it splits words (`r\<newline>m` is
        # `rm`); the grammar reads it as a blank. Check the joined text too.
        _parse_walk(text.replace("\\\n", ""), depth, budget, out)
    if _history(text):
        out.structural("history expansion (!) would change the line")


_BANG = re.compile(r"(^|[;&|(){}\s])!\s+")


def _parse_walk(text: str, depth: int, budget: _Budget, out: _Result) -> None:
    src = text.encode("utf-8", "surrogateescape")
    tree = _PARSER.parse(src)
    if depth == 0 and tree.root_node.has_error:
        out.parse_error = True
    _Walk(src, depth, budget, out).walk(tree.root_node)


def _history(text: str) -> bool:
    if text.lstrip().startswith("^"):
        return True
    if "!" not in text:
        return False
    # Single quotes stop history expansion; a rough strip is enough to decide.
    return bool(_HISTORY.search(re.sub(r"'[^']*'", "''", text)))


def analyze(text: str) -> ShellAnalysis:
    """Parse ``text`` as the target's shell would."""
    if len(text) <= _CACHED_TEXT:
        return _analyze_cached(text)
    return _analyze(text)


@lru_cache(maxsize=4096)
def _analyze_cached(text: str) -> ShellAnalysis:
    return _analyze(text)


def _analyze(text: str) -> ShellAnalysis:
    out = _Result()
    _analyze_into(text, 0, _Budget(), out)
    commands = tuple(out.commands)
    opaque = out.structure or next((c.opaque for c in commands if c.opaque), None)
    incomplete = out.parse_error and _open(text)
    interpreter = out.interpreter if not out.parse_error else None
    return ShellAnalysis(commands, opaque, interpreter, incomplete, out.structure)


_OPENERS = {
    "if": "fi",
    "for": "done",
    "while": "done",
    "until": "done",
    "select": "done",
    "case": "esac",
    "{": "}",
}
_CLOSERS = frozenset(_OPENERS.values())
_KEEP_CMD = frozenset({"then", "else", "elif", "do", "!", "time", "in"})


def _open(text: str) -> bool:
    """True when ``text`` ends inside a construct that more lines would complete (what
    makes an interactive shell print its PS2 prompt)."""
    stack: list[str] = []
    heredocs: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    at_cmd = True
    dangling = False
    while i < n:
        top = stack[-1] if stack else ""
        c = text[i]
        if top == "'":
            if c == "'":
                stack.pop()
            i += 1
            continue
        if top == "$'":
            if c == "\\":
                i += 2
                continue
            if c == "'":
                stack.pop()
            i += 1
            continue
        if c == "\\":
            if i + 1 >= n:
                return True  # a line continuation
            i += 2
            continue
        if top == '"':
            if c == '"':
                stack.pop()
            elif c == "`":
                stack.append("`")
            elif text.startswith("$(", i):
                stack.append(")")
                i += 1
            elif text.startswith("${", i):
                stack.append("}")
                i += 1
            i += 1
            continue
        if c == "\n" and heredocs:
            for delim, strip in heredocs:
                end = i + 1
                while True:
                    nl = text.find("\n", end)
                    line = text[end:] if nl < 0 else text[end:nl]
                    if (line.lstrip("\t") if strip else line) == delim:
                        i = n if nl < 0 else nl
                        break
                    if nl < 0:
                        return True  # the here-document's body is not finished
                    end = nl + 1
            heredocs = []
            at_cmd, dangling = True, False
            i += 1
            continue
        if c in " \t":
            i += 1
            continue
        if c == "#" and (i == 0 or text[i - 1] in " \t\n;&|("):
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        if c in "\n;":
            at_cmd, dangling = True, dangling and c == "\n"
            i += 1
            continue
        if text.startswith(("&&", "||"), i):
            at_cmd = dangling = True
            i += 2
            continue
        if c in "|&":
            at_cmd, dangling = True, c == "|"
            i += 1
            continue
        dangling = False
        if c == "'":
            stack.append("'")
        elif text.startswith("$'", i):
            stack.append("$'")
            i += 1
        elif c == '"':
            stack.append('"')
        elif c == "`":
            if top == "`":
                stack.pop()
            else:
                stack.append("`")
        elif text.startswith("$(", i) or text.startswith("${", i):
            stack.append(")" if text[i + 1] == "(" else "}")
            i += 1
        elif c == "(":
            stack.append(")")
            at_cmd = True
        elif c == ")" or (c == "}" and top == "}"):
            if top == c:
                stack.pop()
        elif text.startswith("<<", i) and not text.startswith("<<<", i):
            m = re.compile(r"<<(-?)\s*(['\"]?)([^\s;&|<>()'\"]+)\2").match(text, i)
            if m:
                heredocs.append((m.group(3).replace("\\", ""), bool(m.group(1))))
                i = m.end()
                continue
        else:
            m = re.compile(r"[^\s;&|()<>'\"`$\\]+").match(text, i)
            if m:
                word = m.group(0)
                if at_cmd and word in _OPENERS:
                    stack.append(_OPENERS[word])
                elif at_cmd and word in _CLOSERS and top == word:
                    stack.pop()
                at_cmd = word in _KEEP_CMD or (at_cmd and bool(_ASSIGNMENT.match(word)))
                i = m.end()
                continue
        i += 1
    return bool(stack or heredocs or dangling)
