"""WebSocket watchers fed by the live stream through a ``send`` (in the relay, aiohttp's
``WebSocketResponse.send_frame``; tests/integration/test_control_api.py drives that with
real clients): every byte up to the frame rate, screens past it, markers and the end
always, in order; one encoding per batch for all watchers; a watcher whose socket does
not drain is dropped, never the session."""

from __future__ import annotations

import asyncio
import json

from relay import live
from relay.live import LiveStream


class Sink:
    """Where a watcher's messages go: what ``send_frame`` would put on the socket, one
    payload per text message. ``stall`` makes ``send`` wait, as ``send_frame`` does while
    the transport is paused because the peer does not read."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.stall = False
        self.stalled = asyncio.Event()
        self.resume = asyncio.Event()
        self.arrived = asyncio.Event()

    async def send(self, payload: bytes) -> None:
        if self.stall:
            self.stalled.set()
            await self.resume.wait()
        self.messages.append(payload)
        self.arrived.set()

    async def wait_for(self, n: int) -> None:
        while len(self.messages) < n:
            self.arrived.clear()
            await self.arrived.wait()

    def events(self) -> list[dict[str, object]]:
        return [json.loads(m) for m in self.messages]


def test_slow_stream_arrives_byte_for_byte_after_the_screen() -> None:
    async def scenario() -> list[dict[str, object]]:
        stream = LiveStream("s1", {}, 80, 24)
        stream.output(b"before\r\n")
        sink = Sink()
        w, screen = stream.subscribe_frames(sink.send)
        stream.output(b"held until run\r\n")
        await asyncio.sleep(2 * live.FRAME_INTERVAL)  # a batch went by meanwhile
        assert not sink.messages, "nothing before the screen is sent"
        sink.messages.append(json.dumps({"type": "screen", "data": screen}).encode())
        sender = asyncio.ensure_future(w.run())
        for i in range(50):
            stream.output(f"line {i}\r\n".encode())
            if i == 25:
                stream.marker("approval #1 granted by alice")
            await asyncio.sleep(0.002)
        stream.end("closed")
        await sender
        return sink.events()

    events = asyncio.run(scenario())
    assert events[0]["type"] == "screen" and "before" in str(events[0]["data"])
    out = "".join(str(e["data"]) for e in events if e["type"] == "o")
    assert out == "held until run\r\n" + "".join(f"line {i}\r\n" for i in range(50))
    kinds = [e["type"] for e in events]
    assert kinds.count("m") == 1 and kinds[-1] == "end"
    assert kinds.count("screen") == 1


def test_fast_stream_turns_into_screens_and_keeps_markers_and_end() -> None:
    async def scenario() -> tuple[list[dict[str, object]], int]:
        stream = LiveStream("s1", {}, 80, 24)
        sink = Sink()
        w, _ = stream.subscribe_frames(sink.send)
        sender = asyncio.ensure_future(w.run())
        chunk = b"y" * 65536
        for i in range(100):  # 6.5 MB in well under a second: past FRAME_RATE
            stream.output(chunk)
            if i % 20 == 0:
                stream.marker(f"marker {i}")
            await asyncio.sleep(0.001)
        stream.output(b"\r\nlast line")
        stream.end("closed")
        await sender
        return sink.events(), stream.snapshots

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


def test_watcher_whose_socket_does_not_drain_is_dropped_with_a_reason() -> None:
    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]], bool, bool]:
        stream = LiveStream("s1", {}, 80, 24)
        slow, fast = Sink(), Sink()
        ws, _ = stream.subscribe_frames(slow.send)
        wf, _ = stream.subscribe_frames(fast.send)
        slow_task = asyncio.ensure_future(ws.run())
        fast_task = asyncio.ensure_future(wf.run())
        slow.stall = True
        stream.output(b"hello")
        await slow.stalled.wait()
        # Markers are never skipped by the rate: one batch of them takes the stalled
        # watcher's backlog past the limit (the fast one takes it in its stride), and
        # at the next batch the stalled one alone is dropped.
        big = "m" * 65536
        n = live.FRAME_BACKLOG // len(big) + 2
        for _ in range(n):
            stream.marker(big)
        await fast.wait_for(1 + n)
        assert not ws.dropped
        stream.marker("next")
        await fast.wait_for(2 + n)
        fast_kept = not wf.dropped
        slow.stall = False
        slow.resume.set()
        await slow_task
        stream.output(b" world")
        stream.end("closed")
        await fast_task
        return slow.events(), fast.events(), ws.dropped, fast_kept

    slow, fast, dropped, fast_kept = asyncio.run(scenario())
    assert dropped and fast_kept
    assert slow[-1] == {"type": "end", "data": "watcher too slow, dropped", "t": slow[-1]["t"]}
    assert len(slow) == 2, "the backlog it could not take is discarded, the end is not"
    assert fast[-1]["type"] == "end" and fast[-1]["data"] == "closed"
    assert "world" in "".join(str(e["data"]) for e in fast if e["type"] == "o")


def test_one_encoding_per_batch_for_all_watchers() -> None:
    """Every watcher is handed the very same payload objects, and a batch's output
    chunks travel as one message."""

    async def scenario() -> list[list[bytes]]:
        stream = LiveStream("s1", {}, 80, 24)
        sinks = [Sink() for _ in range(3)]
        tasks = []
        for sink in sinks:
            w, _ = stream.subscribe_frames(sink.send)
            tasks.append(asyncio.ensure_future(w.run()))
        stream.output(b"one ")
        stream.output(b"two ")
        stream.marker("m")
        stream.output(b"three")
        stream.end("closed")
        await asyncio.gather(*tasks)
        return [sink.messages for sink in sinks]

    got = asyncio.run(scenario())
    assert [json.loads(m)["data"] for m in got[0]] == ["one two ", "m", "three", "closed"]
    for other in got[1:]:
        assert all(a is b for a, b in zip(got[0], other, strict=True))


def test_a_watcher_of_an_ended_session_gets_the_end() -> None:
    async def scenario() -> list[dict[str, object]]:
        stream = LiveStream("s1", {}, 80, 24)
        stream.end("closed")
        sink = Sink()
        w, _ = stream.subscribe_frames(sink.send)
        await w.run()
        return sink.events()

    assert [e["data"] for e in asyncio.run(scenario())] == ["session already ended"]


def test_output_past_the_rate_just_before_the_end_reaches_the_last_screen() -> None:
    # The batch that ends the session is itself past the rate: its output is skipped,
    # so the screen that stands in for it must come before the end.
    async def scenario() -> list[dict[str, object]]:
        stream = LiveStream("s1", {}, 80, 24)
        sink = Sink()
        w, _ = stream.subscribe_frames(sink.send)
        sender = asyncio.ensure_future(w.run())
        stream.output(b"y" * (live.FRAME_BURST + 1))
        stream.output(b"\r\nlast line")
        stream.end("closed")
        await sender
        return sink.events()

    events = asyncio.run(scenario())
    assert [e["type"] for e in events][-2:] == ["screen", "end"]
    assert "last line" in str(events[-2]["data"])
