"""Live fan-out: slow watchers are dropped, late joiners see the screen, hostile escape
strings never reach an operator's terminal."""

from __future__ import annotations

import asyncio

from relay.live import LiveHub, neutralise, render_event


def test_hostile_escape_strings_are_removed() -> None:
    attacks = [
        "\x1b]52;c;cm0gLXJmIH4=\x07",  # OSC 52: write the operator's clipboard
        "\x1b]0;innocent title\x1b\\",  # window title
        "\x1b]8;;http://evil/\x07link\x1b]8;;\x07",  # hyperlink
        "\x1bP+q544e\x1b\\",  # DCS request
        "\x1b_apc payload\x1b\\",
        "\x9d52;c;Zm9v\x9c",  # 8-bit OSC
    ]
    for attack in attacks:
        text = neutralise(f"before{attack}after")
        assert "52;" not in text and "evil" not in text and "\x1bP" not in text
        assert text.startswith("before") and text.endswith("after")
    colour = "\x1b[31mred\x1b[0m \x1b[2J\x1b[H"
    assert neutralise(colour) == colour
    assert "\x1b]52" not in render_event({"type": "o", "data": "x\x1b]52;c;QQ==\x07y"})


def test_slow_watcher_is_dropped_not_the_session() -> None:
    async def main() -> None:
        hub = LiveHub()
        stream = hub.open("s1", {}, 80, 24)
        stream.output(b"\x1b[2J\x1b[Hhello screen")
        slow, screen = stream.subscribe()
        assert "hello screen" in screen
        fast, _ = stream.subscribe()
        for i in range(5000):
            stream.output(f"line {i}\r\n".encode())
            if not fast.queue.empty():
                while not fast.queue.empty():
                    fast.queue.get_nowait()
        assert slow.dropped and slow not in stream.watchers
        assert fast in stream.watchers
        hub.close("s1", "closed")
        assert (await fast.next()) is not None  # the end event
        assert (await fast.next()) is None

    asyncio.run(main())


def test_tail_keeps_the_latest_output_in_bounded_memory() -> None:
    """The tail a late joiner's screen is drawn from: the last bytes exactly, whatever
    the chunk sizes, and never much more than twice the tail kept."""
    from relay import live

    stream = LiveHub().open("s2", {}, 80, 24)
    sent = bytearray()
    sizes = [1, 7, 4096, 32768, 65536, 3, 300_000]
    for i in range(400):
        chunk = bytes([65 + i % 26]) * sizes[i % len(sizes)]
        stream.output(chunk)
        sent += chunk
        assert stream._tail_size <= 2 * live._TAIL_BYTES + len(chunk)
    for n in (0, 1, 5, 40_000, live._TAIL_BYTES):
        assert stream.recent(n) == bytes(sent[len(sent) - n :])
    assert stream.bytes == len(sent)
    stream.output(b"\x1b[2J\x1b[Hlast words")
    assert "last words" in stream.screen()
