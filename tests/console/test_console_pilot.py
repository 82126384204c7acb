"""The console driven by Textual's pilot against a real relay (and the real sshd
target behind it), with real OpenSSH clients producing the sessions."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Label, Static

from console.api import ApiClient
from console.app import ConsoleApp
from console.screens.approval_detail import ApprovalDetailScreen
from console.screens.approvals import ApprovalsScreen
from console.screens.live import LiveScreen
from console.screens.player import PlayerScreen
from console.screens.reason import ReasonScreen
from console.widgets.terminal_view import TerminalView
from recorder.masking import luhn_complete
from tests.fix_relay import TOKENS, Relay, start_relay
from tests.fix_sshd import SshTarget

VISA = luhn_complete("411111111111111")
MASKED = f"{VISA[:6]}******{VISA[-4:]}"
SIZE = (160, 48)


@pytest.fixture(scope="module")
def relay(sshd_target: SshTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One relay for the module, stopped at its end."""
    r = start_relay(tmp_path_factory.mktemp("console-relay"), sshd_target)
    try:
        yield r
    finally:
        r.stop()


def console(relay: Relay) -> ConsoleApp:
    return ConsoleApp(ApiClient(relay.api, TOKENS["alice"]), poll_interval=0.3)


async def until(pilot: Pilot[Any], check: Callable[[], Any], timeout: float = 15.0) -> None:
    """Let the app run until ``check()`` is true, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await pilot.pause(0.05)
    pytest.fail("the console did not get there in time")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


class Held:
    """An agent's ssh command waiting for approval (the real OpenSSH client)."""

    def __init__(self, relay: Relay, command: str) -> None:
        self.proc = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web@127.0.0.1", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = b""
        self.err = b""
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, name: str) -> None:
        while chunk := stream.read1(4096):
            setattr(self, name, getattr(self, name) + chunk)

    def approval_id(self) -> int | None:
        m = re.search(rb"approval #(\d+) required", self.err)
        return int(m.group(1)) if m else None

    def finish(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def table_rows(table: DataTable[Any]) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_sessions_table_lists_an_ssh_session_and_filters(relay: Relay) -> None:
    res = relay.ssh("web", f"echo console-table-check {VISA}")
    assert res.returncode == 0 and MASKED.encode() in res.stdout

    async def scenario() -> None:
        app = console(relay)
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one("#sessions", DataTable)

            def listed() -> list[list[str]]:
                return [r for r in table_rows(table) if "console-table-check" in r[-1]]

            await until(pilot, lambda: listed() and listed()[0][5] != "live")
            row = listed()[0]
            assert row[:3] == ["ci-agent", "web", "ssh"]
            assert MASKED in row[-1] and VISA not in row[-1]
            # Filter as you type: only the matching session stays.
            await pilot.press("slash", *"table-check")
            assert app.screen.query_one("#filter", Input).value == "table-check"
            await until(pilot, lambda: table.row_count == 1)
            await pilot.press("escape")
            assert app.screen.query_one("#filter", Input).value == ""
            assert app.focused is table and listed()
            # A session that matches nothing empties the table.
            await pilot.press("slash", *"no-such-session-zz")
            await until(pilot, lambda: table.row_count == 0)

    run(scenario)


def test_approve_from_the_console_releases_the_held_command(relay: Relay) -> None:
    async def scenario() -> None:
        app = console(relay)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await pilot.pause(0.5)
            held = Held(relay, "systemctl restart app 2>/dev/null; echo released-by-console")
            try:
                await until(pilot, lambda: held.approval_id() is not None, 20)
                aid = held.approval_id()
                # The new request is announced on the sessions screen too.
                await until(
                    pilot,
                    lambda: any(f"approval #{aid}" in n.title for n in app._notifications),
                )
                await pilot.press("f3")
                screen = app.screen
                assert isinstance(screen, ApprovalsScreen)
                table = screen.query_one("#approvals", DataTable)
                await until(pilot, lambda: str(aid) in [r[0] for r in table_rows(table)])
                table.move_cursor(row=[r[0] for r in table_rows(table)].index(str(aid)))
                assert not held.out
                await pilot.press("a")
                code = await asyncio.to_thread(held.finish)
            finally:
                held.kill() if held.proc.returncode is None else None
            assert code == 0 and b"released-by-console" in held.out
            assert b"granted by alice" in held.err
            await until(pilot, lambda: "alice (approve" in screen.last_decision)
            assert f"approval #{aid} approved" in screen.last_decision
            decision = screen.query_one("#decision", Static)
            assert "alice" in str(decision.render())
            await until(pilot, lambda: str(aid) not in [r[0] for r in table_rows(table)])

    run(scenario)


def test_deny_with_a_reason_refuses_the_held_command(relay: Relay) -> None:
    async def scenario() -> None:
        app = console(relay)
        async with app.run_test(size=SIZE) as pilot:
            held = Held(relay, "systemctl restart app; echo should-not-run")
            try:
                await until(pilot, lambda: held.approval_id() is not None, 20)
                aid = held.approval_id()
                await pilot.press("f3")
                table = app.screen.query_one("#approvals", DataTable)
                await until(pilot, lambda: str(aid) in [r[0] for r in table_rows(table)])
                table.move_cursor(row=[r[0] for r in table_rows(table)].index(str(aid)))
                await pilot.press("d")
                await until(pilot, lambda: isinstance(app.screen, ReasonScreen))
                # An empty reason is not accepted: the prompt stays.
                await pilot.press("enter")
                await pilot.pause(0.2)
                assert isinstance(app.screen, ReasonScreen)
                await pilot.press(*"change freeze", "enter")
                code = await asyncio.to_thread(held.finish)
            finally:
                held.kill() if held.proc.returncode is None else None
            assert code == 126
            assert b"denied by alice: change freeze" in held.err
            assert b"should-not-run" not in held.out

    run(scenario)


@pytest.mark.parametrize("approve", [True, False], ids=["approve", "deny"])
def test_decide_from_the_request_in_full(relay: Relay, approve: bool) -> None:
    async def scenario() -> None:
        app = console(relay)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app._known is not None)  # the first poll is done
            held = Held(relay, f"systemctl restart app 2>/dev/null; echo detail-{approve}")
            try:
                await until(pilot, lambda: held.approval_id() is not None, 20)
                aid = held.approval_id()
                await until(pilot, lambda: app.rang == 1)  # a new request rings the bell
                await pilot.press("f3")
                table = app.screen.query_one("#approvals", DataTable)
                await until(pilot, lambda: str(aid) in [r[0] for r in table_rows(table)])
                table.move_cursor(row=[r[0] for r in table_rows(table)].index(str(aid)))
                await pilot.press("enter")
                await until(pilot, lambda: isinstance(app.screen, ApprovalDetailScreen))
                detail = app.screen
                assert isinstance(detail, ApprovalDetailScreen) and detail.approval_id == aid
                request = str(detail.query_one("#request", Static).render())
                assert f"approval #{aid}" in request and "systemctl restart app" in request
                status = lambda: str(detail.query_one("#status", Label).render())  # noqa: E731
                await until(pilot, lambda: "left" in status())
                # The session's screen beside it: the relay's own notice to the agent.
                view = detail.query_one("#term", TerminalView)
                await until(pilot, lambda: f"approval #{aid}" in view.screen_text())
                assert not held.out
                if approve:
                    await pilot.press("a")
                else:
                    await pilot.press("d")
                    await until(pilot, lambda: isinstance(app.screen, ReasonScreen))
                    await pilot.press(*"not now", "enter")
                code = await asyncio.to_thread(held.finish)
            finally:
                held.kill() if held.proc.returncode is None else None
            if approve:
                assert code == 0 and f"detail-{approve}".encode() in held.out
            else:
                assert code == 126 and b"denied by alice: not now" in held.err
                assert b"detail-" not in held.out
            verb = "approved" if approve else "denied"
            await until(pilot, lambda: f"approval #{aid} {verb}" in status())

    run(scenario)


