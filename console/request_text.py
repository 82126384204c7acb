"""What an approver reads about one held request, as text (the console's detail view and
``castgate approvals show`` print the same thing).

What a request carries beyond its command (all masked by the relay before it is stored):
``payload_sha256``, the SHA-256 of exactly what would run, and ``context``, by kind:

- ``git-push``: ``refs`` — each ``{"ref", "old", "new", "change"}`` (``created``,
  ``deleted``, ``updated``, ``forced``), its ``commits`` (``sha``, ``author``, ``date``,
  ``subject``) and ``diffstat`` (``files``: ``path``, ``added``, ``removed``);
- ``sql``: ``statement``, ``parameters`` (text, masked), ``touches`` (``operation``,
  ``table``) and ``estimate`` (``rows``, ``cost``, ``node``, or ``error``);
- ``shell`` / ``exec``: ``screen``, the session's screen when the line was held.

A request without a context (an older relay) shows its command alone. Every text the
agent could influence goes through ``clean``: no control character reaches the
approver's terminal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.text import Text


def clean(text: str) -> str:
    """Control characters out of text shown outside a terminal model."""
    return "".join(c if c.isprintable() else " " for c in text)


MAX_LISTED = 50  # commits, files, parameters shown per list; the rest are counted


def _short(sha: Any) -> str:
    text = str(sha or "")
    return text[:10] if text.strip("0") else "(none)"


def _listed(items: list[Any], what: str, out: Text, line: Any) -> None:
    for item in items[:MAX_LISTED]:
        out.append(clean(line(item)) + "\n")
    if len(items) > MAX_LISTED:
        out.append(f"  ... and {len(items) - MAX_LISTED} more {what}\n", style="dim")


def _git_push(ctx: dict[str, Any], out: Text) -> None:
    for ref in ctx.get("refs") or []:
        change = str(ref.get("change", "updated"))
        style = "bold red" if change in ("forced", "deleted") else "bold"
        out.append(clean(f"{ref.get('ref')}  {_short(ref.get('old'))} -> {_short(ref.get('new'))}"))
        out.append(f"  {change}\n", style=style)
        commits = list(ref.get("commits") or [])
        _listed(
            commits,
            "commits",
            out,
            lambda c: (
                f"  {_short(c.get('sha'))[:8]} {str(c.get('date', ''))[:10]} "
                f"{c.get('author')}: {c.get('subject')}"
            ),
        )
        stat = ref.get("diffstat") or {}
        files = list(stat.get("files") or [])
        _listed(
            files,
            "files",
            out,
            lambda f: f"    {f.get('path')} | +{f.get('added', 0)} -{f.get('removed', 0)}",
        )
        if files:
            added = sum(int(f.get("added") or 0) for f in files)
            removed = sum(int(f.get("removed") or 0) for f in files)
            out.append(f"    {len(files)} file(s), +{added} -{removed}\n", style="dim")


def _estimate(est: dict[str, Any]) -> str:
    if est.get("error"):
        return f"no estimate: {est['error']}"
    rows = est.get("rows")
    node = f", {est['node']}" if est.get("node") else ""
    cost = f", cost {est['cost']}" if est.get("cost") is not None else ""
    return f"about {rows} row(s){node}{cost}"


def _sql(ctx: dict[str, Any], out: Text) -> None:
    out.append(clean(str(ctx.get("statement", ""))) + "\n")
    params = list(ctx.get("parameters") or [])
    _listed(
        [(i + 1, v) for i, v in enumerate(params)],
        "parameters",
        out,
        lambda iv: f"  ${iv[0]} = {'NULL' if iv[1] is None else repr(iv[1])}",
    )
    touched = ", ".join(f"{t.get('operation')} {t.get('table')}" for t in ctx.get("touches") or [])
    if touched:
        out.append(clean(f"touches: {touched}") + "\n")
    if ctx.get("estimate") is not None:
        out.append(clean("estimate: " + _estimate(ctx["estimate"])) + "\n", style="bold")


def render_request(row: dict[str, Any]) -> Text:
    """What an approver reads about one request (rule, requester, what would run)."""
    out = Text()
    out.append(f"approval #{row.get('id')}  ", style="bold")
    out.append(clean(f"rule {row.get('rule')}  {row.get('identity')}@{row.get('target')}") + "\n")
    ctx = row.get("context") or {}
    kind = ctx.get("kind")
    if kind == "git-push":
        out.append(clean(str(row.get("command", ""))) + "\n", style="dim")
        _git_push(ctx, out)
    elif kind == "sql":
        _sql(ctx, out)
    else:
        out.append(clean(str(row.get("command", ""))) + "\n")
    if row.get("payload_sha256"):
        out.append(f"sha256 {row['payload_sha256']}\n", style="dim")
    return out


def describe_decision(row: dict[str, Any]) -> str:
    """One line: the request's status and who decided it."""
    who = ", ".join(
        f"{d.get('approver')} ({d.get('decision')}"
        + (f": {d.get('reason')}" if d.get("reason") else "")
        + ")"
        for d in row.get("decisions") or []
    )
    return f"approval #{row.get('id')} {row.get('status')}: {row.get('command')}  by {who}"


def time_left(row: dict[str, Any], now: datetime) -> str:
    """``4m 05s left``, ``expired`` or ``no expiry``."""
    raw = row.get("expires_at")
    if not raw:
        return "no expiry"
    try:
        expires = datetime.fromisoformat(str(raw))
    except ValueError:
        return "no expiry"
    left = int((expires - now).total_seconds())
    if left <= 0:
        return "expired"
    return f"{left // 60}m {left % 60:02d}s left"
