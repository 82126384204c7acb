"""The console's only way to the relay: the HTTP control API and its live WebSocket.

Every call is a coroutine run inside a Textual worker; failures become ``ApiError``
with one line an operator can read (status and the API's own error message).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

_TIMEOUT = aiohttp.ClientTimeout(total=30)


class ApiError(Exception):
    """The control API refused a request or could not be reached."""


@dataclass(frozen=True)
class ApiClient:
    """Where the control API is and the bearer token to use."""

    url: str
    token: str

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request; the decoded answer, or ApiError."""
        try:
            async with (
                aiohttp.ClientSession(timeout=_TIMEOUT) as http,
                http.request(method, self.url + path, json=body, headers=self._headers) as resp,
            ):
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        message = json.loads(text).get("error", resp.reason)
                    except (ValueError, AttributeError):
                        message = resp.reason
                    raise ApiError(f"{method} {path}: {resp.status} {message}")
                return json.loads(text) if text else None
        except aiohttp.ClientError as exc:
            raise ApiError(f"cannot reach the control API at {self.url}: {exc}") from None

    async def sessions(self, live: bool | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Sessions, newest first."""
        query = f"?limit={limit}" + ("" if live is None else f"&live={str(live).lower()}")
        rows: list[dict[str, Any]] = (await self.request("GET", "/api/v1/sessions" + query))[
            "sessions"
        ]
        return rows

    async def approvals(self, status: str = "pending") -> list[dict[str, Any]]:
        """Approval requests with the given status."""
        rows: list[dict[str, Any]] = (
            await self.request("GET", f"/api/v1/approvals?status={status}")
        )["approvals"]
        return rows

    async def approval(self, approval_id: int) -> dict[str, Any]:
        """One request in full (its context and payload hash where the relay has them)."""
        row: dict[str, Any] = await self.request("GET", f"/api/v1/approvals/{approval_id}")
        return row

    async def decide(self, approval_id: int, approve: bool, reason: str | None) -> dict[str, Any]:
        """Approve or deny; the approval row with its decisions."""
        verb = "approve" if approve else "deny"
        body = {"reason": reason} if reason else {}
        row: dict[str, Any] = await self.request(
            "POST", f"/api/v1/approvals/{approval_id}/{verb}", body
        )
        return row

    async def download_cast(self, session_id: str, dest: Path) -> Path:
        """Save a session's cast to ``dest``."""
        path = f"/api/v1/sessions/{session_id}/cast"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http,
                http.get(self.url + path, headers=self._headers) as resp,
            ):
                if resp.status >= 400:
                    try:
                        message = (await resp.json()).get("error", resp.reason)
                    except (ValueError, aiohttp.ContentTypeError):
                        message = resp.reason
                    raise ApiError(f"GET {path}: {resp.status} {message}")
                with dest.open("wb") as fh:
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        fh.write(chunk)
        except aiohttp.ClientError as exc:
            raise ApiError(f"cannot reach the control API at {self.url}: {exc}") from None
        return dest

    async def live(self, session_id: str) -> AsyncIterator[dict[str, Any]]:
        """The live events of a session: ``screen`` first, then ``o``/``r``/``m``, then
        ``end``."""
        url = self.url.replace("http", "ws", 1) + f"/api/v1/sessions/{session_id}/live"
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(url, headers=self._headers, heartbeat=30) as ws,
            ):
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    event: dict[str, Any] = json.loads(msg.data)
                    yield event
                    if event.get("type") == "end":
                        return
        except aiohttp.WSServerHandshakeError as exc:
            raise ApiError(f"watch {session_id}: {exc.status} {exc.message}") from None
        except aiohttp.ClientError as exc:
            raise ApiError(f"cannot reach the control API at {self.url}: {exc}") from None
