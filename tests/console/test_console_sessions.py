"""The sessions screen under load and hostile input (canned API answers): agent-typed
titles are shown as typed, a refresh updates cells in place, and the screen stops
polling while a live watch covers it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from textual.widgets import DataTable

from console.app import ConsoleApp
from console.screens.live import LiveScreen
from console.screens.sessions import SessionsScreen
from tests.console.snapshot_app import NOW, SESSIONS, FakeApi

SIZE = (160, 40)
HOSTILE = "echo [b]loud[/b] [@click=app.quit]click me[/] [red]x"


@dataclass(frozen=True)
class CountingApi(FakeApi):
    """``n`` live sessions started one second apart; counts the session polls."""

    n: int = 1
    title: str = "sleep 600"
    polls: list[float] = field(default_factory=list)

    async def sessions(self, live: bool | None = None, limit: int = 200) -> list[dict[str, Any]]:
        self.polls.append(time.monotonic())
        return [
            {
                "id": f"s-{i:03}",
                "identity": "ci-agent",
                "target": "web",
                "protocol": "ssh",
                "started_at": (NOW - timedelta(seconds=60 + i)).isoformat(),
                "ended_at": None,
                "status": "live",
                "title": f"{self.title} #{i}",
                "live_here": True,
            }
            for i in range(self.n)
        ]


def _row_text(table: DataTable[Any], y: int) -> str:
    return "".join(seg.text for seg in table.render_line(y))


def test_agent_typed_titles_are_not_parsed_as_markup() -> None:
    async def scenario() -> None:
        app = ConsoleApp(
            CountingApi("http://fake", "t", 1, HOSTILE), poll_interval=3600, clock=lambda: NOW
        )
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one("#sessions", DataTable)
            while not table.row_count:
                await pilot.pause(0.05)
            await pilot.pause(0.2)
            drawn = _row_text(table, 1)  # row 0 is the header
            assert f"{HOSTILE} #0" in drawn, drawn

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_refresh_updates_ticking_durations_in_place() -> None:
    clock = [NOW]
    api = CountingApi("http://fake", "t", 100)

    async def scenario() -> None:
        app = ConsoleApp(api, poll_interval=3600, sessions_interval=3600, clock=lambda: clock[0])
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            assert isinstance(screen, SessionsScreen)
            table = screen.query_one("#sessions", DataTable)
            while table.row_count < 100:
                await pilot.pause(0.05)
            table.move_cursor(row=42)
            rebuilt: list[int] = []
            original_clear = table.clear

            def clear(columns: bool = False) -> Any:
                rebuilt.append(1)
                return original_clear(columns)

            table.clear = clear  # type: ignore[method-assign]
            assert str(table.get_cell("s-042", "duration")) == "1:42"
            clock[0] = NOW + timedelta(seconds=2)
            screen.reload()
            await pilot.pause(0.3)
            assert str(table.get_cell("s-042", "duration")) == "1:44"
            assert str(table.get_cell("s-099", "duration")) == "2:41"
            assert not rebuilt and table.row_count == 100 and table.cursor_row == 42
            _row_text(table, 1)  # still draws

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_sessions_screen_does_not_poll_under_a_live_watch() -> None:
    api = CountingApi("http://fake", "t", 3)

    async def scenario() -> None:
        app = ConsoleApp(api, poll_interval=3600, sessions_interval=0.05, clock=lambda: NOW)
        async with app.run_test(size=SIZE) as pilot:
            while len(api.polls) < 3:
                await pilot.pause(0.05)
            app.push_screen(LiveScreen(SESSIONS[0]))
            await pilot.pause(0.3)
            covered = len(api.polls)
            await pilot.pause(0.5)  # ten poll intervals
            assert len(api.polls) == covered
            app.pop_screen()
            await pilot.pause(0.3)
            assert len(api.polls) > covered

    asyncio.run(asyncio.wait_for(scenario(), 60))
