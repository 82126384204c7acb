"""Client commands on the control API: sessions, watch, approvals, approve, deny.

The relay is found from ``-c castgate.toml`` (its ``listen.api``, or the address the
running relay wrote to ``data/relay.json`` when the config lets the OS pick the port) or
from ``CASTGATE_API``; the token from ``--token`` or ``CASTGATE_TOKEN``.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recorder.errors import CastgateError


class ClientError(CastgateError):
    """The API refused or could not be reached."""


@dataclass(frozen=True)
class Api:
    """Where the API is and how to authenticate."""

    url: str
    token: str

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request; errors become one-line ClientErrors."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - the URL is the operator's relay
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            raise ClientError(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClientError(f"cannot reach the control API at {self.url}: {exc}") from None


def find_api(config: str | None, token: str | None) -> Api:
    """The API from -c / ./castgate.toml or CASTGATE_API, the token from --token or
    CASTGATE_TOKEN."""
    from castgate.paths import find_config

    tok = token or os.environ.get("CASTGATE_TOKEN")
    url = os.environ.get("CASTGATE_API")
    path = find_config(config)
    if path is not None and (config or not url):
        # Only two keys are needed: read them without validating the whole config, so
        # an approval from the command line starts in a fraction of a second.
        import tomllib

        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ClientError(f"{path}: cannot read config: {exc}") from None
        addr = str(raw.get("listen", {}).get("api", "127.0.0.1:8420") or "")
        if not addr:
            raise ClientError(f"{path}: listen.api is empty: the control API is disabled")
        if addr.endswith(":0"):
            data_dir = Path(str(raw.get("data_dir", "data")))
            if not data_dir.is_absolute():
                data_dir = path.resolve().parent / data_dir
            runtime = data_dir / "relay.json"
            try:
                addr = json.loads(runtime.read_text())["listen"]["api"]
            except (OSError, ValueError, KeyError):
                raise ClientError(f"{runtime}: no running relay recorded its API address") from None
        host, _, port = addr.rpartition(":")
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - connect locally to a wildcard listener
            host = "127.0.0.1"
        url = f"http://{host}:{port}"
    if not url:
        raise ClientError("no relay: give -c castgate.toml or set CASTGATE_API")
    if not tok:
        raise ClientError("no token: give --token or set CASTGATE_TOKEN")
    return Api(url.rstrip("/"), tok)


def _fmt_time(value: Any) -> str:
    return str(value or "")[:19].replace("T", " ")


def cmd_sessions(api: Api, live: bool, as_json: bool) -> int:
    """List sessions."""
    from relay.live import printable

    rows = api.request("GET", "/api/v1/sessions" + ("?live=true" if live else ""))["sessions"]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no sessions")
    # The relay holding each session, once there is more than one in the deployment.
    several = len({r.get("node") for r in rows}) > 1
    for r in rows:
        node = f"  on {r.get('node')}" if several else ""
        print(
            printable(
                f"{r['id']}  {r['status']:<12} {r['identity']}@{r['target']} ({r['protocol']})  "
                f"{_fmt_time(r.get('started_at'))}{node}  {r.get('title') or ''}"
            )
        )
    return 0


def cmd_runs(api: Api, since: str | None, as_json: bool) -> int:
    """List pipeline runs."""
    from urllib.parse import quote

    from relay.live import printable

    query = f"?since={quote(since)}" if since else ""
    runs = api.request("GET", "/api/v1/runs" + query)["runs"]
    if as_json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print("no pipeline runs")
    for r in runs:
        # Claims are the pipeline's own text: printable() keeps escapes off the terminal.
        print(
            printable(
                f"{r['run_id']}  {r.get('initiator') or '-'}  {r.get('repository') or '-'}"
                f"@{r.get('ref') or '-'} {str(r.get('sha') or '')[:12]}  "
                f"{_fmt_time(r.get('first_started_at'))} .. "
                f"{_fmt_time(r.get('last_ended_at')) or 'live'}  sessions {r['sessions']}  "
                f"commands {r['commands']} blocked {r['blocked']} approvals {r['approvals']} "
                f"masked {r['masked']}"
            )
        )
    return 0


def cmd_approvals(api: Api, show_all: bool, as_json: bool) -> int:
    """List approvals."""
    from relay.live import printable

    rows = api.request("GET", "/api/v1/approvals" + ("?status=all" if show_all else ""))[
        "approvals"
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no pending approvals" if not show_all else "no approvals")
    for r in rows:
        # The command is the agent's: an escape sequence in it must not redraw the line
        # (hiding what is really asked) on the approver's terminal.
        print(
            printable(
                f"#{r['id']:<5} {r['status']:<11} {r['identity']}@{r['target']}  rule {r['rule']}  "
                f"expires {_fmt_time(r.get('expires_at'))}  {r['command']}"
            )
        )
    return 0


def cmd_approval_show(api: Api, approval_id: int, as_json: bool) -> int:
    """One request in full: what exactly it would run, its SHA-256, its decisions."""
    from console.request_text import render_request, time_left
    from relay.live import printable

    row = api.request("GET", f"/api/v1/approvals/{approval_id}")
    if as_json:
        print(json.dumps(row, indent=2))
        return 0
    print(render_request(row).plain, end="")
    print(f"status {row.get('status')}, {time_left(row, datetime.now(UTC))}")
    for d in row.get("decisions") or []:
        print(printable(f"  {d.get('approver')} {d.get('decision')}: {d.get('reason') or ''}"))
    return 0


def cmd_decide(api: Api, approval_id: int, approve: bool, reason: str | None) -> int:
    """Approve or deny."""
    verb = "approve" if approve else "deny"
    body = {"reason": reason} if reason else {}
    row = api.request("POST", f"/api/v1/approvals/{approval_id}/{verb}", body)
    who = ", ".join(d["approver"] for d in row.get("decisions", []))
    print(f"approval #{row['id']}: {row['status']} (decisions by {who})")
    return 0


async def _watch(api: Api, session_id: str, out: Any) -> int:
    import aiohttp

    from relay.live import Neutraliser, render_event

    url = api.url.replace("http", "ws", 1) + f"/api/v1/sessions/{session_id}/live"
    headers = {"Authorization": f"Bearer {api.token}"}
    clean = Neutraliser()  # one per watch: sequences cut between events are removed too
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                if event.get("type") == "screen":
                    out.write("\x1b[H\x1b[2J")
                out.write(render_event(event, clean))
                out.flush()
                if event.get("type") == "end":
                    return 0
    except aiohttp.WSServerHandshakeError as exc:
        raise ClientError(f"watch {session_id}: {exc.status} {exc.message}") from None
    except aiohttp.ClientError as exc:
        raise ClientError(f"cannot reach the control API at {api.url}: {exc}") from None
    return 0


def cmd_watch(api: Api, session_id: str) -> int:
    """Render a live session in this terminal until it ends or Ctrl-C."""
    out = open(sys.stdout.fileno(), "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    import asyncio

    try:
        return asyncio.run(_watch(api, session_id, out))
    except KeyboardInterrupt:
        return 130


def token_file(path: str) -> str:
    """Read a token from a file (first line)."""
    return Path(path).read_text().strip()