def test_live_watch_shows_a_running_ssh_session_masked(relay: Relay) -> None:
    agent = subprocess.Popen(
        [
            "ssh",
            *relay.ssh_args(),
            "web@127.0.0.1",
            f'for i in $(seq 1 150); do echo "livetick $i card {VISA}"; sleep 0.1; done',
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def scenario() -> None:
        app = console(relay)
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one("#sessions", DataTable)

            def live_row() -> int | None:
                for i, r in enumerate(table_rows(table)):
                    if "livetick" in r[-1] and r[5] == "live":
                        return i
                return None

            await until(pilot, lambda: live_row() is not None)
            row = live_row()
            assert row is not None
            table.move_cursor(row=row)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, LiveScreen))
            view = app.screen.query_one("#term", TerminalView)
            await until(pilot, lambda: view.screen_text().count("livetick") >= 3)
            text = view.screen_text()
            assert f"card {MASKED}" in text and VISA not in text
            # What is drawn is what the model holds: the rendered rows show it too.
            drawn = "".join(
                "".join(seg.text for seg in view.render_line(y)) for y in range(view.size.height)
            )
            assert f"card {MASKED}" in drawn and VISA not in drawn
            # New output keeps arriving and redraws only the rows that changed.
            before = view.screen_text()
            await until(pilot, lambda: view.screen_text() != before)
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, LiveScreen))

    try:
        run(scenario)
    finally:
        agent.kill()
        agent.wait(10)


