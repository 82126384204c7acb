"""WebSocket watchers fed frames by the live stream: every byte up to the frame rate,
screens past it, markers and the end always, in order."""

from __future__ import annotations

import asyncio
import json
import struct

from relay import live
from relay.live import LiveStream


class FakeTransport(asyncio.WriteTransport):
    """Collects what the stream writes; a buffer size can be forced to act slow."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


def decode_frames(data: bytes) -> list[dict[str, object]]:
    """Parse unmasked server text frames (RFC 6455) back into JSON events."""
    events = []
    i = 0
    while i < len(data):
        assert data[i] == 0x81, "FIN + text, no RSV bits"
        n = data[i + 1]
        i += 2
        if n == 126:
            (n,) = struct.unpack_from("!H", data, i)
            i += 2
        elif n == 127:
            (n,) = struct.unpack_from("!Q", data, i)
            i += 8
        events.append(json.loads(data[i : i + n]))
        i += n
    return events


def test_frame_lengths_cover_all_three_encodings() -> None:
    for size in (0, 125, 126, 65535, 65536, 200_000):
        payload = json.dumps({"type": "o", "data": "x" * size}).encode()
        assert decode_frames(live.ws_text_frame(payload)) == [json.loads(payload)]


def test_slow_stream_arrives_byte_for_byte_after_the_screen() -> None:
    async def scenario() -> list[dict[str, object]]:
        stream = LiveStream("s1", {}, 80, 24)
        stream.output(b"before\r\n")
        t = FakeTransport()
        w, screen = stream.subscribe_frames(t)
        stream.output(b"held until start\r\n")
        assert not t.data, "nothing before the screen is sent"
        t.write(live.ws_text_frame(json.dumps({"type": "screen", "data": screen}).encode()))
        w.start()
        for i in range(50):
            stream.output(f"line {i}\r\n".encode())
            if i == 25:
                stream.marker("approval #1 granted by alice")
            await asyncio.sleep(0.002)
        stream.end("closed")
        assert await w.next() is None
        return decode_frames(bytes(t.data))

    events = asyncio.run(scenario())
    assert events[0]["type"] == "screen" and "before" in str(events[0]["data"])
    out = "".join(str(e["data"]) for e in events if e["type"] == "o")
    assert out == "held until start\r\n" + "".join(f"line {i}\r\n" for i in range(50))
    kinds = [e["type"] for e in events]
    assert kinds.count("m") == 1 and kinds[-1] == "end"
    assert kinds.count("screen") == 1


def test_fast_stream_turns_into_screens_and_keeps_markers_and_end() -> None:
    async def scenario() -> tuple[list[dict[str, object]], int]:
        stream = LiveStream("s1", {}, 80, 24)
        t = FakeTransport()
        w, _ = stream.subscribe_frames(t)
        w.start()
        chunk = b"y" * 65536
        for i in range(100):  # 6.5 MB in well under a second: past FRAME_RATE
            stream.output(chunk)
            if i % 20 == 0:
                stream.marker(f"marker {i}")
            await asyncio.sleep(0.001)
        stream.output(b"\r\nlast line")
        stream.end("closed")
        assert await w.next() is None
        return decode_frames(bytes(t.data)), stream.snapshots

    events, snapshots = asyncio.run(scenario())
    kinds = [e["type"] for e in events]
    sent = sum(len(str(e["data"])) for e in events if e["type"] == "o")
    assert sent < 100 * 65536 // 2, "output past the rate was not all sent"
    assert snapshots >= 1 and kinds.count("screen") == snapshots
    assert [e["data"] for e in events if e["type"] == "m"] == [
        f"marker {i}" for i in range(0, 100, 20)
    ]
    assert kinds[-1] == "end"
    # The watcher's last view holds the last output: in the final screen, or sent as
    # output after it (how fast the loop above ran decides which).
    last = max(i for i, e in enumerate(events) if e["type"] == "screen")
    after = "".join(str(e["data"]) for e in events[last + 1 :] if e["type"] == "o")
    assert "last line" in str(events[last]["data"]) + after, "the last output was lost"


def test_watcher_with_a_full_socket_is_dropped_with_a_reason() -> None:
    async def scenario() -> tuple[list[dict[str, object]], bool]:
        stream = LiveStream("s1", {}, 80, 24)
        slow, fast = FakeTransport(), FakeTransport()
        ws, _ = stream.subscribe_frames(slow)
        wf, _ = stream.subscribe_frames(fast)
        ws.start()
        wf.start()
        slow.buffered = live.FRAME_BACKLOG + 1
        stream.output(b"hello")
        assert await ws.next() is None
        stream.output(b" world")
        stream.end("closed")
        assert await wf.next() is None
        return decode_frames(bytes(slow.data)), ws.dropped

    events, dropped = asyncio.run(scenario())
    assert dropped
    assert events[-1] == {"type": "end", "data": "watcher too slow, dropped", "t": events[-1]["t"]}


def test_output_past_the_rate_just_before_the_end_reaches_the_last_screen() -> None:
    # The batch that ends the session is itself past the rate: its output is skipped,
    # so the screen that stands in for it must come before the end.
    async def scenario() -> list[dict[str, object]]:
        stream = LiveStream("s1", {}, 80, 24)
        t = FakeTransport()
        w, _ = stream.subscribe_frames(t)
        w.start()
        stream.output(b"y" * (live.FRAME_BURST + 1))
        stream.output(b"\r\nlast line")
        stream.end("closed")
        assert await w.next() is None
        return decode_frames(bytes(t.data))

    events = asyncio.run(scenario())
    assert [e["type"] for e in events][-2:] == ["screen", "end"]
    assert "last line" in str(events[-2]["data"])
