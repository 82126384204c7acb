"""The console app under snapshot test: canned API answers (masked, as the relay sends
them), a fixed clock, no network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from console.api import ApiClient
from console.app import ConsoleApp

NOW = datetime(2025, 3, 14, 9, 30, 0, tzinfo=UTC)
MASKED = "411111******1111"

SESSIONS: list[dict[str, Any]] = [
    {
        "id": "s-live-0001",
        "identity": "ci-agent",
        "target": "web",
        "protocol": "ssh",
        "started_at": "2025-03-14T09:28:10+00:00",
        "ended_at": None,
        "status": "live",
        "title": "bash",
        "live_here": True,
    },
    {
        "id": "s-done-0002",
        "identity": "ci-agent",
        "target": "appdb",
        "protocol": "postgres",
        "started_at": "2025-03-14T08:02:00+00:00",
        "ended_at": "2025-03-14T08:05:31+00:00",
        "status": "closed",
        "title": f"select pan from cards -- {MASKED}",
        "live_here": False,
    },
]

APPROVALS: list[dict[str, Any]] = [
    {
        "id": 17,
        "session_id": "s-live-0001",
        "identity": "ci-agent",
        "target": "web",
        "rule": "restart-needs-approval",
        "command": "systemctl restart payments",
        "requested_at": "2025-03-14T09:29:00+00:00",
        "expires_at": "2025-03-14T09:39:00+00:00",
        "status": "pending",
        "decisions": [],
    }
]

# Held requests in full, as the relay describes them (issue #22's context).
PUSH_APPROVAL: dict[str, Any] = {
    **APPROVALS[0],
    "id": 18,
    "target": "gitsrv",
    "rule": "push-needs-approval",
    "command": "git-receive-pack '/srv/payments.git'",
    "payload_sha256": "5f" * 32,
    "context": {
        "kind": "git-push",
        "refs": [
            {
                "ref": "refs/heads/main",
                "old": "1" * 40,
                "new": "2" * 40,
                "change": "forced",
                "commits": [
                    {
                        "sha": "2" * 40,
                        "author": "ci-agent",
                        "date": "2025-03-14T09:20:00+00:00",
                        "subject": "payments: retry declined captures",
                    },
                    {
                        "sha": "3" * 40,
                        "author": "ci-agent",
                        "date": "2025-03-14T09:10:00+00:00",
                        "subject": f"fixtures: test card {MASKED}",
                    },
                ],
                "diffstat": {
                    "files": [
                        {"path": "src/capture.py", "added": 12, "removed": 3},
                        {"path": "tests/test_capture.py", "added": 40, "removed": 0},
                    ]
                },
            },
            {"ref": "refs/tags/v1.4", "old": "0" * 40, "new": "2" * 40, "change": "created"},
        ],
    },
}

SQL_APPROVAL: dict[str, Any] = {
    **APPROVALS[0],
    "id": 19,
    "session_id": "s-live-0001",
    "target": "appdb",
    "rule": "deletes-need-approval",
    "command": "DELETE FROM orders WHERE state = $1 AND pan = $2",
    "payload_sha256": "a7" * 32,
    "context": {
        "kind": "sql",
        "statement": "DELETE FROM orders WHERE state = $1 AND pan = $2",
        "parameters": ["stale", MASKED],
        "touches": [{"operation": "delete", "table": "orders"}],
        "estimate": {"rows": 512, "cost": 38.5, "node": "Delete on orders", "error": None},
    },
}

SCREEN = (
    "\x1b[1;32mdeploy@web\x1b[0m:~$ cat orders.csv\r\n"
    f"order-1,card {MASKED},12/26\r\n"
    f"order-2,card {MASKED},01/27\r\n"
    "\x1b[1;32mdeploy@web\x1b[0m:~$ "
)

CAST = "\n".join(
    [
        '{"version": 2, "width": 60, "height": 8, "title": "demo"}',
        '[0.5, "o", "$ echo start\\r\\nstart\\r\\n"]',
        '[1.0, "m", "approval #17 required (rule restart-needs-approval)"]',
        '[4.0, "m", "approval #17 granted by alice"]',
        f'[4.5, "o", "$ cat card\\r\\ncard {MASKED}\\r\\n"]',
        '[9.0, "m", "blocked: no-rm-rf"]',
        '[10.0, "o", "$ exit\\r\\n"]',
    ]
)


class FakeApi(ApiClient):
    """Answers from the tables above."""

    async def sessions(self, live: bool | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return [dict(s) for s in SESSIONS]

    async def approvals(self, status: str = "pending") -> list[dict[str, Any]]:
        return [dict(a) for a in APPROVALS]

    async def approval(self, approval_id: int) -> dict[str, Any]:
        for row in (*APPROVALS, PUSH_APPROVAL, SQL_APPROVAL):
            if int(row["id"]) == approval_id:
                return dict(row)
        raise KeyError(approval_id)

    async def download_cast(self, session_id: str, dest: Path) -> Path:
        dest.write_text(CAST + "\n")
        return dest

    async def live(self, session_id: str) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "screen", "data": SCREEN, "width": 60, "height": 10, "meta": {}}
        yield {"type": "m", "data": "approval #17 required", "t": 0}
        await asyncio.Event().wait()  # the session stays live until the app exits


def make_app() -> ConsoleApp:
    """The console on the fake API."""
    return ConsoleApp(FakeApi("http://fake", "t"), poll_interval=3600, clock=lambda: NOW)
