"""Bulk output through the SSH relay: byte-exact delivery and recording on the fast
paths (digit-free chunks, all-NUL chunks, coalesced writes), flow control from a slow
agent, and the masker's hold-back released on its deadline while a command runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import asyncssh

from recorder.integrity import Verdict, verify_cast
from recorder.signing import PUBLIC_NAME, load_public
from tests.fix_relay import Relay, wait_for

_MB = 1 << 20


def _sealed_cast(relay: Relay, command: str) -> tuple[Path, dict[str, object]]:
    """The sealed cast whose header names ``command``, and its manifest."""

    def find() -> list[Path]:
        found = []
        for cast in relay.recordings().glob("*.cast"):
            with cast.open("rb") as fh:
                header = fh.readline()
            manifest = Path(f"{cast}.manifest.json")
            if command.encode() in header and manifest.exists():
                found.append(cast)
        return found

    wait_for(lambda: find(), timeout=60)
    (cast,) = find()
    return cast, json.loads(Path(f"{cast}.manifest.json").read_text())


def _output_of(cast: Path) -> str:
    lines = cast.read_bytes().split(b"\n")[1:-1]
    return "".join(e[2] for e in map(json.loads, lines) if e[1] == "o")


def test_zeros_and_digits_arrive_byte_exact_and_are_recorded(relay: Relay) -> None:
    pub = load_public(relay.workdir / "data" / "keys" / PUBLIC_NAME)
    zeros = "head -c 8M /dev/zero; printf zeros-done"
    res = relay.ssh("web", zeros, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"\x00" * (8 * _MB) + b"zeros-done"
    cast, manifest = _sealed_cast(relay, zeros)
    assert manifest["nul_bytes"] == 8 * _MB
    assert _output_of(cast) == "zeros-done"
    assert verify_cast(cast, pub).verdict is Verdict.INTACT

    digits = "seq 1 3000000 | head -c 8M"
    want = subprocess.run(["sh", "-c", digits], capture_output=True, check=True).stdout
    res = relay.ssh("web", digits, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want  # seq's numbers are far from 13 digits: nothing masked
    cast, manifest = _sealed_cast(relay, digits)
    assert _output_of(cast) == want.decode()
    assert verify_cast(cast, pub).verdict is Verdict.INTACT


def test_held_digits_are_released_on_the_deadline_while_the_command_runs(
    relay: Relay,
) -> None:
    """Output ending in what could be the start of a card number is held back, then
    released ``hold_deadline`` after the last output, not when the command ends (the
    command sleeps a minute; the hang guard is 30 s)."""

    async def main() -> None:
        async with asyncssh.connect(
            "127.0.0.1",
            relay.port,
            username="web",
            client_keys=[str(relay.agent_key)],
            known_hosts=relay.known_hosts_obj(),
            config=[],
        ) as conn:
            # More output arrives while the first digits are held: the deadline counts
            # from the last chunk.
            proc = await conn.create_process(
                "printf 'total 4111'; sleep 0.005; printf ' 1111'; sleep 60", encoding=None
            )
            got = b""
            while b"total 4111 1111" not in got:
                got += await asyncio.wait_for(proc.stdout.read(1024), 30)
            assert proc.exit_status is None  # still sleeping
            proc.close()

    asyncio.run(main())


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class _Counter(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.got = 0

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.got += len(data)


def test_a_slow_agent_holds_the_target_back_and_the_relay_does_not_buffer(
    relay: Relay,
) -> None:
    """An agent that stops reading a 256 MiB stream: the relay stops reading the target
    (its memory stays flat, where the target could have written it all meanwhile), and
    once the agent reads again every byte arrives."""
    size = 256 * _MB

    async def main() -> None:
        async with asyncssh.connect(
            "127.0.0.1",
            relay.port,
            username="web",
            client_keys=[str(relay.agent_key)],
            known_hosts=relay.known_hosts_obj(),
            config=[],
        ) as conn:
            start = _rss_mb(relay.proc.pid)
            chan, session = await conn.create_session(
                _Counter, "head -c 256M /dev/zero", encoding=None
            )
            assert isinstance(session, _Counter)
            chan.pause_reading()
            await asyncio.sleep(3)
            held = _rss_mb(relay.proc.pid)
            await asyncio.sleep(2)
            later = _rss_mb(relay.proc.pid)
            assert later - start < 64 and held - start < 64, (start, held, later)
            assert session.got < size
            chan.resume_reading()
            await asyncio.wait_for(chan.wait_closed(), 120)
            assert session.got == size
            assert chan.get_exit_status() == 0

    asyncio.run(main())
