"""The v4/v5 channel codec: frames, resize, status, v5 close."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.k8s.channel import (
    V4,
    V5,
    Channel,
    ChannelError,
    close_frame,
    decode,
    encode,
    negotiate,
    parse_resize,
    parse_status,
    resize,
    status_json,
)


def test_frames_round_trip() -> None:
    assert encode(Channel.STDIN, b"ls\r") == b"\x00ls\r"
    f = decode(b"\x01hello")
    assert (f.channel, f.data) == (Channel.STDOUT, b"hello")
    assert decode(encode(Channel.STDERR)).data == b""


def test_close_is_v5_only_and_names_one_channel() -> None:
    assert close_frame(Channel.STDIN) == b"\xff\x00"
    assert decode(b"\xff\x00", V5).channel is Channel.CLOSE
    with pytest.raises(ChannelError, match="outside"):
        decode(b"\xff\x00", V4)
    for bad in (b"\xff", b"\xff\x00\x01", b"\xff\x09"):
        with pytest.raises(ChannelError):
            decode(bad, V5)


@pytest.mark.parametrize("msg", [b"", b"\x05x", b"\x80"])
def test_unknown_or_empty_frames_are_errors(msg: bytes) -> None:
    with pytest.raises(ChannelError):
        decode(msg)


def test_resize() -> None:
    assert resize(120, 40) == b'\x04{"Width":120,"Height":40}'
    assert parse_resize(b'{"Width": 80, "Height": 24}') == (80, 24)
    for bad in (
        b"80x24",
        b"[80,24]",
        b'{"Width":"80","Height":24}',
        b'{"Width":-1,"Height":2}',
        b'{"Width":1}',
        b'{"Width":true,"Height":2}',
    ):
        with pytest.raises(ChannelError):
            parse_resize(bad)


def test_status() -> None:
    ok = parse_status(status_json(0))
    assert ok.exit_code == 0
    failed = parse_status(status_json(3))
    assert (failed.exit_code, failed.reason) == (3, "NonZeroExitCode")
    # What the kubelet sends when the container is gone: no exit code.
    gone = parse_status(
        b'{"metadata":{},"status":"Failure","message":"container not found","reason":"InternalError"}'
    )
    assert (gone.exit_code, gone.message) == (None, "container not found")
    assert parse_status(b"plain v1 error text").exit_code is None
    with pytest.raises(ChannelError):
        parse_status(b"[1]")


def test_negotiate_prefers_v5() -> None:
    assert negotiate([V4, V5]) == V5
    assert negotiate(["v4.channel.k8s.io"]) == V4
    assert negotiate(["channel.k8s.io", "base64.channel.k8s.io"]) is None


@given(st.binary(max_size=64))
def test_decode_never_crashes(msg: bytes) -> None:
    try:
        f = decode(msg)
    except ChannelError:
        return
    assert encode(f.channel, f.data) == msg
