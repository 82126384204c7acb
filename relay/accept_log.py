"""Accept errors, and any other "out of descriptors/memory" error the event loop
reports, logged as one line per interval with a count instead of a traceback each.

When the process runs out of file descriptors, asyncio's accept loop reports
"socket.accept() out of system resource" through the loop's exception handler, for
every listener (SSH, PostgreSQL, the API: asyncssh and aiohttp both accept through
asyncio's servers), once a second each, with a traceback; so does every callback that
fails to open a file or socket for the same reason. The default handler writes them
to the root logger, outside the relay's JSON log. This handler counts them by errno
and listener and logs ``relay.accept_failed`` at most once per ``interval``; every
other exception goes to the handler that was in place (the loop's default).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger("castgate.relay")

# What asyncio itself treats as "out of system resource" on accept.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_Handler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def _listener(context: dict[str, Any]) -> str:
    sock = context.get("socket")
    try:
        name = sock.getsockname() if sock is not None else None
    except OSError:
        name = None
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return "-"


class AcceptErrorLog:
    """An event loop exception handler (``loop.set_exception_handler``)."""

    def __init__(
        self,
        interval: float,
        fallback: _Handler | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._fallback = fallback
        self._clock = clock
        self.total: Counter[str] = Counter()
        """Errors so far, by ``errno-name`` (the metric an operator would graph)."""
        self._unlogged: Counter[tuple[str, str, str]] = Counter()
        self._last = float("-inf")
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS):
            if self._fallback is not None:
                self._fallback(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.total[code] += 1
        what = str(context.get("message", ""))[:200]
        self._unlogged[(code, _listener(context), what)] += 1
        wait = self._last + self.interval - self._clock()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            # The last of a burst is logged when the interval is over, even if nothing
            # else fails after it.
            self._timer = loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line (at once)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._unlogged:
            return
        self._last = self._clock()
        batch, self._unlogged = self._unlogged, Counter()
        errors: Counter[str] = Counter()
        listeners: set[str] = set()
        reports: set[str] = set()
        for (code, where, what), n in batch.items():
            errors[code] += n
            listeners.add(where)
            reports.add(what)
        log.warning(
            "relay.accept_failed",
            extra={
                "errors": dict(errors),
                "listeners": sorted(listeners),
                "reports": sorted(reports),
                "interval": self.interval,
            },
        )


def install(loop: asyncio.AbstractEventLoop, interval: float) -> AcceptErrorLog:
    """Put the handler in front of the loop's current one."""
    handler = AcceptErrorLog(interval, loop.get_exception_handler())
    loop.set_exception_handler(handler)
    return handler
