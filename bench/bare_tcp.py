"""A bare asyncio TCP passthrough in one Python process (no parsing, no masking, no
recording): the ceiling DESIGN.md measures for the PostgreSQL relay, rebuilt so
bench_pg can measure it in the same run as the castgate relay. Same I/O shape as
relay/pg/relay.py: asyncio streams, ``read(65536)``, write, drain, one task per
direction.

Run: .venv/bin/python -m bench.bare_tcp HOST:PORT
Prints the listening port on one line when ready; SIGTERM ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pump(cr, uw), _pump(ur, cw))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
