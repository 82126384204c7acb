"""How many connections one peer and all peers may hold open at once, for every
listener of one relay process (SSH, PostgreSQL, control API), and what the relay does
when a limit is reached: refuse the new connection in the listener's own words (SSH
disconnect reason, PostgreSQL SQLSTATE 53300, HTTP 503), count it, and say so in the
audit log at most once per ``report_interval`` (a flood of refusals must not become a
flood of audit rows or log lines). No I/O here; the listeners call ``admit`` and
``release``.

The total is also bounded by the process's open-file limit less a reserve: a relayed
connection holds up to ``FDS_PER_CONNECTION`` descriptors (the client's socket, the
target's, the cast file), and open sessions must be able to go on (write their casts,
reach the store) while new connections are refused.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

FDS_PER_CONNECTION = 3


@dataclass(frozen=True)
class Ticket:
    """One admitted connection; give it back with ``ConnectionLimits.release``."""

    listener: str
    source: str


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one (a relay holds several descriptors
    a session; the usual soft default, 1024, is a few hundred sessions). Returns the
    (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
        soft = hard
    return soft, hard


def fd_budget(reserve: int) -> int:
    """Connections the current open-file limit leaves room for, ``reserve``
    descriptors kept back."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, (soft - reserve) // FDS_PER_CONNECTION)


class ConnectionLimits:
    """Counts open connections by source address and in total."""

    def __init__(
        self,
        total: int,
        per_source: int,
        *,
        report: Callable[[dict[str, int]], None] | None = None,
        report_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        """Connections all peers together may hold."""
        self.per_source = per_source
        """Connections one source address may hold."""
        self.open = 0
        self._by_source: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        """Refusals so far, by ``listener:reason``."""
        self._report = report
        self._interval = report_interval
        self._clock = clock
        self._unreported: Counter[str] = Counter()
        self._last_report = float("-inf")

    def admit(self, listener: str, source: str) -> Ticket | str:
        """A ticket for a new connection from ``source``, or why it is refused."""
        if self.open >= self.total:
            return self._refuse(listener, "total")
        if self._by_source[source] >= self.per_source:
            return self._refuse(listener, "per-source")
        self.open += 1
        self._by_source[source] += 1
        return Ticket(listener, source)

    def release(self, ticket: Ticket) -> None:
        """The connection of ``ticket`` has ended."""
        self.open -= 1
        left = self._by_source[ticket.source] - 1
        if left > 0:
            self._by_source[ticket.source] = left
        else:
            del self._by_source[ticket.source]
        self.flush_report()

    def _refuse(self, listener: str, reason: str) -> str:
        key = f"{listener}:{reason}"
        self.refused[key] += 1
        self._unreported[key] += 1
        self.flush_report()
        if reason == "total":
            return f"too many connections to the relay (limit {self.total})"
        return f"too many connections from one address (limit {self.per_source})"

    def flush_report(self, *, force: bool = False) -> None:
        """Hand the refusals not yet reported to ``report``, at most once an interval
        (or now with ``force``, at shutdown)."""
        if not self._unreported or self._report is None:
            return
        now = self._clock()
        if not force and now - self._last_report < self._interval:
            return
        self._last_report = now
        batch, self._unreported = dict(self._unreported), Counter()
        self._report(batch)
