"""Control API and approvals (issue 5): approval latency, live watch latency, and the
cost of watchers to a busy session, against a real ``castgate relay`` in front of a real
sshd on this machine.

- approve: the real OpenSSH ``ssh`` client runs ``systemctl restart app 2>/dev/null;
  echo started`` through the relay; the rule ``restart-needs-approval`` holds it. Once
  the agent's stderr shows ``approval #N required``, this process POSTs
  ``/api/v1/approvals/N/approve`` (alice, aiohttp client) and times from just before the
  POST to the first stdout byte at the agent (``started``). One approval at a time,
  each on its own ssh connection (the issue's case: the relay connects to the target
  only once the command may run), then a shorter series through one multiplexed
  OpenSSH connection (ControlMaster; the relay's target connection is already open).
  Baseline, same run: asyncssh straight to the target sshd, connect + exec of the same
  command to its first byte (what the relay has to do after the approval).
- watch: an agent session runs ``python3 -c`` printing ``time.time()`` (as a float hex
  literal, so no digit run can look like a card number to the masker) every 10 ms; one
  WebSocket watcher on ``/api/v1/sessions/{id}/live`` computes, for every line, receive
  time - embedded time (same machine, same clock). It also splits that at the relay's
  own event timestamp ``t``: target -> relay publish, relay publish -> watcher.
- fanout: the ssh client drains ``: busy-N; sleep 1.5; <workload>`` through the relay
  (count and CRC-32 checked); MB/s from first byte to EOF with 0 watchers and with 20
  WebSocket watchers, all connected (their first ``screen`` message received) during the
  ``sleep``, before the first byte. The watchers run in a separate process (one asyncio
  loop, aiohttp, no compression offered) and read every message until the session's
  ``end``; each reports the bytes it received and whether the relay dropped it as too
  slow. Runs alternate between the two cases. CPU seconds of the relay process (all
  threads, /proc) and of the watchers' process are reported per run: everything shares
  this machine's cores.

Run: .venv/bin/python -m bench.bench_api [--approvals 100] [--watch-s 4] [--mb 100]
     [--runs 3] [--watchers 20] [--workload digits|zeros] [--approvals-mux 30]
     [--skip approve,watch,fanout]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_ssh import _expected, _wait_sealed, relay, sshd
from tests.fix_relay import TOKENS, Relay

TOKEN = TOKENS["alice"]  # approver + auditor
WORKLOADS = {
    "zeros": "head -c {mb}M /dev/zero",
    "digits": "seq 1 1000000000 | head -c {mb}M",
}
_PIPE_SIZE = 1 << 20
_READ = 1 << 20


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def _ms(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    out = {f"p{q}": round(_pct(values, q) * 1000, 2) for q in qs}
    out["max"] = round(max(values) * 1000, 2)
    out["n"] = len(values)
    return out


def _get(r: Relay, path: str) -> Any:
    url = r.api + path  # always http://127.0.0.1:PORT/...
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return json.loads(resp.read())


def _find_live(r: Relay, marker: str, timeout: float = 15) -> str:
    """The id of the live session whose title contains ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for row in _get(r, "/api/v1/sessions?live=true&limit=50")["sessions"]:
            if marker in (row.get("title") or ""):
                return str(row["id"])
        time.sleep(0.02)
    raise RuntimeError(f"no live session with {marker!r}")


def _ssh(r: Relay, command: str) -> list[str]:
    return ["ssh", "-F", "none", *r.ssh_args(), "web@127.0.0.1", command]


# -- approve -> held command starts ----------------------------------------------------


