"""Size limits without the network: the ``[limits]`` keys, the SSH request checks, the
PostgreSQL decoders refusing from the length field, and failed accepts logged once per
interval."""

from __future__ import annotations

import asyncio
import errno
import logging
import struct

import pytest
from pydantic import ValidationError

from recorder.config import LimitsConfig
from relay import accept_log
from relay.pg import protocol as p
from relay.ssh_limits import describe, over_limit


def test_limits_keys_take_sizes_and_refuse_nonsense() -> None:
    lim = LimitsConfig(pg_max_message="1MiB", ssh_max_env_bytes="4KiB", ssh_max_command=4096)
    assert (lim.pg_max_message, lim.ssh_max_env_bytes, lim.ssh_max_command) == (1 << 20, 4096, 4096)
    default = LimitsConfig()
    assert default.pg_max_message == (1 << 30) - 1  # PostgreSQL's own limit
    assert default.pg_max_startup == 10_000
    for bad in (
        {"pg_max_message": "2GiB"},  # more than PostgreSQL takes
        {"pg_max_message": "1 TB"},
        {"pg_max_startup": 10_001},
        {"ssh_max_command": True},
        {"ssh_max_env_vars": -1},
    ):
        with pytest.raises(ValidationError):
            LimitsConfig(**bad)  # type: ignore[arg-type]


def test_ssh_requests_are_checked_against_each_limit() -> None:
    lim = LimitsConfig(
        ssh_max_command=256, ssh_max_env_vars=2, ssh_max_env_bytes=10, ssh_max_subsystem=4
    )
    assert over_limit(lim, {b"A": b"1", b"B": b"2"}, command="x" * 256) is None
    assert over_limit(lim, {}, command="é" * 129) == ("ssh_max_command", 258, 256)  # bytes
    assert over_limit(lim, {b"A": b"1", b"B": b"2", b"C": b"3"}) == ("ssh_max_env_vars", 3, 2)
    assert over_limit(lim, {b"LC_X": b"1234567"}) == ("ssh_max_env_bytes", 11, 10)
    assert over_limit(lim, {}, subsystem="sftp") is None
    assert over_limit(lim, {}, subsystem="sftp2") == ("ssh_max_subsystem", 5, 4)
    line = describe("ssh_max_command", 258, 256)
    assert line == (
        "castgate: command of 258 bytes exceeds the limit of 256 bytes (limits.ssh_max_command)"
    )


def test_a_client_message_past_the_limit_is_refused_from_its_header() -> None:
    dec = p.client_decoder(1000)
    # Exactly the limit: the whole message, type and length included.
    at_limit = p.message(b"Q", b"x" * 994 + b"\0")
    assert len(at_limit) == 1000
    assert [m.type for m in dec.feed(at_limit)] == [b"Q"]
    # One byte more: refused from the five bytes of its header, nothing buffered.
    with pytest.raises(p.MessageTooLarge) as err:
        list(dec.feed(b"B" + struct.pack("!i", 1000)))
    assert err.value.sqlstate == "54000" and err.value.kind == "limit.exceeded"
    assert str(err.value) == (
        "Bind message of 1001 bytes exceeds the limit of 1000 bytes (limits.pg_max_message)"
    )
    assert err.value.detail["size"] == 1001 and err.value.detail["max"] == 1000
    # Cut inside a message: the length is checked as soon as it is whole.
    dec = p.client_decoder(1000)
    assert list(dec.feed(p.message(b"S") + b"d\x00\x00")) == [p.Message(b"S", b"")]
    with pytest.raises(p.MessageTooLarge):
        list(dec.feed(b"\x10\x00"))


def test_a_startup_packet_past_the_limit_is_refused_from_its_length() -> None:
    dec = p.StartupDecoder(100)
    with pytest.raises(p.StartupTooLarge) as err:
        dec.feed(struct.pack("!i", 101))  # the length alone
    assert err.value.sqlstate == "08P01" and err.value.kind == "limit.exceeded"
    assert "invalid startup packet length 101" in str(err.value)
    pkt = p.startup_message({"user": "u" * (100 - 15)})  # header, "user", NULs
    assert len(pkt) == 100
    assert p.StartupDecoder(100).feed(pkt) is not None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _emfile(handler: accept_log.AcceptErrorLog, loop: asyncio.AbstractEventLoop) -> None:
    handler(
        loop,
        {
            "message": "socket.accept() out of system resource",
            "exception": OSError(errno.EMFILE, "Too many open files"),
        },
    )


def test_failed_accepts_become_one_line_an_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    others: list[dict[str, object]] = []
    clock = _Clock()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        handler = accept_log.AcceptErrorLog(
            10.0, lambda _loop, ctx: others.append(ctx), clock=clock
        )
        for _ in range(500):
            _emfile(handler, loop)
        handler(loop, {"message": "something else", "exception": ValueError("x")})
        clock.now = 10.0
        _emfile(handler, loop)
        for _ in range(3):
            _emfile(handler, loop)
        handler.flush()  # at shutdown: what the interval still held
        assert handler.total == {"EMFILE": 504}

    with caplog.at_level(logging.WARNING, logger="castgate.relay"):
        asyncio.run(run())
    lines = [r for r in caplog.records if r.getMessage() == "relay.accept_failed"]
    assert [r.__dict__["errors"] for r in lines] == [
        {"EMFILE": 1},
        {"EMFILE": 500},
        {"EMFILE": 3},
    ]
    assert [str(c["message"]) for c in others] == ["something else"]


def test_the_last_of_a_burst_is_logged_when_the_interval_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        handler = accept_log.install(loop, 0.05)
        try:
            _emfile(handler, loop)
            _emfile(handler, loop)
            while handler._timer is not None:
                await asyncio.sleep(0.01)
        finally:
            loop.set_exception_handler(None)

    with caplog.at_level(logging.WARNING, logger="castgate.relay"):
        asyncio.run(run())
    lines = [r for r in caplog.records if r.getMessage() == "relay.accept_failed"]
    assert [r.__dict__["errors"] for r in lines] == [{"EMFILE": 1}, {"EMFILE": 1}]
