"""Failed-authentication throttling per source address, shared by the SSH, PostgreSQL
and API listeners: after ``limit`` failures within ``window`` seconds an address is
refused for ``lockout`` seconds, so tokens cannot be guessed at line rate."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class AuthLimiter:
    """Sliding-window failure counter with lockout."""

    def __init__(
        self,
        limit: int = 10,
        window: float = 60.0,
        lockout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.lockout = limit, window, lockout
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._locked: dict[str, float] = {}

    @staticmethod
    def key(peer: str) -> str:
        """The address part of ``host:port``."""
        return peer.rsplit(":", 1)[0] if ":" in peer else peer

    def blocked(self, peer: str) -> bool:
        """True while the address is locked out."""
        key = self.key(peer)
        until = self._locked.get(key)
        if until is None:
            return False
        if self._clock() >= until:
            del self._locked[key]
            return False
        return True

    def failure(self, peer: str) -> bool:
        """Count a failure; True when it locks the address out."""
        key = self.key(peer)
        now = self._clock()
        q = self._failures.setdefault(key, deque())
        q.append(now)
        while q and now - q[0] > self.window:
            q.popleft()
        if len(q) >= self.limit:
            self._locked[key] = now + self.lockout
            q.clear()
            return True
        if len(self._failures) > 100_000:  # bound memory under a spray from many sources
            self._failures = {
                k: v for k, v in self._failures.items() if v and now - v[-1] <= self.window
            }
        return False

    def success(self, peer: str) -> None:
        """A successful login clears the address's failures."""
        self._failures.pop(self.key(peer), None)
