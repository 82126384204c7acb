"""The channel protocol of exec, attach (and port-forward's framing) over WebSocket:
``v4.channel.k8s.io`` and ``v5.channel.k8s.io`` (k8s.io/apimachinery
``pkg/util/remotecommand/constants.go``, client-go ``tools/remotecommand/websocket.go``).

Every binary WebSocket message is one frame: a channel byte, then that channel's data.
Channels: 0 stdin, 1 stdout, 2 stderr, 3 error (the command's end: a metav1.Status as
JSON), 4 resize (JSON ``{"Width": W, "Height": H}``). v5 adds 255, close: its one data
byte names the channel the sender will write no more to (the client closes stdin
that way; v4 had no half-close). The codec takes messages and returns frames, and
back; the WebSocket I/O belongs to the relay glue.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
SUBPROTOCOLS = (V5, V4)
"""What the relay offers, best first (kubectl >= 1.30 asks for both, v5 first)."""

MAX_RESIZE = 0xFFFF


class Channel(IntEnum):
    """Channel numbers."""

    STDIN = 0
    STDOUT = 1
    STDERR = 2
    ERROR = 3
    RESIZE = 4
    CLOSE = 255


class ChannelError(ValueError):
    """A frame that breaks the protocol; the relay ends the stream (fail closed)."""


@dataclass(frozen=True)
class Frame:
    """One decoded message."""

    channel: Channel
    data: bytes


@dataclass(frozen=True)
class ExitStatus:
    """What the error channel said about the command's end."""

    exit_code: int | None
    """0 on success, the exit code for ``NonZeroExitCode``, None when the command did
    not run to an exit (the message says why)."""
    message: str
    reason: str | None = None


def negotiate(offered: list[str]) -> str | None:
    """The subprotocol to answer a client offering ``offered`` with, or None (refuse)."""
    for proto in SUBPROTOCOLS:
        if proto in offered:
            return proto
    return None


def decode(message: bytes, protocol: str = V5) -> Frame:
    """Decode one binary WebSocket message."""
    if not message:
        raise ChannelError("empty channel message")
    try:
        channel = Channel(message[0])
    except ValueError:
        raise ChannelError(f"unknown channel {message[0]}") from None
    if channel is Channel.CLOSE:
        if protocol != V5:
            raise ChannelError(f"close frame outside {V5}")
        if len(message) != 2 or message[1] not in (0, 1, 2, 3, 4):
            raise ChannelError("close frame must name one channel")
    return Frame(channel, bytes(message[1:]))


def encode(channel: Channel | int, data: bytes = b"") -> bytes:
    """Encode one frame as a binary WebSocket message."""
    return bytes((int(channel),)) + data


def close_frame(channel: Channel) -> bytes:
    """v5: the sender writes no more to ``channel``."""
    return encode(Channel.CLOSE, bytes((int(channel),)))


def parse_resize(data: bytes) -> tuple[int, int]:
    """Width and height of a resize frame's JSON."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ChannelError("resize frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ChannelError("resize frame is not an object")
    width, height = obj.get("Width"), obj.get("Height")
    for v in (width, height):
        if type(v) is not int or not 0 <= v <= MAX_RESIZE:
            raise ChannelError("resize frame needs integer Width and Height")
    assert isinstance(width, int) and isinstance(height, int)
    return width, height


def resize(width: int, height: int) -> bytes:
    """A resize frame."""
    return encode(Channel.RESIZE, orjson.dumps({"Width": width, "Height": height}))


def status_json(exit_code: int, message: str | None = None) -> bytes:
    """The error-channel payload the API server (kubelet) sends when a command ends."""
    status: dict[str, Any] = {"metadata": {}, "status": "Success"}
    if exit_code != 0:
        status = {
            "metadata": {},
            "status": "Failure",
            "message": message
            or f"command terminated with non-zero exit code: exit status {exit_code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
        }
    return orjson.dumps(status)


def parse_status(data: bytes) -> ExitStatus:
    """What an error-channel payload says (v4/v5: a metav1.Status)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        # v1-v3 sent plain text: an error message, no exit code.
        return ExitStatus(None, data.decode("utf-8", "replace"))
    if not isinstance(obj, dict):
        raise ChannelError("status is not an object")
    message = str(obj.get("message", ""))
    reason = obj.get("reason")
    if obj.get("status") == "Success":
        return ExitStatus(0, message)
    if reason == "NonZeroExitCode":
        causes = (obj.get("details") or {}).get("causes") or []
        for cause in causes:
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                try:
                    return ExitStatus(int(cause.get("message", "")), message, reason)
                except ValueError:
                    break
    return ExitStatus(None, message, str(reason) if reason is not None else None)
