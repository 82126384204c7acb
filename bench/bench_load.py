"""Load (issue 9, item 1): N concurrent SSH sessions and M concurrent PostgreSQL
connections through one ``castgate relay`` (masking and recording on, default fsync),
for ``--secs`` seconds; then check that nothing was dropped or lost.

- SSH: each session is an asyncssh client connection to the relay (target ``web``, the
  real sshd of tests/fix_sshd.py with MaxStartups/MaxSessions raised) running a bash loop
  that prints ``s=SESSION i=COUNTER t=$EPOCHREALTIME card=TESTPAN`` every 50 ms. The
  client keeps every byte it receives; latency is receipt time minus the line's
  timestamp (same clock). A few direct sessions to sshd run at the same time as the
  baseline for the added latency.
- PostgreSQL: each connection is a psycopg AsyncConnection to the relay's ``appdb``
  (tests/fix_pg_relay.py) running small queries in a loop (one in three returns card
  numbers, which must arrive masked), ``--pg-interval`` apart; a few direct connections
  to the server are the baseline.
- Clients run in ``--workers`` processes. The relay's VmRSS is read before, during
  (peak) and after the run.
- Checks: every client finished without error; every cast of the run is sealed and
  verifies (recorder.integrity.verify_cast and ``castgate verify``) against the relay's
  public key; for SSH the bytes the agent received equal the concatenated ``o`` data of
  its cast; no raw test card number in any cast.

Run: .venv/bin/python -m bench.bench_load [--ssh 200] [--pg 200] [--secs 60] [--ramp 30]
     [--pg-connect-timeout 60] [--workers 4] [--relay-log FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh
import psycopg

import tests.fix_postgres as fix_postgres
import tests.fix_relay as fix_relay
import tests.fix_sshd as fix_sshd
from bench import bench_ssh
from recorder.integrity import Verdict, verify_cast
from recorder.masking import luhn_valid
from recorder.signing import load_public
from tests.fix_pg_relay import APP_PASSWORD, PANS, PG_TARGETS, _prepare_app_db
from tests.fix_postgres import PostgresServer
from tests.fix_relay import CASTGATE, Relay, start_relay
from tests.fix_sshd import SshTarget

SSH_TARGET = "web"
LINE_PERIOD = 0.05
CIPHER = "aes128-gcm@openssh.com"
_LINE = re.compile(rb"s=(\d+) i=(\d+) t=([\d.]+) card=")
_DIGITS = re.compile(r"\d{13,19}")


def _say(msg: str) -> None:
    print(f"[bench_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pct(values: list[float]) -> dict[str, float] | None:
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50": round(statistics.median(values), 2),
        "p99": round(q[98], 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


# -- processes -------------------------------------------------------------------------

_sshd_write_config = fix_sshd._write_config


def _big_sshd_config(*args: Any, **kwargs: Any) -> Path:
    """tests/fix_sshd.py's config with room for hundreds of concurrent logins."""
    path: Path = _sshd_write_config(*args, **kwargs)
    text = path.read_text()
    text = text.replace("MaxSessions 100", "MaxSessions 1000")
    text = text.replace("MaxStartups 200", "MaxStartups 1000")
    path.write_text(text)
    return path


@contextlib.contextmanager
def sshd() -> Iterator[SshTarget]:
    fix_sshd._write_config = _big_sshd_config
    try:
        with bench_ssh.sshd() as target:
            fix_sshd._write_config = _sshd_write_config
            yield target
    finally:
        fix_sshd._write_config = _sshd_write_config


postgres = contextlib.contextmanager(fix_postgres.postgres_server.__wrapped__)  # type: ignore[attr-defined]