def test_player_opens_a_recording_and_seeks_to_its_marker(relay: Relay) -> None:
    held = Held(relay, "systemctl restart app 2>/dev/null; echo after-approval")
    try:
        deadline = time.monotonic() + 20
        while held.approval_id() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        aid = held.approval_id()
        assert aid is not None
        res = relay.castgate("approve", str(aid), "--token", TOKENS["bob"])
        assert res.returncode == 0, res.stderr
        assert held.finish() == 0
    finally:
        held.kill() if held.proc.returncode is None else None

    async def scenario() -> None:
        app = console(relay)
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one("#sessions", DataTable)

            def row() -> int | None:
                for i, r in enumerate(table_rows(table)):
                    if "after-approval" in r[-1] and r[5] != "live":
                        return i
                return None

            await until(pilot, lambda: row() is not None)
            table.move_cursor(row=row())
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, PlayerScreen))
            player = app.screen
            assert isinstance(player, PlayerScreen)
            await until(pilot, lambda: player.index is not None)
            assert player.index is not None
            labels = [m.label for m in player.index.markers]
            assert any(f"approval #{aid}" in label and "bob" in label for label in labels), labels
            granted = next(m for m in player.index.markers if "granted" in m.label)
            view = player.query_one("#term", TerminalView)
            # ] jumps from marker to marker until the grant; the output comes after it.
            for _ in player.index.markers:
                if player.position >= granted.time:
                    break
                before = player.position
                await pilot.press("right_square_bracket")
                assert player.position > before
            assert player.position == pytest.approx(granted.time)
            assert "granted" in str(player.query_one("#status", Static).render())
            assert "after-approval" not in view.screen_text()
            # Seek forward to the end: the released command's output is on screen.
            await pilot.press("right", "right", "right")
            await until(pilot, lambda: "after-approval" in view.screen_text())
            # Back to the start through the markers: nothing printed yet.
            for _ in range(len(player.index.markers) + 1):
                await pilot.press("left_square_bracket")
            assert player.position == 0.0
            assert "after-approval" not in view.screen_text()
            await pilot.press("escape")

    run(scenario)
