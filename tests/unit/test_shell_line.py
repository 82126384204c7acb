"""The echoed-line model behind the shell command policy."""

from __future__ import annotations

from relay.shell_line import KeyReader, ShellLine, StdinScript, TypedLine


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


# -- keys ----------------------------------------------------------------------------


def kinds(reader: KeyReader, data: bytes) -> list[tuple[str, bytes]]:
    return [(k.kind, k.data) for k in reader.feed(data)]


def test_editing_keys_pass_and_keys_that_may_run_the_line_do_not() -> None:
    r = KeyReader()
    assert kinds(r, b"ls -l\x7f\x01\x05\x02\x06\x0b\x15\x17\x19\x09\x0c\x10\x0e") == [
        ("edit", b"ls -l"),
        *[("edit", bytes([c])) for c in b"\x7f\x01\x05\x02\x06\x0b\x15\x17\x19\x09\x0c\x10\x0e"],
    ]
    arrows = b"\x1b[A\x1b[B\x1b[C\x1b[D\x1b[H\x1b[F\x1bOA\x1bOH\x1b[3~\x1b[1;5C"
    assert {k for k, _ in kinds(r, arrows)} == {"edit"}
    assert kinds(r, b"\r\n\x1bOM") == [("accept", b"\r"), ("accept", b"\n"), ("accept", b"\x1bOM")]
    assert kinds(r, b"\x0f\x04\x03") == [
        ("operate", b"\x0f"),
        ("eof", b"\x04"),
        ("interrupt", b"\x03"),
    ]
    # Keys the relay does not model: Ctrl-R, Ctrl-T, F5, Meta-Enter.
    assert {k for k, _ in kinds(r, b"\x12\x14\x1b[15~")} == {"other"}
    assert kinds(KeyReader(), b"\x1b\r") == [("other", b"\x1b\r")]


def test_edit_and_execute_and_vi_command_mode() -> None:
    r = KeyReader()
    assert kinds(r, b"\x18\x05") == [("other", b"\x18"), ("execute", b"\x05")]
    assert kinds(r, b"\x18a") == [("other", b"\x18"), ("other", b"a")]
    # After a bare Escape or a Meta key, letters may be vi commands.
    assert kinds(r, b"echo\x1bb") == [("edit", b"echo"), ("other", b"\x1bb")]
    assert kinds(r, b"hx") == [("other", b"hx")]
    assert kinds(r, b"kv") == [("other", b"k"), ("execute", b"v")]
    r.line_ended()
    assert kinds(r, b"ls") == [("edit", b"ls")]
    assert kinds(KeyReader(), b"ls\x1bv") == [("edit", b"ls"), ("execute", b"\x1bv")]


def test_escape_sequences_cut_between_reads() -> None:
    r = KeyReader()
    assert kinds(r, b"a\x1b") == [("edit", b"a")]
    assert kinds(r, b"[") == []
    assert kinds(r, b"A") == [("edit", b"\x1b[A")]
    assert kinds(r, b"\x1bO") == []
    assert kinds(r, b"M") == [("accept", b"\x1bOM")]


def test_a_newline_pasted_or_quoted_is_not_a_submission() -> None:
    r = KeyReader()
    keys = r.feed(b"\x1b[200~echo a\rrm x\x1b[201~")
    assert [(k.kind, k.unsure) for k in keys] == [
        ("edit", False),
        ("edit", False),
        ("other", True),
        ("edit", False),
        ("edit", False),
    ]
    assert [(k.kind, k.unsure) for k in r.feed(b"\r")] == [("accept", False)]
    assert [(k.kind, k.unsure) for k in r.feed(b"\x16\n")] == [("other", False), ("other", True)]


# -- the line model: what it cannot tell -----------------------------------------------


def test_output_onto_a_new_row_while_typing_makes_the_line_unsure() -> None:
    line = ShellLine()
    line.feed(b"$ ")
    line.mark_input_start()
    line.feed(b"rm -r")
    assert line.peek() == "rm -r"
    line.feed(b"tick\r\n")  # a background job
    line.feed(b"f x")
    assert line.peek() is None
    assert line.submitted() is None


def test_moving_down_within_a_wrapped_line_is_not_output() -> None:
    line = ShellLine(width=20)
    line.feed(b"$ ")
    line.mark_input_start()
    line.feed(b"echo 0123456789abcdefghijklmnopqrstuvwxyz")
    line.feed(b"\x1b[A\x1b[A\x08")  # readline's Ctrl-A on the wrapped line...
    line.feed(b"\r\n\r\n\r\x1b[C\x1b[C\x1b[C")  # ...and its Ctrl-E, moving down with CR LF
    assert line.submitted() == "echo 0123456789abcdefghijklmnopqrstuvwxyz"


def test_a_line_started_before_the_shell_answered_the_last_one_is_unsure() -> None:
    line = ShellLine()
    line.feed(b"$ ")
    line.mark_input_start()
    line.feed(b"echo hi")
    assert line.submitted() == "echo hi"
    line.expect_break()
    assert line.break_pending
    line.mark_input_start()  # typeahead: the Enter's CR LF not seen yet
    line.feed(b"\r\nhi\r\n$ rm -rf x")
    assert line.submitted() is None
    line.expect_break()
    line.feed(b"^C\r\n$ ")
    assert not line.break_pending
    line.mark_input_start()
    line.feed(b"ls")
    assert line.submitted() == "ls"


# -- stdin of a shell without a PTY ----------------------------------------------------


def units(script: StdinScript, data: bytes) -> list[tuple[str, bytes]]:
    return [(u.kind, u.data) for u in script.feed(data)]


def test_stdin_is_cut_into_complete_units() -> None:
    s = StdinScript()
    assert units(s, b"echo a\n\nech") == [("command", b"echo a\n"), ("blank", b"\n")]
    assert units(s, b"o 'two\nlines'\nls") == [("command", b"echo 'two\nlines'\n")]
    assert [(u.kind, u.data) for u in s.finish()] == [("command", b"ls")]
    assert s.finish() == []


def test_stdin_units_are_bounded() -> None:
    s = StdinScript(max_lines=3, max_bytes=100)
    out = units(s, b"echo 'a\nb\nc\nrm x\n")
    assert out == [("opaque", b"echo 'a\nb\nc\n"), ("command", b"rm x\n")]
    s = StdinScript(max_lines=3, max_bytes=100)
    out = units(s, b"x" * 150)
    assert [k for k, _ in out] == ["opaque"]
    assert units(s, b"yyy\nls\n") == [("continuation", b"yyy\n"), ("command", b"ls\n")]
    s = StdinScript()
    s.feed(b"echo 'open\n")
    (unit,) = s.finish()
    assert (unit.kind, unit.reason) == ("opaque", "incomplete at the end of the input")
