"""The PTY line model of an SSH session: keystrokes of an interactive terminal, in
order; keys that only edit the line go straight to the target, a key that may run the
line (Enter, and any key the relay does not model) first puts the echoed line through
the policy (the session's ``decide`` and ``apply``)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING

from relay.policy import Decision
from relay.shell_line import Key, KeyReader, ShellLine, TypedLine

if TYPE_CHECKING:
    from relay.ssh_relay import RelaySession

_ECHO_QUIET = 0.03
_ECHO_MAX = 0.5
_FIRST_PROMPT_MAX = 5.0
# Keystrokes (input = "all") waiting for their echo: never echoed this far means a
# hidden prompt, and they are dropped unrecorded.
_HELD_KEYS_MAX = 64 << 10
# Bash's history expansion (an interactive shell only): `!!`, `!-2`, `!rm` run text
# from the history, which the line does not show.
_HISTORY = re.compile(r"!(?![\s=(]|$)")


class PtyShell:
    """The line being typed in one PTY session, as the terminal echoes it."""

    def __init__(self, session: RelaySession, width: int = 80) -> None:
        self.session = session
        self._line = ShellLine(width)
        self._typed = TypedLine()
        self._keyreader = KeyReader()
        self._last_output = 0.0
        self._last_input = 0.0
        self._echoed = False
        self._held_keys = bytearray()

    def resize(self, width: int) -> None:
        """The terminal's width changed."""
        self._line.resize(width)

    def output_seen(self, data: bytes) -> None:
        """Output of the target (before masking): the line model follows the echo, and
        keys held for their echo (input = "all") are released once it came."""
        self._line.feed(data)
        self._last_output = time.monotonic()
        if self._line.awaiting:
            self._echoed = True
            self._release_keys()

    async def run(self) -> None:
        """Keystrokes of a PTY session, in order: keys that only edit the line go
        straight to the target; a key that may run the line (Enter, and any key the
        relay does not model) first puts the echoed line through the policy."""
        assert self.session.input_queue is not None and self.session.up_chan is not None
        up = self.session.up_chan
        while True:
            data = await self.session.input_queue.get()
            if data is None:
                up.write_eof()
                return
            self.session.dequeued(data)
            for key in self._keyreader.feed(data):
                await self._key(key)

    async def _key(self, key: Key) -> None:
        kind = key.kind
        if kind == "edit":
            await self._keys(key.data)
        elif kind == "accept":
            await self._submit(key.data)
        elif kind == "operate":
            # Operate-and-get-next would then draw the next history line as if typed,
            # before any keystroke marks where the line starts: sent as a plain Enter.
            await self._submit(b"\r")
        elif kind == "interrupt":
            self._line.abandon()
            self._line.expect_break()
            self._keyreader.line_ended()
            self._typed.take()
            self._echoed = False
            self._hold_keys(key.data)
            self._send_key(key.data)
        elif kind == "eof" and not self._line.awaiting and not self._line.break_pending:
            self._send_key(key.data)  # Ctrl-D on an empty line: the shell exits
        else:
            await self._check_key(key)

    def _send_key(self, data: bytes) -> None:
        assert self.session.up_chan is not None
        self._last_input = time.monotonic()
        self.session.up_chan.write(data)

    async def _start_line(self) -> None:
        """The first keystroke of a line: the prompt ends where the cursor is."""
        # Output still coming (the last command's, the prompt) would be read as part
        # of the line: a line typed right behind it starts once it has gone quiet.
        recent = time.monotonic() - self._last_output < _ECHO_QUIET
        if self._line.break_pending or not self._last_output or recent:
            await self._await_prompt()
        self._line.mark_input_start()
        self._echoed = False

    async def _keys(self, data: bytes) -> None:
        if not self._line.awaiting:
            await self._start_line()
        self._typed.feed(data)
        self._hold_keys(data)
        self._send_key(data)

    async def _await_prompt(self) -> None:
        """Typeahead: the shell has not answered the last line with a line break yet,
        or its output is still coming. The next line starts once it has and its output
        went quiet (bounded); started before, the line is unsure and decided as
        opaque."""
        # Before the shell's first output (the login banner, the first prompt) a
        # session may take seconds to start.
        first = not self._last_output
        deadline = time.monotonic() + (_FIRST_PROMPT_MAX if first else _ECHO_MAX)
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self._last_output >= _ECHO_QUIET
            if self._last_output and not self._line.break_pending and quiet:
                return
            await asyncio.sleep(_ECHO_QUIET / 3)

    async def _wait_echo(self) -> None:
        """Let the echo of the last keystrokes arrive before reading the line."""
        deadline = self._last_input + _ECHO_MAX
        while time.monotonic() < deadline:
            last = max(self._last_output, self._last_input)
            if self._echoed and time.monotonic() - last >= _ECHO_QUIET:
                break
            await asyncio.sleep(_ECHO_QUIET / 3)

    def _hold_keys(self, data: bytes) -> None:
        """Keystrokes are kept (input = "all") only once the terminal has echoed them:
        what is typed at a password prompt never reaches the recording."""
        if self.session.ctx.cfg.recording.input == "all":
            self._held_keys += data
            if self._echoed:
                self._release_keys()
            elif len(self._held_keys) > _HELD_KEYS_MAX:
                self._held_keys.clear()

    def _release_keys(self) -> None:
        if self._held_keys:
            keys, self._held_keys = bytes(self._held_keys), bytearray()
            self.session.record_input(keys)

    @staticmethod
    def _judge_line(
        line: str | None, typed: str, reliable: bool, echoed: bool
    ) -> tuple[str, str | None]:
        """The line to decide and, when the relay cannot tell what the shell will run,
        why (the line is then opaque)."""
        if line is None:
            return (typed if reliable else ""), (
                "the relay lost track of the line (output or a redraw it cannot follow)"
            )
        if not echoed:
            if reliable:
                return typed, None
            return "", "typed without echo, with keys the relay cannot replay"
        if reliable and typed != line:
            return line, "the echo does not match the keys typed (output while typing?)"
        if _HISTORY.search(line):
            return line, "history expansion runs text the line does not show"
        return line, None

    async def _decide_line(
        self, text: str, opaque: str | None, echoed: bool, decision: Decision | None = None
    ) -> bool:
        """Log, record and enforce the decision on a shell line; True when it may run."""
        if echoed:
            masked = self.session.ctx.masker.mask(text) if text else f"({opaque})"
            if text and self.session.ctx.cfg.recording.input == "commands":
                self.session.safe(lambda rec: rec.command_line(text))
        else:
            # Typed without echo (a password prompt, or `stty -echo`): the policy still
            # sees it; the recording and the command log never keep it.
            masked = "(input hidden: terminal echo off)"
            self.session.safe(lambda rec: rec.marker("input hidden (terminal echo off)"))
        if decision is None:
            decision = (
                self.session.core.opaque(opaque)
                if opaque is not None
                else self.session.decide(text)
            )
        allowed = await self.session.apply(decision, masked, "shell")
        if allowed and self.session.command_id is not None:
            await self.session.finish_command("submitted")
        return allowed

    def _discard_line(self) -> None:
        """The line was refused: discard it at the target, where the shell prints a
        fresh prompt. Until the shell answers with a line break, the model does not
        trust that it did (Ctrl-C can be ignored)."""
        assert self.session.up_chan is not None
        self.session.up_chan.write(b"\x03")
        self._line.abandon()
        self._line.expect_break()
        self._keyreader.line_ended()

    async def _submit(self, key: bytes) -> None:
        assert self.session.up_chan is not None
        if not self._line.awaiting:
            if self._line.break_pending:
                await self._await_prompt()
            if not self._line.break_pending:
                self.session.record_input(key)  # Enter on an empty line
                self._send_key(key)
                self._line.expect_break()
                return
            # The shell never answered the last line's Enter or discard: that line may
            # still be in its editor, and this Enter would run it.
            self._keyreader.line_ended()
            self._typed.take()
            reason = "the shell did not answer the previous line; it may still be pending"
            if await self._decide_line("", reason, echoed=True):
                self.session.record_input(key)
                self._send_key(key)
                self._line.expect_break()
            else:
                self._discard_line()
            return
        await self._wait_echo()
        echoed = self._echoed
        line = self._line.submitted()
        typed, reliable = self._typed.take()
        self._keyreader.line_ended()
        self._echoed = False
        if echoed:
            self._release_keys()
        else:
            self._held_keys.clear()
        text, opaque = self._judge_line(line, typed, reliable, echoed)
        if opaque is None and not text:
            self.session.record_input(key)
            self._send_key(key)
            self._line.expect_break()
            return
        if await self._decide_line(text, opaque, echoed):
            self.session.record_input(key)
            self._send_key(key)
            self._line.expect_break()
        else:
            self._discard_line()

    async def _check_key(self, key: Key) -> None:
        """A key the relay does not model (Ctrl-D on a line, Meta and Ctrl-X keys,
        vi-mode commands, function keys): it may run the line, so the line is checked
        first; an edit-and-execute key is opaque (an editor decides what runs)."""
        assert self.session.up_chan is not None
        if not self._line.awaiting:
            await self._start_line()
        else:
            await self._wait_echo()
        echoed = self._echoed
        typed, reliable = self._typed.peek()
        text, opaque = self._judge_line(self._line.peek(), typed, reliable, echoed or not typed)
        if key.kind == "execute":
            opaque = "edit-and-execute: an editor decides what runs"
        decision = None
        if opaque is None and text:
            decision = self.session.decide(text)
        checked = opaque is not None or (decision is not None and decision.action != "allow")
        if checked and not await self._decide_line(text, opaque, echoed or not typed, decision):
            self._typed.take()
            self._echoed = False
            self._discard_line()
            return
        self._typed.feed(key.data)
        self._hold_keys(key.data)
        self._send_key(key.data)
        if key.unsure or key.kind == "execute":
            self._line.mark_unsure()