def _raise_max_connections(server: PostgresServer, n: int) -> None:
    """ALTER SYSTEM max_connections, then restart the server (as its own account)."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET max_connections = {int(n)}")
    bindir = fix_postgres.find_postgres_bindir()
    assert bindir is not None
    base = server.datadir.parent
    res = subprocess.run(
        [
            str(bindir / "pg_ctl"),
            "restart",
            "-D",
            str(server.datadir),
            "-l",
            str(base / "postgres.log"),
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
        ],
        cwd=base,
        env=fix_postgres._server_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=90,
        **fix_postgres._run_as(fix_postgres._server_account()),
    )
    if res.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed: {res.stderr}{res.stdout}")


@contextlib.contextmanager
def relay(target: SshTarget, server: PostgresServer) -> Iterator[Relay]:
    """tests/fix_relay.start_relay with the PostgreSQL target of tests/fix_pg_relay.py
    and the product's default fsync interval (bench_ssh._product_config)."""
    workdir = Path(tempfile.mkdtemp(prefix="castgate-bench-load-"))
    try:
        fix_relay.write_config = bench_ssh._product_config
        try:
            r = start_relay(
                workdir,
                target,
                extra=PG_TARGETS.format(port=server.port),
                env={"APPDB_PASSWORD": APP_PASSWORD},
            )
        finally:
            fix_relay.write_config = bench_ssh._write_config_orig
        try:
            yield r
        finally:
            r.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- clients (in worker processes) -----------------------------------------------------


