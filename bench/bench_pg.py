"""PostgreSQL relay: ``pgbench -S`` TPS through ``castgate relay`` against direct and
against pgbouncer on the same server, and rows/s of a 1M-row SELECT with a masked
column, measured in one run.

- Server: the real PostgreSQL of tests/fix_postgres.py (initdb in a temporary
  directory, scram-sha-256, fsync off), its ``app`` database and role prepared as in
  tests/fix_pg_relay.py, then ``pgbench -i -s SCALE`` directly and a ``bigmask`` table
  (id, a 16-digit text value of which one in ten is a Luhn-valid PAN, a text note).
- Paths: ``direct`` (the server), ``pgbouncer`` (session pooling, auth_file, on a free
  port), ``relay`` (``castgate relay`` with the ``appdb`` target, rules and
  ``mask_columns`` of tests/fix_pg_relay.py plus ``bigmask.pan``; masking on with the
  tests' custom pattern, recording on at the default fsync_interval 1.0, query log in
  the SQLite store), ``bare`` (bench/bare_tcp.py: a zero-work asyncio passthrough on
  streams, the DESIGN.md ceiling measured in the same run) and ``bare_protocol`` (the
  same on protocol callbacks, the relay's own I/O shape: the ceiling of its design).
  Every client uses sslmode=disable.
- pgbench: ``-n -S -M simple -T SECS`` with 1 client and with 8 clients (-j 2) on every
  path, and ``-M prepared`` with 1 client direct and through the relay; the paths of a
  round run one after another in an order that rotates every round. The relay's
  sessions are sealed and their recordings removed before the next run.
- Large result: ``SELECT id, pan, note FROM bigmask`` with psycopg (``execute`` +
  ``fetchall``), directly and through the relay, alternating, every round; through the
  relay every ``pan`` must come back masked.
- Profile (``--profile auto``: only when a target is missed): py-spy on the relay
  (100 samples a second; BENCH_SPY_RATE sets another rate)
  during one extra 8-client run and one extra large read, after the measured runs.

Run: .venv/bin/python -m bench.bench_pg [--rounds 3] [--secs 10] [--rows 1000000]
     [--scale 10] [--profile auto|always|never] [--profile-prefix /tmp/pg]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

import tests.fix_postgres as fix_postgres
from recorder.masking import luhn_complete
from tests.fix_pg_relay import APP_PASSWORD, PG_TARGETS, _prepare_app_db
from tests.fix_postgres import PostgresServer
from tests.fix_relay import CASTGATE, TOKENS, _sha

AGENT = "ci-agent"
TARGET = "appdb"  # the relay target of tests/fix_pg_relay.py; its database is "app"
DATABASE = "app"
MASKED_TABLE = "bigmask"

# DESIGN.md, "Measured ceilings on this machine": a bare one-process Python passthrough
# and pgbouncer, as fractions of direct pgbench -S TPS, by client count.
CEILING_BARE_PYTHON = {1: 0.63, 8: 0.46}
DESIGN_PGBOUNCER = {1: 0.80, 8: 0.75}
TARGETS = {1: 0.5, 8: 0.4}
TARGET_ROWS = 0.4

_TPS = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _say(msg: str) -> None:
    print(f"[bench_pg {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children so far (the
    workers of ``castgate relay`` with ``listen.workers`` above one)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return own + sum(_cpu_seconds(int(c)) for c in children)


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {port} after {timeout} s")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- processes -------------------------------------------------------------------------

# The server of tests/fix_postgres.py, started by the fixture's own code (initdb,
# scram-sha-256, fsync off, run as an unprivileged account when we are root), outside
# pytest. Its finally block stops the server and removes the cluster.
postgres = contextlib.contextmanager(fix_postgres.postgres_server.__wrapped__)  # type: ignore[attr-defined]


@dataclass
class Endpoint:
    """Where a client connects, as whom, and the process that serves it (if ours)."""

    name: str
    port: int
    user: str
    password: str
    dbname: str
    pid: int | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSWORD=self.password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
        return env

    def dsn(self) -> str:
        return make_conninfo(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            sslmode="disable",
            connect_timeout=10,
        )


@contextlib.contextmanager
def pgbouncer(server: PostgresServer) -> Iterator[Endpoint]:
    """pgbouncer in session pooling mode in front of ``app``, with an auth_file; runs
    as the server's account (pgbouncer refuses to run as root)."""
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(exe).is_file():
        raise RuntimeError("pgbouncer not installed: scripts/setup installs it (Debian package)")
    account = fix_postgres._server_account()
    base = Path(tempfile.mkdtemp(prefix="castgate-bench-pgbouncer-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        base.chmod(0o755)
        port = fix_postgres._free_port()
        auth = base / "userlist.txt"
        auth.write_text(f'"app" "{APP_PASSWORD}"\n')
        auth.chmod(0o600)
        ini = base / "pgbouncer.ini"
        ini.write_text(
            f"""[databases]
{DATABASE} = host={server.host} port={server.port} dbname={DATABASE}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {auth}
pool_mode = session
max_client_conn = 200
default_pool_size = 20
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits
logfile = {base / "pgbouncer.log"}
log_connections = 0
log_disconnections = 0
"""
        )
        if account is not None:
            for path in (base, auth, ini):
                os.chown(path, account.pw_uid, account.pw_gid)
        proc = subprocess.Popen(
            [exe, "-q", str(ini)],
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **fix_postgres._run_as(account),
        )
        _wait_port(port, proc, "pgbouncer")
        yield Endpoint("pgbouncer", port, "app", APP_PASSWORD, DATABASE, proc.pid)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def bare(server: PostgresServer, *, protocol: bool = False) -> Iterator[Endpoint]:
    """bench/bare_tcp.py: the zero-work one-process Python passthrough (asyncio streams,
    DESIGN.md's ceiling; ``protocol``: on protocol callbacks, the relay's own I/O shape)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.bare_tcp",
            f"{server.host}:{server.port}",
            *(["--protocol"] if protocol else []),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().decode().strip() or 0)
        if not port:
            raise RuntimeError("bench.bare_tcp did not start")
        name = "bare_protocol" if protocol else "bare"
        yield Endpoint(name, port, "app", APP_PASSWORD, DATABASE, proc.pid)
    finally:
        _stop(proc)


def relay_config(workdir: Path, server: PostgresServer, workers: int = 1) -> Path:
    """The product's defaults where they matter (fsync_interval 1.0, max_result_rows 100,
    bin6-last4), the PostgreSQL target and rules of tests/fix_pg_relay.py with
    ``bigmask.pan`` added to its mask_columns, and the tests' custom pattern."""
    targets = PG_TARGETS.format(port=server.port)
    old = 'mask_columns = ["secrets.code"]'
    assert old in targets, "tests/fix_pg_relay.py PG_TARGETS changed shape"
    targets = targets.replace(old, f'mask_columns = ["secrets.code", "{MASKED_TABLE}.pan"]')
    cfg = f"""
data_dir = "data"
[listen]
ssh = ""
postgres = "127.0.0.1:0"
api = ""
workers = {workers}
[masking]
patterns = [{{ name = "stripe-key", regex = "sk_live_[A-Za-z0-9]{{24}}" }}]
[roles]
approver = ["sre"]
[[identities]]
name = "{AGENT}"
groups = ["agents"]
token_sha256 = "{_sha(TOKENS[AGENT])}"
{targets}
"""
    path = workdir / "castgate.toml"
    path.write_text(cfg)
    return path


@dataclass
class RelayProc:
    endpoint: Endpoint
    proc: subprocess.Popen[bytes]
    workdir: Path
    logs: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=500)
    )

    def recordings(self) -> Path:
        return self.workdir / "data" / "recordings"

    def wait_sealed(self, timeout: float = 120) -> int:
        """Wait until every session's cast is sealed (manifest written), so sealing does
        not overlap the next run; then remove the recordings. Returns the session count."""
        rec = self.recordings()
        deadline = time.monotonic() + timeout
        while True:
            casts = list(rec.glob("*.cast"))
            if casts and all(c.with_name(c.name + ".manifest.json").exists() for c in casts):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited: {list(self.logs)[-10:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay did not seal its sessions: {list(self.logs)[-5:]}")
            time.sleep(0.05)
        time.sleep(0.3)  # what follows the seal: store writes, audit events
        for f in rec.glob("*"):
            f.unlink(missing_ok=True)
        return len(casts)


@contextlib.contextmanager
def relay(server: PostgresServer, workers: int = 1) -> Iterator[RelayProc]:
    """A real ``castgate relay`` process (with ``workers`` relay processes behind its
    listener); SIGTERM (then SIGKILL) on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="castgate-bench-pgrelay-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        config = relay_config(workdir, server, workers)
        proc = subprocess.Popen(
            [CASTGATE, "relay", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "APPDB_PASSWORD": APP_PASSWORD},
        )
        logs: collections.deque[dict[str, Any]] = collections.deque(maxlen=500)
        listening: dict[str, Any] = {}
        started = [0]
        ready = threading.Event()
        stderr = proc.stderr
        assert stderr is not None

        def pump() -> None:
            for raw in stderr:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    entry = {"raw": raw.decode(errors="replace")}
                logs.append(entry)
                if entry.get("msg") == "relay.listening":
                    listening.update(entry)
                    started[0] += 1
                    if started[0] == workers:
                        ready.set()
            stderr.close()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(60):
            raise RuntimeError(f"relay did not start: {list(logs)[-10:]}")
        port = int(str(listening["postgres"]).rsplit(":", 1)[1])
        ep = Endpoint("relay", port, AGENT, TOKENS[AGENT], TARGET, proc.pid)
        yield RelayProc(ep, proc, workdir, logs)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# -- data ------------------------------------------------------------------------------


def pgbench_init(pgbench: str, ep: Endpoint, scale: int) -> None:
    subprocess.run(
        [
            pgbench,
            "-i",
            "-s",
            str(scale),
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            str(ep.port),
            *("-U", ep.user, ep.dbname),
        ],
        env=ep.env(),
        check=True,
        capture_output=True,
        timeout=600,
    )


def _check_digit(prefix: str) -> int:
    """The Luhn check digit for ``prefix`` (luhn_complete is too slow for 1M rows)."""
    total = 0
    for n, ch in enumerate(reversed(prefix)):
        d = int(ch)
        if n % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return (10 - total % 10) % 10


def pan_value(i: int) -> str:
    """16 digits; one row in ten is a Luhn-valid PAN, the others fail the check."""
    prefix = f"4{i:014d}"
    check = _check_digit(prefix)
    if i % 10 != 0:
        check = (check + 1 + i % 9) % 10
    return f"{prefix}{check}"


def fill_masked_table(ep: Endpoint, rows: int) -> int:
    """Create and fill ``bigmask``; returns how many of its values are Luhn-valid."""
    assert all(pan_value(i) == luhn_complete(f"4{i:014d}") for i in range(0, 1000, 10)), (
        "Luhn check digit"
    )
    valid = 0
    with psycopg.connect(ep.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {MASKED_TABLE}")
        conn.execute(f"CREATE TABLE {MASKED_TABLE} (id int PRIMARY KEY, pan text, note text)")
        with conn.cursor() as cur, cur.copy(f"COPY {MASKED_TABLE} FROM STDIN") as copy:
            buf = io.StringIO()
            for i in range(1, rows + 1):
                pan = pan_value(i)
                valid += i % 10 == 0
                buf.write(f"{i}\t{pan}\torder {i} shipped to customer, status ok\n")
                if i % 50_000 == 0:
                    copy.write(buf.getvalue())
                    buf = io.StringIO()
            copy.write(buf.getvalue())
        conn.execute(f"VACUUM ANALYZE {MASKED_TABLE}")
    return valid


# -- pgbench ---------------------------------------------------------------------------


def run_pgbench(
    pgbench: str, ep: Endpoint, *, mode: str, clients: int, secs: int
) -> dict[str, float]:
    jobs = 2 if clients > 1 else 1
    argv = [pgbench, "-n", "-S", "-M", mode, "-T", str(secs), "-c", str(clients), "-j", str(jobs)]
    argv += ["-h", "127.0.0.1", "-p", str(ep.port), "-U", ep.user, ep.dbname]
    cpu0 = _cpu_seconds(ep.pid) if ep.pid else 0.0
    t0 = time.monotonic()
    res = subprocess.run(argv, env=ep.env(), capture_output=True, text=True, timeout=secs + 120)
    wall = time.monotonic() - t0
    cpu = (_cpu_seconds(ep.pid) - cpu0) if ep.pid else 0.0
    tps = _TPS.search(res.stdout)
    done = _PROCESSED.search(res.stdout)
    failed = _FAILED.search(res.stdout)
    if res.returncode != 0 or not tps or not done or int(done.group(1)) == 0:
        raise RuntimeError(
            f"pgbench via {ep.name} ({mode}, {clients} clients) failed ({res.returncode}):\n"
            f"{res.stdout[-1500:]}\n{res.stderr[-1500:]}"
        )
    if failed and int(failed.group(1)):
        raise RuntimeError(f"pgbench via {ep.name}: {failed.group(1)} failed transactions")
    return {"tps": float(tps.group(1)), "cpu_pct": round(100 * cpu / wall, 1)}


@dataclass(frozen=True)
class Mode:
    key: str
    mode: str
    clients: int
    paths: tuple[str, ...]


MODES = (
    Mode("simple_c1", "simple", 1, ("direct", "pgbouncer", "relay", "bare", "bare_protocol")),
    Mode("simple_c8", "simple", 8, ("direct", "pgbouncer", "relay", "bare", "bare_protocol")),
    Mode("prepared_c1", "prepared", 1, ("direct", "relay")),
)


def _stat(values: list[float]) -> dict[str, Any]:
    return {
        "runs": [round(v, 1) for v in values],
        "median": round(statistics.median(values), 1),
        "best": round(max(values), 1),
    }


def pgbench_rounds(
    pgbench: str, eps: dict[str, Endpoint], r: RelayProc, rounds: int, secs: int
) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        m.key: {p: [] for p in m.paths if p in eps} for m in MODES
    }
    for i in range(rounds):
        for m in MODES:
            names = list(runs[m.key])
            order = names[i % len(names) :] + names[: i % len(names)]
            for path in order:
                res = run_pgbench(pgbench, eps[path], mode=m.mode, clients=m.clients, secs=secs)
                if path == "relay":
                    r.wait_sealed()
                runs[m.key][path].append(res)
                _say(f"round {i + 1} {m.key:12} {path:10} {res['tps']:9.1f} TPS")
    out: dict[str, Any] = {}
    for m in MODES:
        per = runs[m.key]
        entry: dict[str, Any] = {"mode": m.mode, "clients": m.clients}
        entry["tps"] = {p: _stat([x["tps"] for x in v]) for p, v in per.items()}
        entry["cpu_pct"] = {
            p: [x["cpu_pct"] for x in v] for p, v in per.items() if eps[p].pid is not None
        }
        ratios: dict[str, Any] = {}
        for p in per:
            if p == "direct":
                continue
            paired = [a["tps"] / d["tps"] for a, d in zip(per[p], per["direct"], strict=True)]
            ratios[f"{p}/direct"] = {
                "of_medians": round(
                    entry["tps"][p]["median"] / entry["tps"]["direct"]["median"], 3
                ),
                "per_round": [round(x, 3) for x in paired],
            }
        for bare_path in ("bare", "bare_protocol"):
            if "relay" in per and bare_path in per:
                ratios[f"relay/{bare_path}"] = {
                    "of_medians": round(
                        entry["tps"]["relay"]["median"] / entry["tps"][bare_path]["median"], 3
                    )
                }
        entry["ratios"] = ratios
        if m.mode == "simple":
            entry["design_ceiling_bare_python"] = CEILING_BARE_PYTHON[m.clients]
            entry["design_pgbouncer"] = DESIGN_PGBOUNCER[m.clients]
            entry["target_relay"] = TARGETS[m.clients]
            entry["target_met"] = ratios["relay/direct"]["of_medians"] >= TARGETS[m.clients]
        out[m.key] = entry
    return out


# -- large masked result ---------------------------------------------------------------

QUERY = f"SELECT id, pan, note FROM {MASKED_TABLE}"  # noqa: S608 - a constant


def read_all(ep: Endpoint, rows: int, valid: int, masked: bool) -> float:
    """Seconds to execute and fetchall; checks the row count and the masking."""
    with psycopg.connect(ep.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        t0 = time.perf_counter()
        cur.execute(QUERY)
        got = cur.fetchall()
        elapsed = time.perf_counter() - t0
    if len(got) != rows:
        raise RuntimeError(f"{ep.name}: {len(got)} rows, want {rows}")
    starred = sum("*" in r[1] for r in got)
    kept = sum(r[1][:6].isdigit() for r in got)
    if masked and (starred != rows or kept != valid):
        raise RuntimeError(
            f"{ep.name}: {starred}/{rows} pan values masked, {kept} bin6-last4 (want {valid})"
        )
    if not masked and starred:
        raise RuntimeError(f"{ep.name}: masked values on the direct path")
    del got
    return elapsed


def large_select(
    eps: dict[str, Endpoint], r: RelayProc, rows: int, valid: int, rounds: int
) -> dict[str, Any]:
    secs: dict[str, list[float]] = {"direct": [], "relay": []}
    cpu: list[float] = []
    for i in range(rounds):
        for path in ("direct", "relay") if i % 2 == 0 else ("relay", "direct"):
            cpu0 = _cpu_seconds(r.proc.pid)
            s = read_all(eps[path], rows, valid, masked=path == "relay")
            if path == "relay":
                cpu.append(round(100 * (_cpu_seconds(r.proc.pid) - cpu0) / s, 1))
                r.wait_sealed()
            secs[path].append(s)
            _say(f"round {i + 1} large_select {path:10} {rows / s:11,.0f} rows/s")
    rates = {p: _stat([rows / s for s in v]) for p, v in secs.items()}
    ratio = round(rates["relay"]["median"] / rates["direct"]["median"], 3)
    return {
        "query": QUERY,
        "client": "psycopg cursor.execute + fetchall (text format, extended protocol)",
        "rows": rows,
        "luhn_valid_rows": valid,
        "rows_per_s": rates,
        "relay_cpu_pct": cpu,
        "ratio_relay/direct": ratio,
        "per_round": [round(d / v, 3) for d, v in zip(secs["direct"], secs["relay"], strict=True)],
        "target": TARGET_ROWS,
        "target_met": ratio >= TARGET_ROWS,
    }


# -- profiling (after the figures, not part of them) -----------------------------------


def _top(raw: Path, n: int = 15) -> dict[str, Any]:
    """Aggregate py-spy raw (collapsed) stacks: self and inclusive share per function,
    as percentages of the samples taken while a relay thread held the GIL (``--gil``:
    the one core's worth of Python work the relay can do)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k

    def pct(c: collections.Counter[str]) -> list[list[Any]]:
        return [[f, round(100 * v / max(total, 1), 1)] for f, v in c.most_common(n)]

    # Inclusive shares of castgate's own functions (the event loop frames above them
    # would fill the list with 100s); the entry points are left out for the same reason.
    ours = collections.Counter(
        {
            f: v
            for f, v in incl.items()
            if ("(relay/" in f or "(recorder/" in f)
            and not f.startswith(("run_relay ", "PgSession.run ", "PgSession._relay "))
        }
    )
    return {"samples_holding_gil": total, "self_pct": pct(own), "inclusive_pct": pct(ours)}


def _spy(pid: int, fmt: str, out: str) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "-r",
            os.environ.get("BENCH_SPY_RATE", "100"),
            "--gil",
            "--nolineno",
            "-f",
            fmt,
            "-o",
            out,
            "--pid",
            str(pid),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    return proc


def _unspy(proc: subprocess.Popen[bytes]) -> None:
    _stop(proc, signal.SIGINT, 60)  # py-spy writes its file on SIGINT


def profile(
    pgbench: str, eps: dict[str, Endpoint], r: RelayProc, prefix: str, secs: int, rows: int
) -> dict[str, Any]:
    pid = r.proc.pid
    out: dict[str, Any] = {}
    spy = _spy(pid, "raw", f"{prefix}-pgbench-c8.txt")
    try:
        run_pgbench(pgbench, eps["relay"], mode="simple", clients=8, secs=secs)
    finally:
        _unspy(spy)
    r.wait_sealed()
    out["pgbench_simple_c8"] = {"raw": f"{prefix}-pgbench-c8.txt"}
    out["pgbench_simple_c8"].update(_top(Path(f"{prefix}-pgbench-c8.txt")))
    spy = _spy(pid, "raw", f"{prefix}-pgbench-c1.txt")
    try:
        run_pgbench(pgbench, eps["relay"], mode="simple", clients=1, secs=secs)
    finally:
        _unspy(spy)
    r.wait_sealed()
    out["pgbench_simple_c1"] = {"raw": f"{prefix}-pgbench-c1.txt"}
    out["pgbench_simple_c1"].update(_top(Path(f"{prefix}-pgbench-c1.txt")))
    spy = _spy(pid, "flamegraph", f"{prefix}-pgbench-c8.svg")
    try:
        run_pgbench(pgbench, eps["relay"], mode="simple", clients=8, secs=secs)
    finally:
        _unspy(spy)
    r.wait_sealed()
    out["flamegraph_c8"] = f"{prefix}-pgbench-c8.svg"
    spy = _spy(pid, "raw", f"{prefix}-large.txt")
    try:
        with psycopg.connect(eps["relay"].dsn(), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(QUERY)
            n = len(cur.fetchall())
        assert n == rows
    finally:
        _unspy(spy)
    r.wait_sealed()
    out["large_select"] = {"raw": f"{prefix}-large.txt"}
    out["large_select"].update(_top(Path(f"{prefix}-large.txt")))
    return out


# -- main ------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (res.stdout or res.stderr).strip().splitlines()[0]
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--secs", type=int, default=10, help="seconds per pgbench run")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the masked table")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare Python passthroughs")
    ap.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy the relay after the figures (auto: when a target is missed)",
    )
    ap.add_argument("--profile-prefix", default="/tmp/bench-pg-relay")
    ap.add_argument(
        "--workers", type=int, default=1, help="listen.workers of the relay (processes)"
    )
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bindir = fix_postgres.find_postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL server binaries not found; run scripts/setup")
    pgbench = str(bindir / "pgbench")
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "git_head": _version(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"]),
        "command": " ".join([".venv/bin/python -m bench.bench_pg", *sys.argv[1:]]),
        "versions": {
            "postgres": _version([str(bindir / "postgres"), "--version"]),
            "pgbench": _version([pgbench, "--version"]),
            "pgbouncer": _version([shutil.which("pgbouncer") or "pgbouncer", "--version"]),
            "python": sys.version.split()[0],
        },
        "relay_config": "target appdb (tests/fix_pg_relay.py: 3 sql rules, mask_columns "
        f"secrets.code + {MASKED_TABLE}.pan), masking on (pan + track, bin6-last4, 1 custom "
        "pattern), recording on (fsync_interval 1.0, max_result_rows 100), query log in "
        "SQLite; sslmode=disable on every path",
        "pgbench": f"-n -S -T {args.secs} -c 1 | -c 8 -j 2, scale {args.scale}",
        "relay_workers": args.workers,
    }
    with postgres() as server:
        _say(f"postgres on {server.port}; preparing data")
        direct_dsn = _prepare_app_db(server)
        direct = Endpoint("direct", server.port, "app", APP_PASSWORD, DATABASE)
        assert f"port={server.port}" in direct_dsn
        pgbench_init(pgbench, direct, args.scale)
        valid = fill_masked_table(direct, args.rows)
        with (
            pgbouncer(server) as bouncer,
            relay(server, args.workers) as r,
            contextlib.ExitStack() as stack,
        ):
            eps = {"direct": direct, "pgbouncer": bouncer, "relay": r.endpoint}
            if not args.no_bare:
                eps["bare"] = stack.enter_context(bare(server))
                eps["bare_protocol"] = stack.enter_context(bare(server, protocol=True))
            _say("warm-up")
            for ep in eps.values():
                run_pgbench(pgbench, ep, mode="simple", clients=1, secs=2)
                if ep is r.endpoint:
                    r.wait_sealed()
            out["pgbench_tps"] = pgbench_rounds(pgbench, eps, r, args.rounds, args.secs)
            out["large_select"] = large_select(eps, r, args.rows, valid, args.rounds)
            met = {k: v["target_met"] for k, v in out["pgbench_tps"].items() if "target_met" in v}
            met["large_select"] = out["large_select"]["target_met"]
            out["targets_met"] = met
            if args.profile == "always" or (args.profile == "auto" and not all(met.values())):
                _say("profiling the relay (py-spy; not part of the figures)")
                out["profile"] = profile(pgbench, eps, r, args.profile_prefix, args.secs, args.rows)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
