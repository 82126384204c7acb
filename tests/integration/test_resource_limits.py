"""The relay keeps serving while hostile peers hold connections open: half-sent API
requests are closed by the header timeout, one address holds at most its share of
connections, the open-file limit becomes a clean refusal (HTTP 503), and the log says
so in a bounded number of lines."""

from __future__ import annotations

import itertools
import resource
import socket
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import pytest

from tests.fix_relay import Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget

# The relay is started with this open-file limit (soft and hard): with the reserve
# below it leaves room for (256 - 64) // 3 = 64 connections.
NOFILE = 256
LIMITS = """
[limits]
connections_per_source = 20
fd_reserve = 64
api_idle_timeout = "3s"
report_interval = "60s"
"""
HALF_REQUEST = b"GET /api/v1/sessions HTTP/1.1\r\nHost: relay\r\nX-Slow: "


@pytest.fixture
def limited(sshd_target: SshTarget, tmp_path: Path) -> Iterator[Relay]:
    relay = start_relay(tmp_path / "relay", sshd_target, extra=LIMITS, nofile=NOFILE)
    try:
        yield relay
    finally:
        relay.stop()


def _half_open(relay: Relay, source: str) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", relay.api_port), timeout=60, source_address=(source, 0)
    )
    sock.sendall(HALF_REQUEST)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the relay sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def _serving(relay: Relay) -> None:
    # A new client from another address still gets SSH, PostgreSQL and the API.
    res = relay.ssh("web", "echo still-serving")
    assert res.returncode == 0 and res.stdout == b"still-serving\n", res.stderr
    with socket.create_connection(("127.0.0.1", relay.pg_port), timeout=30) as pg:
        pg.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest
        assert pg.recv(1) in (b"S", b"N")
    with urllib.request.urlopen(f"{relay.api}/healthz", timeout=30) as resp:
        assert resp.status == 200


def test_half_sent_requests_from_one_address_are_capped_and_timed_out(limited: Relay) -> None:
    with ExitStack() as stack:
        socks = [stack.enter_context(_half_open(limited, "127.0.0.2")) for _ in range(60)]
        # The first 20 wait for their request; the other 40 are refused at once.
        refused = [s for s in socks[20:]]
        for s in refused:
            assert _answer(s).startswith(b"HTTP/1.1 503 "), "refused with a clear status"
        _serving(limited)
        # The header timeout closes the half-sent ones, without an answer to wait for.
        for s in socks[:20]:
            assert not _answer(s).startswith(b"HTTP/1.1 2")
    wait_for(lambda: any(e.get("msg") == "relay.connections_refused" for e in limited.logs), 30)
    lines = [e for e in limited.logs if "refused" in str(e.get("msg", ""))]
    assert len(lines) <= 2, lines
    assert not [e for e in limited.logs if "Traceback" in str(e)]


def test_the_open_file_limit_becomes_a_clean_refusal_and_open_sessions_go_on(
    limited: Relay,
) -> None:
    with ExitStack() as stack:
        # One held connection from each of many addresses: the per-address cap does
        # not apply, the total (what the open-file limit leaves room for) does.
        socks = [stack.enter_context(_half_open(limited, f"127.0.1.{i}")) for i in range(1, 101)]
        answers = [_answer(s) for s in socks[64:]]
        assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers[:2]
    # Once they are gone, everyone is served again.
    _serving(limited)
    assert not [e for e in limited.logs if "Too many open files" in str(e)]


def _startup(user: str = "ci-agent", db: str = "appdb") -> bytes:
    params = f"user\0{user}\0database\0{db}\0\0".encode()
    return struct.pack("!II", 8 + len(params), 196608) + params


def test_ssh_and_postgres_cap_what_one_address_holds(limited: Relay) -> None:
    with ExitStack() as stack:
        # 20 connections from one address that never finish their handshakes.
        for port in (limited.port, limited.pg_port):
            for _ in range(20):
                stack.enter_context(
                    socket.create_connection(
                        ("127.0.0.1", port), timeout=60, source_address=("127.0.0.2", 0)
                    )
                )
        # The 21st from that address is refused in each protocol's own words.
        res = subprocess.run(
            ["ssh", "-b", "127.0.0.2", *limited.ssh_args(), "web@127.0.0.1", "true"],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 255 and b"too many connections" in res.stderr, res.stderr
        with socket.create_connection(
            ("127.0.0.1", limited.pg_port), timeout=60, source_address=("127.0.0.2", 0)
        ) as pg:
            pg.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest: declined
            assert pg.recv(1) == b"N"
            pg.sendall(_startup())
            answer = _answer(pg)
        assert answer[:1] == b"E" and b"C53300\0" in answer and b"too many" in answer, answer
        # Another address is served.
        _serving(limited)
    wait_for(lambda: any(e.get("msg") == "relay.connections_refused" for e in limited.logs), 30)


# Accepts that fail: the relay sized its connection limit for 256 descriptors, and the
# limit is then lowered under it (as an operator's prlimit would), so the listeners run
# out of descriptors before the connection limit refuses anyone.
ACCEPT_LIMITS = """
[limits]
connections_per_source = 1000
fd_reserve = 8
report_interval = "1s"
"""


@pytest.fixture
def starved(sshd_target: SshTarget, tmp_path: Path) -> Iterator[Relay]:
    relay = start_relay(tmp_path / "relay", sshd_target, extra=ACCEPT_LIMITS, nofile=NOFILE)
    try:
        yield relay
    finally:
        resource.prlimit(relay.proc.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        relay.stop()


def test_failed_accepts_are_logged_once_per_interval_with_a_count(starved: Relay) -> None:
    relay = starved
    resource.prlimit(relay.proc.pid, resource.RLIMIT_NOFILE, (40, NOFILE))
    with ExitStack() as stack:
        # More than 40 descriptors' worth: the rest wait in the listen backlog while
        # asyncio's accept keeps failing (EMFILE), once a second.
        for _ in range(60):
            stack.enter_context(_half_open(relay, "127.0.0.3"))

        def failed() -> list[dict[str, object]]:
            return [e for e in relay.logs if e.get("msg") == "relay.accept_failed"]

        wait_for(lambda: len(failed()) >= 3, 60)
        resource.prlimit(relay.proc.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    _serving(relay)
    lines = failed()
    for line in lines:
        errors = line["errors"]
        assert isinstance(errors, dict) and set(errors) == {"EMFILE"}, line
        assert line["listeners"] == [f"127.0.0.1:{relay.api_port}"], line
    # At most one line an interval, whatever the number of failures behind it.
    times = [datetime.fromisoformat(str(e["time"])) for e in lines]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.999 for gap in gaps), gaps
    # Nothing of asyncio's own report (a traceback for each failure) reached the log.
    raw = [e for e in relay.logs if "raw" in e]
    assert not [e for e in raw if "out of system resource" in str(e) or "Traceback" in str(e)]