class _Stream(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.partial = b""
        self.lat_ms: list[float] = []
        self.lines = 0

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        now = time.time()
        if datatype:
            self.err += data
            return
        self.out += data
        *lines, self.partial = (self.partial + data).split(b"\n")
        for ln in lines:
            m = _LINE.search(ln)
            if m:
                self.lines += 1
                self.lat_ms.append((now - float(m.group(3))) * 1000)


def _command(session: int, lines: int) -> str:
    pan = PANS[session % len(PANS)]
    head, tail = pan[:6], pan[6:]  # never the whole number in the exec request
    return (
        "bash -c 'exec 3<> <(:); "
        f"for ((i=0; i<{lines}; i++)); do "
        f'printf "s=%d i=%d t=%s card=%s%s\\n" {session} $i $EPOCHREALTIME {head} {tail}; '
        f"read -t {LINE_PERIOD} -u 3 || :; done'"
    )


async def _ssh_one(spec: dict[str, Any], session: int, delay: float, direct: bool) -> dict:
    await asyncio.sleep(delay)
    res: dict[str, Any] = {"session": session, "direct": direct}
    lines = int(spec["secs"] / LINE_PERIOD)
    try:
        if direct:
            host, port, user, key, kh = (
                "127.0.0.1",
                spec["sshd_port"],
                spec["sshd_user"],
                spec["sshd_key"],
                spec["sshd_host_key"],
            )
        else:
            host, port, user, key, kh = (
                "127.0.0.1",
                spec["relay_port"],
                SSH_TARGET,
                spec["agent_key"],
                spec["relay_host_key"],
            )
        async with asyncssh.connect(
            host,
            port,
            username=user,
            client_keys=[key],
            known_hosts=([asyncssh.import_public_key(kh)], [], []),
            config=[],
            agent_path=None,
            encryption_algs=[CIPHER],
            connect_timeout=60,
        ) as conn:
            chan, s = await conn.create_session(_Stream, _command(session, lines), encoding=None)
            assert isinstance(s, _Stream)
            await asyncio.wait_for(chan.wait_closed(), spec["secs"] * 3 + 120)
            res.update(
                exit=chan.get_exit_status(),
                bytes=len(s.out),
                lines=s.lines,
                want_lines=lines,
                lat_ms=s.lat_ms,
                stderr=s.err.decode(errors="replace")[-300:],
            )
            if not direct:
                res["out"] = bytes(s.out).decode("utf-8", errors="surrogateescape")
                res["err"] = bytes(s.err).decode("utf-8", errors="surrogateescape")
            if chan.get_exit_status() != 0 or s.lines != lines:
                res["error"] = f"exit {chan.get_exit_status()}, {s.lines}/{lines} lines"
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


async def _pg_one(spec: dict[str, Any], conn_no: int, delay: float, direct: bool) -> dict:
    await asyncio.sleep(delay)
    res: dict[str, Any] = {"conn": conn_no, "direct": direct}
    dsn = spec["pg_direct_dsn"] if direct else spec["pg_relay_dsn"]
    lat: list[float] = []
    n = rows_with_pans = unmasked = 0
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            end = time.monotonic() + spec["secs"]
            while time.monotonic() < end:
                t0 = time.perf_counter()
                k = n % 3
                if k == 0:
                    cur = await conn.execute(
                        "SELECT id, pan, note FROM cards WHERE id <= %s", ((n // 3) % 4 + 1,)
                    )
                    for _id, pan, note in await cur.fetchall():
                        rows_with_pans += 1
                        if any(p in pan or p in note for p in PANS):
                            unmasked += 1
                elif k == 1:
                    cur = await conn.execute("SELECT count(*) FROM victims")
                    await cur.fetchall()
                else:
                    cur = await conn.execute("SELECT %s::int + 1", (n,))
                    await cur.fetchall()
                lat.append((time.perf_counter() - t0) * 1000)
                n += 1
                await asyncio.sleep(spec["pg_interval"])
        res.update(queries=n, card_rows=rows_with_pans, lat_ms=lat)
        if not direct and unmasked:
            res["error"] = f"{unmasked} rows with a raw card number through the relay"
    except Exception as exc:
        res.update(queries=n, lat_ms=lat, error=f"{type(exc).__name__}: {exc}")
    return res


async def _worker_main(spec: dict[str, Any]) -> list[dict[str, Any]]:
    ramp = spec["ramp"]
    jobs = []
    for i, (kind, no, direct) in enumerate(spec["jobs"]):
        delay = ramp * i / max(1, len(spec["jobs"]))
        if kind == "ssh":
            jobs.append(_ssh_one(spec, no, delay, direct))
        else:
            jobs.append(_pg_one(spec, no, delay, direct))
    return list(await asyncio.gather(*jobs))


def _worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return asyncio.run(_worker_main(spec))


# -- checks ----------------------------------------------------------------------------


def _read_cast(path: Path) -> tuple[dict[str, Any], str, int]:
    """Header, concatenated ``o`` data and event count of a cast."""
    lines = path.read_bytes().split(b"\n")
    header = json.loads(lines[0])
    out: list[str] = []
    events = 0
    for raw in lines[1:]:
        if not raw.strip():
            continue
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(ev, list):
            continue
        events += 1
        if len(ev) >= 3 and ev[1] == "o":
            out.append(ev[2])
    return header, "".join(out), events


def _wait_sealed(r: Relay, want: int, timeout: float) -> list[Path]:
    rec = r.recordings()
    deadline = time.monotonic() + timeout
    casts: list[Path] = []
    while time.monotonic() < deadline:
        casts = sorted(rec.glob("*.cast"))
        sealed = [c for c in casts if c.with_name(c.name + ".manifest.json").exists()]
        if len(casts) >= want and len(sealed) == len(casts):
            break
        time.sleep(0.25)
    return casts


def check(r: Relay, results: list[dict[str, Any]], want: int, timeout: float) -> dict[str, Any]:
    casts = _wait_sealed(r, want, timeout)
    pub = load_public(r.workdir / "data" / "keys" / "signing_ed25519.pub.pem")
    verdicts: dict[str, int] = {}
    bad: list[str] = []
    raw_pan_hits: list[str] = []
    luhn_runs = 0
    events = 0
    by_session: dict[int, str] = {}
    for c in casts:
        rep = verify_cast(c, pub)
        verdicts[rep.verdict.value] = verdicts.get(rep.verdict.value, 0) + 1
        if rep.verdict is not Verdict.INTACT:
            bad.append(f"{c.name}: {rep.verdict.value} {getattr(rep, 'detail', '')}")
        text = c.read_text(errors="replace")
        raw_pan_hits += [f"{c.name}: {p}" for p in PANS if p in text]
        luhn_runs += sum(luhn_valid(m) for m in _DIGITS.findall(text))
        _header, out, n = _read_cast(c)
        events += n
        m = _LINE.search(out.encode("utf-8", errors="surrogateescape"))
        if m:
            by_session[int(m.group(1))] = out
    cli = subprocess.run(
        [CASTGATE, "verify", str(r.recordings()), "-c", str(r.config)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    mismatched: list[str] = []
    for res in results:
        if "session" not in res or res["direct"] or "out" not in res:
            continue
        cast_out = by_session.get(res["session"])
        got, err = res.pop("out"), res.pop("err")
        # the cast's "o" events carry stdout and stderr (e.g. the target's shell startup
        # complaining), interleaved: the stdout, with the stderr taken out once, must match
        if err and cast_out is not None and err in cast_out:
            cast_out = cast_out.replace(err, "", 1)
        if cast_out is None:
            mismatched.append(f"s={res['session']}: no cast")
        elif cast_out != got:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, cast_out, strict=False)) if a != b),
                min(len(got), len(cast_out)),
            )
            mismatched.append(
                f"s={res['session']}: agent {len(got.encode(errors='surrogateescape'))} B, "
                f"cast {len(cast_out.encode(errors='surrogateescape'))} B, first difference "
                f"at char {at}: agent {got[max(0, at - 60) : at + 80]!r} "
                f"cast {cast_out[max(0, at - 60) : at + 80]!r}"
            )
            if len(mismatched) <= 3:
                for what, text in (("agent", got), ("cast", cast_out)):
                    Path(f"/tmp/bench_load_mismatch_s{res['session']}.{what}").write_text(
                        text, errors="surrogateescape"
                    )
    return {
        "casts": len(casts),
        "casts_expected": want,
        "events": events,
        "verify_cast": verdicts,
        "verify_failures": bad[:10],
        "castgate_verify_rc": cli.returncode,
        "castgate_verify_tail": (cli.stdout + cli.stderr).strip().splitlines()[-3:],
        "ssh_bytes_mismatch": len(mismatched),
        "ssh_bytes_mismatch_examples": mismatched[:5],
        "raw_pan_hits": raw_pan_hits[:10],
        "luhn_valid_digit_runs": luhn_runs,
    }


# -- main ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python -m bench.bench_load", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "relay_config": "tests/fix_relay.py + PG_TARGETS of tests/fix_pg_relay.py, masking on, "
        "recording on (input=commands), fsync_interval default (1.0)",
        "ssh_sessions": args.ssh,
        "pg_connections": args.pg,
        "secs": args.secs,
    }
    with sshd() as target, postgres() as server:
        _raise_max_connections(server, args.pg + args.baseline + 50)
        direct_dsn = _prepare_app_db(server)
        with relay(target, server) as r:
            pid = r.proc.pid
            time.sleep(1.0)
            rss_before = _rss_kb(pid)
            # SSH and PostgreSQL clients interleaved, so both kinds open throughout the ramp
            jobs: list[tuple[str, int, bool]] = []
            for i in range(max(args.ssh, args.pg)):
                jobs += [("ssh", i, False)] if i < args.ssh else []
                jobs += [("pg", i, False)] if i < args.pg else []
            jobs += [("ssh", 100_000 + i, True) for i in range(args.baseline if args.ssh else 0)]
            jobs += [("pg", 100_000 + i, True) for i in range(args.baseline if args.pg else 0)]
            base_spec = {
                "secs": args.secs,
                "ramp": args.ramp,
                "pg_interval": args.pg_interval,
                "relay_port": r.port,
                "relay_host_key": r.host_key_line,
                "agent_key": str(r.agent_key),
                "sshd_port": target.port,
                "sshd_user": target.user,
                "sshd_key": str(target.client_key),
                "sshd_host_key": target.host_key_line,
                "pg_relay_dsn": r.pg_dsn().replace(
                    "connect_timeout=10", f"connect_timeout={args.pg_connect_timeout}"
                ),
                "pg_direct_dsn": direct_dsn + " sslmode=disable",
            }
            w = max(1, args.workers)
            specs = [{**base_spec, "jobs": jobs[i::w]} for i in range(w)]
            _say(f"relay pid {pid}, RSS {rss_before} kB; {len(jobs)} clients in {w} workers")
            t0 = time.monotonic()
            peak = rss_before
            cpu0 = _cpu(pid)
            results: list[dict[str, Any]] = []
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(w, mp_context=ctx) as pool:
                futs = [pool.submit(_worker, s) for s in specs]
                while not all(f.done() for f in futs):
                    peak = max(peak, _rss_kb(pid))
                    time.sleep(0.5)
                for f in futs:
                    results += f.result()
            wall = time.monotonic() - t0
            cpu = _cpu(pid) - cpu0
            _say(f"clients done in {wall:.1f} s; waiting for the seals")
            want = args.ssh + args.pg
            checks = check(r, results, want, timeout=300)
            time.sleep(1.0)
            rss_after = _rss_kb(pid)
            relay_alive = r.proc.poll() is None
            if args.relay_log:
                with open(args.relay_log, "w") as fh:
                    fh.writelines(json.dumps(e, default=str) + "\n" for e in r.logs)
            problems = [
                e
                for e in r.logs
                if e.get("level") in ("error", "critical", "warning") or "raw" in e
            ]
    relay_res = [x for x in results if not x["direct"]]
    errors = [x for x in relay_res if "error" in x]
    direct_errors = [x for x in results if x["direct"] and "error" in x]

    def lat(kind: str, direct: bool) -> list[float]:
        return [v for x in results if x["direct"] == direct and kind in x for v in x["lat_ms"]]

    lat_out: dict[str, Any] = {}
    for kind, key in (("ssh_line", "session"), ("pg_query", "conn")):
        rel, dire = _pct(lat(key, False)), _pct(lat(key, True))
        lat_out[kind] = {"relay_ms": rel, "direct_ms": dire}
        if rel and dire:
            lat_out[kind]["added_p99_ms"] = round(rel["p99"] - dire["p99"], 2)
            lat_out[kind]["added_p50_ms"] = round(rel["p50"] - dire["p50"], 2)
    out.update(
        {
            "wall_s": round(wall, 1),
            "sessions_ok": {
                "ssh": sum(1 for x in relay_res if "session" in x and "error" not in x),
                "pg": sum(1 for x in relay_res if "conn" in x and "error" not in x),
            },
            "session_errors": len(errors),
            "session_error_kinds": _kinds(errors),
            "session_error_examples": [
                {k: v for k, v in x.items() if k != "lat_ms"} for x in errors[:5]
            ],
            "baseline_errors": [x.get("error") for x in direct_errors[:3]],
            "ssh_bytes_received": sum(x.get("bytes", 0) for x in relay_res if "session" in x),
            "ssh_sessions_with_stderr": sum(1 for x in relay_res if x.get("stderr")),
            "pg_queries": sum(x.get("queries", 0) for x in relay_res if "conn" in x),
            "checks": checks,
            "events_per_s": round(checks["events"] / wall, 1),
            "latency": lat_out,
            "relay_cpu_pct": round(100 * cpu / wall, 1),
            "relay_rss_kb": {"before": rss_before, "peak": peak, "after": rss_after},
            "rss_per_session_kb": round((peak - rss_before) / max(1, want), 1),
            "relay_alive_after": relay_alive,
            "relay_log_problems": len(problems),
            "relay_log_examples": problems[:8],
        }
    )
    out["pass"] = (
        not errors
        and checks["casts"] == want
        and checks["verify_cast"].get("intact", 0) == want
        and checks["castgate_verify_rc"] == 0
        and checks["ssh_bytes_mismatch"] == 0
        and not checks["raw_pan_hits"]
        and relay_alive
    )
    return out


def _kinds(errors: list[dict[str, Any]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for x in errors:
        key = ("ssh " if "session" in x else "pg ") + re.sub(r"\d+", "N", str(x["error"]))[:80]
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ssh", type=int, default=200, help="concurrent SSH sessions")
    ap.add_argument("--pg", type=int, default=200, help="concurrent PostgreSQL connections")
    ap.add_argument("--secs", type=float, default=60, help="seconds each client streams")
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--ramp", type=float, default=30, help="seconds to open all clients")
    ap.add_argument("--pg-interval", type=float, default=0.05, help="pause between queries")
    ap.add_argument("--baseline", type=int, default=5, help="direct clients of each kind")
    ap.add_argument("--pg-connect-timeout", type=int, default=60, help="libpq, seconds")
    ap.add_argument("--relay-log", metavar="FILE", help="write the relay's log lines here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(json.dumps(run(args), indent=2, default=str))


if __name__ == "__main__":
    main()
