"""What an SSH exec command or shell line runs, for the command policy: the simple
commands found anywhere in it, whether it starts an interpreter that reads further
commands from its input, and, when the text cannot be understood, why (it is opaque).

Interface stub: a shlex split of the whole text as one command. The real parser (a
shell grammar, substitutions, ``sh -c`` arguments, wrappers) replaces the body of
``analyze``; callers depend only on ``ShellAnalysis``.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass
from typing import Literal

Interpreter = Literal["shell", "other"]


@dataclass(frozen=True)
class SimpleCommand:
    """One simple command: its words as the shell would pass them (quotes removed),
    wrappers such as ``env`` or ``sudo`` already stripped."""

    argv: tuple[str, ...]

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


_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "script"})
_OTHERS = frozenset({"python", "python3", "perl", "ruby", "node", "irb", "lua", "tclsh"})


def analyze(text: str) -> ShellAnalysis:
    """Parse ``text`` as the target's shell would."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        return ShellAnalysis((), f"cannot parse: {exc}", incomplete=True)
    if not words:
        return ShellAnalysis(())
    cmd = SimpleCommand(tuple(words))
    flags = set(words[1:])
    interpreter: Interpreter | None = None
    if cmd.program in _SHELLS and flags <= {"-i", "-s", "-l", "--login", "-"}:
        interpreter = "shell"
    elif cmd.program in _OTHERS and flags <= {"-i", "-"}:
        interpreter = "other"
    return ShellAnalysis((cmd,), interpreter=interpreter)
