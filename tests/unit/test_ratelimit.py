"""Failed-authentication throttling."""

from __future__ import annotations

from relay.ratelimit import AuthLimiter


def test_lockout_after_limit_and_expiry() -> None:
    now = [1000.0]
    lim = AuthLimiter(limit=3, window=60, lockout=30, clock=lambda: now[0])
    assert not lim.failure("10.0.0.1:1000")
    assert not lim.failure("10.0.0.1:1001")
    assert not lim.blocked("10.0.0.1:5")
    assert lim.failure("10.0.0.1:1002")
    assert lim.blocked("10.0.0.1:9999")
    assert not lim.blocked("10.0.0.2:1")
    now[0] += 31
    assert not lim.blocked("10.0.0.1:1")


def test_window_slides_and_success_clears() -> None:
    now = [0.0]
    lim = AuthLimiter(limit=3, window=10, lockout=30, clock=lambda: now[0])
    lim.failure("a:1")
    lim.failure("a:1")
    now[0] += 11
    assert not lim.failure("a:1")
    lim.failure("a:1")
    lim.success("a:1")
    assert not lim.failure("a:1")
