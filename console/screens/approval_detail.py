"""One approval request in full: what exactly would run, the session's live screen
beside it, the time left before it expires; ``a`` approves, ``d`` denies.

What a request carries beyond its command (all masked by the relay before it is stored):
``payload_sha256``, the SHA-256 of exactly what would run, and ``context``, by kind:

- ``git-push``: ``refs`` — each ``{"ref", "old", "new", "change"}`` (``created``,
  ``deleted``, ``updated``, ``forced``), its ``commits`` (``sha``, ``author``, ``date``,
  ``subject``) and ``diffstat`` (``files``: ``path``, ``added``, ``removed``);
- ``sql``: ``statement``, ``parameters`` (text, masked), ``touches`` (``operation``,
  ``table``) and ``estimate`` (``rows``, ``cost``, ``node``, or ``error``);
- ``shell`` / ``exec``: ``screen``, the session's screen when the line was held.

A request without a context (an older relay) shows its command alone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Header, Label, Static

from console.messages import ApprovalsChanged
from console.screens.base import ConsoleScreen
from console.screens.live import clean
from console.screens.reason import ReasonScreen
from console.widgets.terminal_view import TerminalView
from replay.castfile import parse_size
from replay.terminal import new_terminal

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
    out.append(clean(f"rule {row.get('rule')}  {row.get('identity')}@{row.get('target')}\n"))
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


class ApprovalDetailScreen(ConsoleScreen):
    """One request: its context on the left, the session's live screen on the right."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve"),
        Binding("d", "deny", "Deny"),
        Binding("escape,q", "app.pop_screen", "Back"),
    ]

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__()
        self.row = dict(row)
        self.approval_id = int(row["id"])
        self.decided: str | None = None

    def compose(self) -> ComposeResult:
        """Request, live screen, status line."""
        yield Header()
        with Horizontal(id="detail-body"):
            with VerticalScroll(id="request-pane"):
                yield Static(render_request(self.row), id="request")
            yield TerminalView(id="term")
        yield Label(Text(self._status()), id="status")
        yield Footer()

    def _status(self) -> str:
        if self.decided is not None:
            return clean(self.decided)
        return clean(
            f"session {self.row.get('session_id')}  {self.row.get('status', 'pending')}  "
            f"{time_left(self.row, self.console.now())}"
        )

    def on_mount(self) -> None:
        """The full request, the live screen, and a clock for the time left."""
        self.sub_title = f"Approval #{self.approval_id}"
        screen = (self.row.get("context") or {}).get("screen")
        if screen:
            term = new_terminal(80, 24)
            term.feed(str(screen))
            self.query_one("#term", TerminalView).terminal = term
        self.load()
        if self.row.get("session_id"):
            self.watch_session()
        self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        self.query_one("#status", Label).update(Text(self._status()))

    @work(exclusive=True, group="detail", exit_on_error=False)
    async def load(self) -> None:
        """The request as the API has it now (the queue's row may be older)."""
        row = await self.api.approval(self.approval_id)
        self.row.update(row)
        self.query_one("#request", Static).update(render_request(self.row))
        self._tick()

    @work(exclusive=True, group="detail-live", exit_on_error=False)
    async def watch_session(self) -> None:
        """The session's screen as a late watcher sees it, kept current."""
        view = self.query_one("#term", TerminalView)
        async for event in self.api.live(str(self.row["session_id"])):
            kind = event.get("type")
            data = str(event.get("data", ""))
            if kind == "screen":
                term = new_terminal(int(event.get("width", 80)), int(event.get("height", 24)))
                term.feed(data)
                view.terminal = term
            elif kind == "o" and view.terminal is not None:
                view.terminal.feed(data)
            elif kind == "r" and view.terminal is not None:
                size = parse_size(data)
                if size is not None:
                    view.terminal.resize(*size)
                    view.refresh(layout=True)
            view.sync()

    def on_approvals_changed(self, message: ApprovalsChanged) -> None:
        """Decided elsewhere (another approver, the CLI, expiry): say so."""
        if self.decided is None and all(
            int(r["id"]) != self.approval_id for r in message.approvals
        ):
            self.load()

    def action_approve(self) -> None:
        """Approve this request."""
        self.decide(True, None)

    def action_deny(self) -> None:
        """Ask for a reason, then deny."""

        def done(reason: str | None) -> None:
            if reason:
                self.decide(False, reason)

        self.app.push_screen(ReasonScreen(f"Deny approval #{self.approval_id}: why?"), done)

    @work(exclusive=True, group="decide", exit_on_error=False)
    async def decide(self, approve: bool, reason: str | None) -> None:
        """Send the decision and show who decided."""
        row = await self.api.decide(self.approval_id, approve, reason)
        self.row.update(row)
        self.decided = describe_decision(row)
        self._tick()
        self.notify(clean(self.decided), title="decision recorded", markup=False)
        self.console.poll_approvals()
