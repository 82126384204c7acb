"""Snapshots of each console screen at a fixed size (canned API answers, fixed clock),
and the terminal view's row-level redraws."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from textual.pilot import Pilot

from console.request_text import render_request, time_left
from console.screens.approval_detail import ApprovalDetailScreen
from console.screens.live import LiveScreen
from console.screens.player import PlayerScreen
from console.widgets.terminal_view import TerminalView, row_segments
from replay.terminal import new_terminal
from tests.console.snapshot_app import (
    MASKED,
    NOW,
    PUSH_APPROVAL,
    SESSIONS,
    SQL_APPROVAL,
    make_app,
)

SIZE = (120, 30)
Compare = Callable[..., bool]


async def _settle(pilot: Pilot[Any]) -> None:
    await pilot.pause(0.3)
    await pilot.wait_for_scheduled_animations()


def test_sessions_screen(snap_compare: Compare) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_settle)


def test_approvals_screen(snap_compare: Compare) -> None:
    assert snap_compare(make_app(), press=["f3"], terminal_size=SIZE, run_before=_settle)


def test_live_screen(snap_compare: Compare) -> None:
    async def open_live(pilot: Pilot[Any]) -> None:
        await _settle(pilot)
        pilot.app.push_screen(LiveScreen(SESSIONS[0]))
        await _settle(pilot)
        view = pilot.app.screen.query_one("#term", TerminalView)
        assert f"card {MASKED}" in view.screen_text()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=open_live)


@pytest.mark.parametrize("row", [PUSH_APPROVAL, SQL_APPROVAL], ids=["git-push", "sql"])
def test_approval_detail_screen(snap_compare: Compare, row: dict[str, Any]) -> None:
    async def open_detail(pilot: Pilot[Any]) -> None:
        await _settle(pilot)
        pilot.app.push_screen(ApprovalDetailScreen(row))
        await _settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, ApprovalDetailScreen)
        assert f"card {MASKED}" in screen.query_one("#term", TerminalView).screen_text()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=open_detail)


def test_what_an_approver_reads() -> None:
    push = render_request(PUSH_APPROVAL).plain
    assert push.splitlines()[:2] == [
        "approval #18  rule push-needs-approval  ci-agent@gitsrv",
        "git-receive-pack '/srv/payments.git'",
    ]
    assert "refs/heads/main  1111111111 -> 2222222222  forced" in push
    assert "22222222 2025-03-14 ci-agent: payments: retry declined captures" in push
    assert "src/capture.py | +12 -3" in push and "2 file(s), +52 -3" in push
    assert "refs/tags/v1.4  (none) -> 2222222222  created" in push
    assert f"sha256 {'5f' * 32}" in push
    sql = render_request(SQL_APPROVAL).plain
    assert "$1 = 'stale'" in sql and f"$2 = '{MASKED}'" in sql
    assert "touches: delete orders" in sql
    assert "estimate: about 512 row(s), Delete on orders, cost 38.5" in sql
    failed = {**SQL_APPROVAL, "context": {**SQL_APPROVAL["context"], "estimate": {"error": "boom"}}}
    assert "estimate: no estimate: boom" in render_request(failed).plain
    # An older relay's request: the command alone. Control characters never pass.
    bare = {"id": 3, "rule": "r", "command": "rm -rf /tmp/x\x1b]0;pwned\x07"}
    assert "rm -rf /tmp/x ]0;pwned " in render_request(bare).plain
    assert time_left(SQL_APPROVAL, NOW) == "9m 00s left"
    assert time_left({"expires_at": "2025-03-14T09:00:00+00:00"}, NOW) == "expired"
    assert time_left({}, NOW) == "no expiry"


def test_player_screen_at_a_marker(snap_compare: Compare) -> None:
    async def open_player(pilot: Pilot[Any]) -> None:
        await _settle(pilot)
        pilot.app.push_screen(PlayerScreen(SESSIONS[1]))
        await _settle(pilot)
        player = pilot.app.screen
        assert isinstance(player, PlayerScreen) and player.index is not None
        await pilot.press("right_square_bracket", "right_square_bracket")
        assert player.position == 4.0
        await pilot.press("right")  # 9.0: the masked card is on screen
        await _settle(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=open_player)


def test_terminal_view_redraws_only_changed_rows() -> None:
    term = new_terminal(40, 10)
    term.feed("one\r\ntwo\r\nthree\r\n")
    view = TerminalView(term)
    assert view.sync() == 10  # the first sync draws every row
    assert view.sync() == 0  # nothing changed
    term.feed("four")
    # the row written to, and the cursor's row (the same one here)
    assert view.sync() == 1
    term.feed("\r\nfive")
    assert view.sync() == 2  # old cursor row and the new row
    texts = ["".join(s.text for s in row_segments(r)) for r in view._rows]
    assert texts[3].rstrip() == "four" and texts[4].rstrip() == "five"


@pytest.mark.parametrize("style", ["\x1b[31m", "\x1b[38;2;1;2;3m", "\x1b[7m"])
def test_row_segments_keep_styles_and_cell_widths(style: str) -> None:
    term = new_terminal(10, 2)
    term.feed(f"{style}a\x1b[0m日b")
    segs = row_segments(term.cells()[0])
    text = "".join(s.text for s in segs)
    assert text.startswith("a日b") and len(text) == 9  # the wide char covers two cells
    assert segs[0].style is not None and segs[0].style != segs[1].style
