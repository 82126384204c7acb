"""The echoed-line model behind the shell command policy."""

from __future__ import annotations

from relay.shell_line import ShellLine, TypedLine


def typed(line: ShellLine, prompt: bytes, echo: bytes) -> str | None:
    line.feed(prompt)
    line.mark_input_start()
    line.feed(echo)
    return line.submitted()


def test_plain_echo_after_prompt() -> None:
    assert typed(ShellLine(), b"output\r\nuser@host:~$ ", b"ls -la") == "ls -la"


def test_backspace_and_erase_in_line() -> None:
    # bash echoes a backspace as BS, space, BS.
    assert typed(ShellLine(), b"$ ", b"rmx\b \b -rf /") == "rm -rf /"
    assert typed(ShellLine(), b"$ ", b"echo hi\r$ \x1b[Krm -rf /") == "rm -rf /"


def test_readline_delete_and_insert() -> None:
    line = ShellLine()
    line.feed(b"$ ")
    line.mark_input_start()
    line.feed(b"echo rm -rf /")
    line.feed(b"\r\x1b[C\x1b[C")  # back to the start of the input
    line.feed(b"\x1b[5P")  # delete "echo "
    assert line.submitted() == "rm -rf /"
    line.feed(b"\r\n$ ")
    line.mark_input_start()
    line.feed(b"rm /x\x1b[3D\x1b[4@ -rf")
    assert line.submitted() == "rm -rf /x"


def test_wrapped_line_redrawn_with_cursor_up() -> None:
    line = ShellLine(width=20)
    line.feed(b"prompt$ ")
    line.mark_input_start()
    line.feed(b"echo 0123456789abcdefghij")  # wraps onto a second row
    line.feed(b"\x1b[A\r\x1b[8C")  # back up to the start of the input
    line.feed(b"\x1b[5P")  # readline deletes within the row...
    line.feed(b"0123456789a\x1b[K")  # ...and redraws the rest of it
    result = line.submitted()
    assert result is not None and result.startswith("0123456789a")


def test_unsure_when_line_is_lost() -> None:
    line = ShellLine(width=20)
    line.feed(b"$ ")
    line.mark_input_start()
    line.feed(b"ls\x1b[H\x1b[2J$ rm -rf /")  # Ctrl-L: cleared and redrawn at the top
    assert line.submitted() is None
    line.feed(b"$ ")
    line.mark_input_start()
    line.feed(b"ls")
    line.resize(40)
    assert line.submitted() is None


def test_output_before_the_prompt_does_not_leak_in() -> None:
    line = ShellLine(width=10)
    line.feed(b"a very long line of output that wraps\r\n$ ")
    assert typed(line, b"", b"id") == "id"


def test_typed_fallback() -> None:
    t = TypedLine()
    t.feed(b"sl\x7f\x7fls -l")
    assert t.take() == ("ls -l", True)
    t.feed(b"\x1b[Arm")
    assert t.take()[1] is False