async def _one_approval(
    r: Relay, http: aiohttp.ClientSession, argv: list[str], exits: set[int]
) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        err = b""
        m = None
        async with asyncio.timeout(30):
            while m is None:
                chunk = await proc.stderr.read(4096)
                if not chunk:
                    raise RuntimeError(f"agent ended before the hold: {err!r}")
                err += chunk
                m = re.search(rb"approval #(\d+) required", err)
        aid = int(m.group(1))
        first = asyncio.ensure_future(proc.stdout.read(1))
        await asyncio.sleep(0.005)  # the read is waiting before we decide
        t0 = time.perf_counter()
        async with http.post(
            f"{r.api}/api/v1/approvals/{aid}/approve",
            json={"reason": "bench"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp:
            body = await resp.json()
            t_resp = time.perf_counter()
        if resp.status != 200 or body.get("status") != "approved":
            raise RuntimeError(f"approve #{aid}: {resp.status} {body}")
        async with asyncio.timeout(30):
            data = await first
        t_first = time.perf_counter()
        rest = await proc.stdout.read()
        if data + rest != b"started\n":
            raise RuntimeError(f"unexpected agent output {data + rest!r}")
        rc = await proc.wait()
        if rc not in exits:
            raise RuntimeError(f"agent exit {rc}")
        return {"to_first_byte": t_first - t0, "post_response": t_resp - t0}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


HELD = "systemctl restart app 2>/dev/null; echo started"


async def _series(
    r: Relay, n: int, argv: list[str], exits: frozenset[int] = frozenset({0})
) -> dict[str, dict[str, float]]:
    first: list[float] = []
    post: list[float] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            s = await _one_approval(r, http, argv, set(exits))
            first.append(s["to_first_byte"])
            post.append(s["post_response"])
    return {"approve_to_first_byte_ms": _ms(first), "approve_post_response_ms": _ms(post)}


async def approvals(r: Relay, n: int, n_mux: int) -> dict[str, Any]:
    """Approve ``n`` held commands one after another, each its own ssh connection (so
    the relay connects to the target after the approval); then ``n_mux`` more through
    one multiplexed OpenSSH connection (ControlMaster), whose target connection the relay
    already holds: the difference is the relay's connection to the target."""
    out: dict[str, Any] = {
        "agent": "OpenSSH ssh client, one held command at a time",
        "command": HELD,
        "fresh_connection": await _series(r, n, _ssh(r, HELD)),
    }
    if n_mux:
        sock = r.workdir / "mux.sock"
        master = subprocess.Popen(
            [
                "ssh",
                "-F",
                "none",
                *r.ssh_args(),
                "-o",
                "ControlMaster=yes",
                "-o",
                f"ControlPath={sock}",
                "-N",
                "web@127.0.0.1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while not sock.exists():
                if time.monotonic() > deadline or master.poll() is not None:
                    raise RuntimeError("ssh ControlMaster did not start")
                await asyncio.sleep(0.02)
            argv = [
                "ssh",
                "-F",
                "none",
                "-o",
                f"ControlPath={sock}",
                "-o",
                "ControlMaster=no",
                "web@127.0.0.1",
                HELD,
            ]
            # Through the relay, OpenSSH's multiplexed sessions often end with 255 (no
            # exit-status reaches the master), even unheld ones: the output is checked.
            exits = frozenset({0, 255})
            await _series(r, 1, argv, exits)  # opens the relay's connection to the target
            out["multiplexed_connection"] = await _series(r, n_mux, argv, exits)
        finally:
            master.terminate()
            master.wait(10)
    out["direct_to_target_baseline"] = await _target_baseline(r, 30)
    return out


async def _target_baseline(r: Relay, n: int) -> dict[str, dict[str, float]]:
    """The floor: what the relay must do after an approval, measured directly against
    the target (asyncssh, its pinned host key, key file and ciphers as relay/ssh_relay.py
    uses them): connect, then exec the command and wait for its first byte."""
    import asyncssh

    from relay.ssh_relay import ENCRYPTION

    t = r.target
    connect: list[float] = []
    exec_first: list[float] = []
    both: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn = await asyncssh.connect(
            t.host,
            t.port,
            username=t.user,
            known_hosts=([asyncssh.import_public_key(t.host_key_line)], [], []),
            client_keys=[str(t.client_key)],
            config=[],
            agent_path=None,
            encryption_algs=ENCRYPTION,
        )
        t1 = time.perf_counter()
        proc = await conn.create_process(HELD, encoding=None)
        first = await proc.stdout.read(1)
        t2 = time.perf_counter()
        if first != b"s":
            raise RuntimeError(f"direct exec: {first!r}")
        await proc.wait()
        conn.close()
        await conn.wait_closed()
        connect.append(t1 - t0)
        exec_first.append(t2 - t1)
        both.append(t2 - t0)
    return {
        "connect_ms": _ms(connect, (50, 95)),
        "exec_to_first_byte_ms": _ms(exec_first, (50, 95)),
        "connect_and_exec_to_first_byte_ms": _ms(both, (50, 95, 99)),
    }


# -- live watch latency ----------------------------------------------------------------


async def watch_latency(r: Relay, seconds: float) -> dict[str, Any]:
    """One WebSocket watcher on a session printing timestamps every 10 ms."""
    lines = int(seconds * 100)
    command = (
        'python3 -c \'import time; [print("watchlat", time.time().hex(), flush=True)'
        f" or time.sleep(0.01) for _ in range({lines})]'"
    )
    agent = subprocess.Popen(
        _ssh(r, command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    total: list[float] = []
    to_relay: list[float] = []
    to_watcher: list[float] = []
    try:
        sid = await asyncio.to_thread(_find_live, r, "watchlat")
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"{r.api}/api/v1/sessions/{sid}/live",
                headers={"Authorization": f"Bearer {TOKEN}"},
                max_msg_size=0,
            ) as ws,
        ):
            joined = time.time()
            carry = ""
            async for msg in ws:
                now = time.time()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                ev = json.loads(msg.data)
                if ev["type"] == "end":
                    break
                if ev["type"] != "o":
                    continue
                carry += ev["data"]
                *complete, carry = carry.split("\n")
                for line in complete:
                    parts = line.strip().split()
                    if len(parts) != 2 or parts[0] != "watchlat":
                        continue
                    ts = float.fromhex(parts[1])
                    if ts < joined + 0.1:  # skip the join itself
                        continue
                    total.append(now - ts)
                    to_relay.append(ev["t"] - ts)
                    to_watcher.append(now - ev["t"])
        agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    if len(total) < lines // 2:
        raise RuntimeError(f"only {len(total)} of {lines} lines measured")
    return {
        "agent": f"OpenSSH ssh client running python3 printing time.time() every 10 ms, {lines} lines",
        "watcher": "aiohttp WebSocket client on /api/v1/sessions/{id}/live",
        "output_to_watcher_ms": _ms(total),
        "output_to_relay_publish_ms": _ms(to_relay),
        "relay_publish_to_watcher_ms": _ms(to_watcher),
    }


# -- throughput with watchers ----------------------------------------------------------


async def _watchers_main(url: str, n: int) -> None:
    """Child process: ``n`` WebSocket watchers; prints ``ready`` once every one got its
    screen, then one JSON line of per-watcher results when the session ended."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ready = 0
    results: list[dict[str, Any]] = []

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal ready
        got = msgs = screens = 0
        dropped = False
        end = ""
        async with http.ws_connect(url, headers=headers, max_msg_size=0) as ws:
            first = await ws.receive()
            if first.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"watcher: {first}")
            ready += 1
            if ready == n:
                print("ready", flush=True)
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                msgs += 1
                got += len(msg.data)
                head = msg.data[:16].replace(" ", "")
                if head.startswith('{"type":"screen"'):
                    screens += 1  # the relay skipped output past its watcher rate
                elif head.startswith('{"type":"end"'):
                    end = json.loads(msg.data)["data"]
                    dropped = "dropped" in end
                    break
        results.append(
            {"messages": msgs, "chars": got, "dropped": dropped, "end": end, "screens": screens}
        )

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(one(http) for _ in range(n)))
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"watchers": results, "cpu_s": use.ru_utime + use.ru_stime}), flush=True)


def _drain(argv: list[str], size: int, crc: int, out: dict[str, Any]) -> None:
    """Run the ssh client and drain its stdout; absolute monotonic first byte and EOF."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        n = got = 0
        t_first = 0.0
        while chunk := os.read(fd, _READ):
            if not n:
                t_first = time.monotonic()
            n += len(chunk)
            got = zlib.crc32(chunk, got)
        t_end = time.monotonic()
        proc.stdout.close()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0 or n != size or got != crc:
        out["error"] = f"exit {rc}, {n} bytes (want {size}), crc {got:#x} (want {crc:#x})"
    out.update(first=t_first, end=t_end)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fanout_run(
    r: Relay, workload: str, size: int, crc: int, watchers: int, run: int
) -> dict[str, Any]:
    marker = f"busy-{run}-{watchers}"
    command = f": {marker}; sleep 4; {workload}"
    res: dict[str, Any] = {}
    relay_cpu = _cpu_s(r.proc.pid)
    drain = threading.Thread(target=_drain, args=(_ssh(r, command), size, crc, res))
    drain.start()
    child: subprocess.Popen[str] | None = None
    ready_at = None
    try:
        if watchers:
            sid = _find_live(r, marker)
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.bench_api",
                    "--watchers-child",
                    f"{r.api}/api/v1/sessions/{sid}/live",
                    str(watchers),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("watchers did not connect")
            ready_at = time.monotonic()
        drain.join(300)
        if "error" in res:
            raise RuntimeError(f"{command}: {res['error']}")
        if ready_at is not None and ready_at > res["first"]:
            raise RuntimeError("watchers connected after the first byte: raise the sleep")
        out: dict[str, Any] = {
            "MBps": size / (res["end"] - res["first"]) / 1e6,
            "relay_cpu_s": _cpu_s(r.proc.pid) - relay_cpu,
        }
        if child is not None:
            assert child.stdout is not None
            line = child.stdout.readline()
            child.wait(60)
            report = json.loads(line)
            per = report["watchers"]
            out["watchers"] = {
                "cpu_s": round(report["cpu_s"], 2),
                "connected": len(per),
                "dropped_as_too_slow": sum(w["dropped"] for w in per),
                "received_chars_min": min(w["chars"] for w in per),
                "received_chars_max": max(w["chars"] for w in per),
                "screens_max": max(w["screens"] for w in per),
                "ended_normally": sum(1 for w in per if w["end"] and not w["dropped"]),
                "messages_max": max(w["messages"] for w in per),
            }
        return out
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        drain.join(60)
        _wait_sealed(r)


def _clear_recordings(r: Relay, timeout: float = 20) -> list[dict[str, Any]]:
    """Wait until every recording so far is sealed (has its manifest), then drop the
    sealed ones; returns the sessions still unsealed after ``timeout`` (relay findings)."""
    deadline = time.monotonic() + timeout
    rec = r.recordings()

    def unsealed() -> list[Path]:
        return [
            c for c in rec.glob("*.cast") if not c.with_name(c.name + ".manifest.json").exists()
        ]

    while unsealed() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = unsealed()
    for f in rec.glob("*"):
        if not any(f.name.startswith(c.name) for c in left):
            f.unlink(missing_ok=True)
    rows = []
    for c in left:
        sid = c.name.removesuffix(".cast")
        session = _get(r, f"/api/v1/sessions/{sid}")["session"]
        rows.append({k: session.get(k) for k in ("id", "status", "title", "ended_at")})
    return rows


def fanout(r: Relay, mb: int, runs: int, watchers: int, workload: str) -> dict[str, Any]:
    """MB/s of one busy session with 0 and with ``watchers`` watchers, alternating."""
    command = WORKLOADS[workload].format(mb=mb)
    size, crc = _expected(command)
    res: dict[int, list[dict[str, Any]]] = {0: [], watchers: []}
    unsealed = _clear_recordings(r)
    for i in range(runs):
        order = [0, watchers] if i % 2 == 0 else [watchers, 0]
        for n in order:
            res[n].append(_fanout_run(r, command, size, crc, n, i))
    base = statistics.median(x["MBps"] for x in res[0])
    loaded = statistics.median(x["MBps"] for x in res[watchers])
    return {
        "command": command,
        "bytes": size,
        "MBps_0_watchers": {
            "median": round(base, 1),
            "runs": [round(x["MBps"], 1) for x in res[0]],
            "relay_cpu_s": [round(x["relay_cpu_s"], 2) for x in res[0]],
        },
        f"MBps_{watchers}_watchers": {
            "median": round(loaded, 1),
            "runs": [round(x["MBps"], 1) for x in res[watchers]],
            "relay_cpu_s": [round(x["relay_cpu_s"], 2) for x in res[watchers]],
        },
        "ratio": round(loaded / base, 3),
        "watchers_per_run": [x["watchers"] for x in res[watchers]],
        "unsealed_sessions_before": unsealed,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--watchers-child":
        asyncio.run(_watchers_main(sys.argv[2], int(sys.argv[3])))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--approvals", type=int, default=100)
    ap.add_argument("--approvals-mux", type=int, default=30, help="0 to skip")
    ap.add_argument("--watch-s", type=float, default=4.0, help="seconds of timestamped output")
    ap.add_argument("--mb", type=int, default=100, help="MiB per busy session")
    ap.add_argument("--runs", type=int, default=3, help="busy sessions per watcher count")
    ap.add_argument("--watchers", type=int, default=20)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    ap.add_argument("--skip", default="", help="comma list of approve,watch,fanout to skip")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "relay_config": "tests/fix_relay.py identities, targets and rules; masking on, "
        "recording on (input=commands), fsync_interval 1.0",
    }
    with sshd() as target, relay(target) as r:
        if "approve" not in skip:
            out["approve"] = asyncio.run(approvals(r, args.approvals, args.approvals_mux))
            out["approve"]["target_p99_ms"] = 250
        if "watch" not in skip:
            out["watch"] = asyncio.run(watch_latency(r, args.watch_s))
            out["watch"]["target_p95_ms"] = 100
        if "fanout" not in skip:
            out["fanout"] = fanout(r, args.mb, args.runs, args.watchers, args.workload)
            out["fanout"]["target_ratio_min"] = 0.9
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
