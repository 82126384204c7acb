"""Connection limits: per source and in total, refusals reported in batches."""

from __future__ import annotations

from relay.connlimit import ConnectionLimits, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_per_source_and_total_caps_and_release() -> None:
    lim = ConnectionLimits(3, 2)
    a1, a2 = lim.admit("ssh", "10.0.0.1"), lim.admit("pg", "10.0.0.1")
    assert isinstance(a1, Ticket) and isinstance(a2, Ticket)
    assert "one address" in str(lim.admit("api", "10.0.0.1"))
    b = lim.admit("api", "10.0.0.2")
    assert isinstance(b, Ticket)
    assert "relay" in str(lim.admit("api", "10.0.0.3"))  # the total
    lim.release(a1)
    assert isinstance(lim.admit("ssh", "10.0.0.3"), Ticket)
    assert lim.refused == {"api:per-source": 1, "api:total": 1}


def test_refusals_are_reported_at_most_once_an_interval() -> None:
    reports: list[dict[str, int]] = []
    clock = Clock()
    lim = ConnectionLimits(1, 1, report=reports.append, report_interval=10, clock=clock)
    assert isinstance(lim.admit("api", "x"), Ticket)
    for _ in range(1000):
        lim.admit("api", "y")
    assert reports == [{"api:total": 1}]  # the first at once, the rest held
    clock.now = 11
    lim.flush_report()
    assert reports[1] == {"api:total": 999}
    lim.flush_report(force=True)  # nothing new: nothing said
    assert len(reports) == 2
