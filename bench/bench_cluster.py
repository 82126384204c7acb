"""Several relays sharing one PostgreSQL store (issue 8): approval latency across relays
and the sessions per minute two relays sustain against one, on this machine.

Setup: the sshd of tests/fix_sshd.py (room for many logins, as bench_load), a
PostgreSQL server of tests/fix_postgres.py holding the shared store, and two real
``castgate relay`` processes (tests/fix_cluster.start_deployment: separate data dirs,
product fsync interval, heartbeat 5 s, node_timeout 20 s, peer secret).

- approve: the OpenSSH client runs ``systemctl restart app 2>/dev/null; echo started``
  through relay b, held by the rule ``restart-needs-approval``; once the agent's stderr
  shows ``approval #N required`` this process POSTs the approval to relay a (aiohttp)
  and times from just before the POST to the agent's first stdout byte (bench_api's
  measurement, one held command at a time, each on its own ssh connection). A listener
  in this process also notes when each decision's NOTIFY arrives, after the decision's
  time in the store (relay a's clock, this machine's). Baseline in the same run: the
  same series approved on b itself (no relay-to-relay hop).
- throughput: short SSH exec sessions (asyncssh client: connect, ``echo ok``, close) in
  two client processes of ``--clients`` / 2 concurrent loops each, for ``--seconds``;
  first both processes against relay a (b idle), then one against a and one against b.
  Sessions completed per minute (exit 0 and ``ok`` read), failures, and CPU seconds of
  each relay process. Baseline in the same run: the same clients straight to the sshd. Every process here (clients, sshd and its shells, PostgreSQL, the
  relays) shares this machine's cores.

Run: .venv/bin/python -m bench.bench_cluster [--approvals 100] [--clients 16]
     [--seconds 30] [--skip approve,throughput]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import psycopg

import tests.fix_relay as fix_relay
from bench import bench_ssh
from bench.bench_api import _ms, _one_approval, _ssh
from bench.bench_load import postgres, sshd
from recorder.store import APPROVALS_CHANNEL
from tests.fix_cluster import Deployment, metric, start_deployment
from tests.fix_relay import Relay
from tests.fix_sshd import SshTarget

HELD = "systemctl restart app 2>/dev/null; echo started"
CIPHER = "aes128-gcm@openssh.com"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- approval latency ---------------------------------------------------------------------


async def _approvals(post_to: Relay, held_on: Relay, n: int) -> dict[str, dict[str, float]]:
    first: list[float] = []
    post: list[float] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            s = await _one_approval(post_to, http, _ssh(held_on, HELD), {0})
            first.append(s["to_first_byte"])
            post.append(s["post_response"])
    return {"approve_to_first_byte_ms": _ms(first), "approve_post_response_ms": _ms(post)}


class _Listener:
    """LISTENs like a relay does and notes when each approval's NOTIFY arrives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.arrived: dict[int, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("bench listener did not connect")

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"LISTEN {APPROVALS_CHANNEL}")
            self._ready.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.5):
                    self.arrived[int(note.payload)] = time.time()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _notify_latency(d: Deployment, arrived: dict[int, float]) -> dict[str, float]:
    """Decision written (its ``at``, relay a's clock: this machine's) to NOTIFY heard."""
    store = d.store()
    try:
        lags = []
        for aid, when in arrived.items():
            row = store.get_approval(aid)
            if row and row["decisions"]:
                lags.append(when - row["decisions"][-1]["at"].timestamp())
    finally:
        store.close()
    return _ms(lags)


def approvals(d: Deployment, n: int) -> dict[str, Any]:
    """Held on b: approved through a, then (baseline) through b itself."""
    a, b = d["a"], d["b"]
    out: dict[str, Any] = {"command": HELD, "n": n}
    before = metric(b, "castgate_approval_notifications_total")
    listener = _Listener(d.store_url)
    try:
        out["approve_on_a_held_on_b"] = asyncio.run(_approvals(a, b, n))
    finally:
        listener.stop()
    out["notifications_received_by_b"] = metric(b, "castgate_approval_notifications_total") - before
    out["decision_written_to_notify_heard_ms"] = _notify_latency(d, listener.arrived)
    out["approve_on_b_held_on_b"] = asyncio.run(_approvals(b, b, n))
    return out


# -- sessions per minute ----------------------------------------------------------------


async def _client_loop(spec: dict[str, Any], stop_at: float, out: dict[str, Any]) -> None:
    key = asyncssh.read_private_key(spec["key"])
    pinned: list[asyncssh.SSHKey] = [asyncssh.import_public_key(spec["host_key"])]
    known: tuple[list[asyncssh.SSHKey], ...] = (pinned, [], [])
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        try:
            async with asyncssh.connect(
                "127.0.0.1",
                spec["port"],
                username=spec["user"],
                client_keys=[key],
                known_hosts=known,
                encryption_algs=[CIPHER],
                connect_timeout=30,
            ) as conn:
                res = await conn.run("echo ok", check=False, timeout=60)
            if res.exit_status == 0 and res.stdout == "ok\n":
                out["ok"] += 1
                out["latency"].append(time.perf_counter() - t0)
            else:
                out["failed"] += 1
                out["errors"].append(f"exit {res.exit_status}")
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            out["failed"] += 1
            out["errors"].append(type(exc).__name__ + ": " + str(exc)[:100])


