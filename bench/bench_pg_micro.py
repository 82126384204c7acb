"""The PostgreSQL relay's Python per statement, measured in one process without I/O.

A ``PgSession`` set up as after authentication (the bench_pg relay configuration:
masking, mask_columns, rules, recording and the SQLite query log all on) is fed
``pgbench -S``-shaped traffic by direct calls: a Query from the client
(``_client_data``), then RowDescription, one DataRow, CommandComplete and ReadyForQuery
from the target (``_server_data``). Sockets are stand-ins that count bytes. What it
measures is the relay's own work a statement, without the kernel, the scheduler and
the other processes that make bench_pg's figures move by 10-20 % between runs: use it
to compare two versions of the code, bench_pg for what a client sees.

- ``statement``: best of 5 runs of N statements, microseconds a statement (event loop
  not running: the transcript is drawn when a batch fills, as under load).
- ``query_log``: the store write of a 2,000-row query-log batch, microseconds a row of
  the writing thread's CPU.

Run: .venv/bin/python -m bench.bench_pg_micro [--statements 30000] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import random
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import bench_pg
from recorder.config import parse_config
from recorder.signing import SigningKey
from recorder.store import Store
from relay.context import RelayContext
from relay.identity import Identity
from relay.pg.relay import PgListener, PgSession


class _Sink:
    """Stands in for a stream writer and its transport."""

    def __init__(self) -> None:
        self.bytes = 0
        self.transport = self

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if key == "peername" else default

    def is_closing(self) -> bool:
        return False


class _Upstream:
    def __init__(self) -> None:
        self.writer = _Sink()
        self.status = b"I"
        self.params: dict[str, str] = {}


# pgbench -S's statement (a benchmark's constant text, not a query built from input).
_SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _session(workdir: Path) -> tuple[PgSession, PgListener]:
    class _Server:
        host, port = "127.0.0.1", 5432

    path = bench_pg.relay_config(workdir, _Server())  # type: ignore[arg-type]
    cfg = parse_config(path.read_text(), path)
    cfg.recordings_dir.mkdir(parents=True, exist_ok=True)
    ctx = RelayContext(cfg, Store.open(cfg.store_url()), SigningKey.load_or_create(cfg.keys_dir))
    listener = PgListener(ctx, "127.0.0.1", None)
    session = PgSession(ctx, listener, _Sink())  # type: ignore[arg-type]
    session.ident = Identity(bench_pg.AGENT, ("agents",), "token")
    session.target = next(t for t in cfg.targets if t.name == bench_pg.TARGET)
    session.up = _Upstream()  # type: ignore[assignment]
    session._open_recording()
    ctx.spool.create_session(
        session.id,
        identity=bench_pg.AGENT,
        target=bench_pg.TARGET,
        protocol="postgres",
        groups=["agents"],
        auth_method="token",
    )
    return session, listener


async def measure(statements: int, profile: str | None) -> dict[str, Any]:
    session, listener = _session(Path(tempfile.mkdtemp(prefix="cg-pg-micro-")))
    rnd = random.Random(1)
    queries = [
        _msg(b"Q", _SELECT.format(rnd.randint(1, 10**5)).encode() + b"\0") for _ in range(1000)
    ]
    field = b"abalance\0" + struct.pack("!IhIhih", 16400, 3, 23, 4, -1, 0)
    answer = (
        _msg(b"T", struct.pack("!h", 1) + field)
        + _msg(b"D", struct.pack("!hi", 1, 1) + b"0")
        + _msg(b"C", b"SELECT 1\0")
        + _msg(b"Z", b"I")
    )

    def run(n: int) -> None:
        for i in range(n):
            session._client_data(queries[i % 1000])
            session._server_data(answer)

    run(2000)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        run(statements)
        runs.append((time.perf_counter() - t0) / statements * 1e6)
        await asyncio.sleep(0.2)  # the log and the cast catch up between runs
    if profile:
        prof = cProfile.Profile()
        prof.runcall(run, statements)
        prof.dump_stats(profile)
    rows = [
        (session.id, time.time(), _SELECT.format(i), "allow", None, "SELECT 1", 1, 0.1)
        for i in range(2000)
    ]
    per_row = []
    for _ in range(3):
        c0 = time.thread_time()
        listener.qlog._write(rows)  # type: ignore[arg-type]
        per_row.append((time.thread_time() - c0) / len(rows) * 1e6)
    session._flush_cast()
    await listener.qlog.flush()
    return {
        "statement_us": {"best": round(min(runs), 2), "runs": [round(r, 2) for r in runs]},
        "query_log_us_per_row": round(min(per_row), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--statements", type=int, default=30000, help="statements a run")
    ap.add_argument("--profile", help="write a cProfile of one more run here")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(measure(args.statements, args.profile)), indent=2))


if __name__ == "__main__":
    main()