async def _clients_main(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": 0, "failed": 0, "errors": [], "latency": []}
    stop_at = time.monotonic() + spec["seconds"]
    await asyncio.gather(*(_client_loop(spec, stop_at, out) for _ in range(spec["clients"])))
    return out


def _client_spec(r: Relay, clients: int, seconds: float) -> dict[str, Any]:
    return {
        "port": r.port,
        "user": "web",
        "key": str(r.agent_key),
        "host_key": r.host_key_line,
        "clients": clients,
        "seconds": seconds,
    }


def _direct_spec(t: SshTarget, clients: int, seconds: float) -> dict[str, Any]:
    return {
        "port": t.port,
        "user": t.user,
        "key": str(t.client_key),
        "host_key": t.host_key_line,
        "clients": clients,
        "seconds": seconds,
    }


def _run_clients(specs: list[dict[str, Any]], d: Deployment) -> dict[str, Any]:
    """One client process per spec, all at once; their results and the relays' CPU."""
    cpu0 = {n: _cpu_s(r.proc.pid) for n, r in d.relays.items()}
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.bench_cluster", "--clients-child", json.dumps(spec)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    results = [json.loads(p.communicate(timeout=specs[0]["seconds"] + 180)[0]) for p in procs]
    wall = time.monotonic() - t0
    cpu = {n: round(_cpu_s(r.proc.pid) - cpu0[n], 1) for n, r in d.relays.items()}
    ok = sum(r["ok"] for r in results)
    latency = [x for r in results for x in r["latency"]]
    errors: dict[str, int] = {}
    for r in results:
        for e in r["errors"]:
            errors[e] = errors.get(e, 0) + 1
    return {
        "sessions_ok": ok,
        "sessions_failed": sum(r["failed"] for r in results),
        "wall_s": round(wall, 1),
        "sessions_per_minute": round(ok / specs[0]["seconds"] * 60, 1),
        "session_ms": _ms(latency) if latency else None,
        "relay_cpu_s": cpu,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


def throughput(d: Deployment, target: SshTarget, clients: int, seconds: float) -> dict[str, Any]:
    """All clients against a, then half against a and half against b, then (the
    machine's ceiling) all straight to the target's sshd."""
    a, b = d["a"], d["b"]
    half = clients // 2
    _say(f"throughput: {clients} clients against a for {seconds} s")
    one = _run_clients([_client_spec(a, half, seconds), _client_spec(a, half, seconds)], d)
    _say(f"throughput: {half} against a + {half} against b for {seconds} s")
    two = _run_clients([_client_spec(a, half, seconds), _client_spec(b, half, seconds)], d)
    _say(f"throughput: {clients} clients straight to the target sshd for {seconds} s")
    direct = _run_clients(
        [_direct_spec(target, half, seconds), _direct_spec(target, half, seconds)], d
    )
    return {
        "clients": clients,
        "session": "asyncssh connect (aes128-gcm), exec 'echo ok', close",
        "one_relay": one,
        "two_relays": two,
        "direct_to_target_baseline": direct,
        "ratio_two_over_one": round(two["sessions_per_minute"] / one["sessions_per_minute"], 2)
        if one["sessions_per_minute"]
        else None,
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--clients-child":
        print(json.dumps(asyncio.run(_clients_main(json.loads(sys.argv[2])))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--approvals", type=int, default=100)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--skip", default="", help="comma list of approve,throughput to skip")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "relays": "2 castgate relay processes, one PostgreSQL store, product fsync 1.0 s, "
        "heartbeat 5 s, node_timeout 20 s",
    }
    workdir = Path(tempfile.mkdtemp(prefix="castgate-bench-cluster-"))
    server_cm = postgres()
    try:
        with sshd() as target, server_cm as server:
            url = server.create_database(f"bench_{uuid.uuid4().hex[:8]}")
            d = _deploy(workdir, target, url)
            try:
                if "approve" not in skip:
                    _say(f"approvals: {args.approvals} held on b, approved on a, then on b")
                    out["approve"] = approvals(d, args.approvals)
                    out["approve"]["target_p99_ms"] = 500
                if "throughput" not in skip:
                    out["throughput"] = throughput(d, target, args.clients, args.seconds)
            finally:
                d.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out, indent=2))


def _deploy(workdir: Path, target: SshTarget, url: str) -> Deployment:
    fix_relay.write_config = bench_ssh._product_config
    try:
        return start_deployment(workdir, target, url, ("a", "b"), heartbeat=5, node_timeout=20)
    finally:
        fix_relay.write_config = bench_ssh._write_config_orig


if __name__ == "__main__":
    main()
