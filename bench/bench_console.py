"""Operator console (issue 7): CPU and frame latency while watching a session that
prints 1 MB/s, and memory with 100 live sessions listed, against a real ``castgate
relay`` in front of a real sshd on this machine.

How it measures (the console is the real ``castgate console`` process):
- The console runs in a pseudo-terminal this process owns (160x50, TERM=xterm-256color)
  and is driven by keys written to it, as an operator would: Ctrl+R, ``/``, the session's
  marker, Enter opens its live watch. A thread drains the PTY master and timestamps every
  read: that is the moment the console's frame bytes reach the terminal, i.e. what the
  operator's terminal emulator is handed to paint (the emulator's own drawing is not
  the console's cost and is left out). tmux capture-pane was the alternative; it adds
  tmux's own emulation and a polling interval to every sample, so it measures tmux.
- The watched session: the OpenSSH client runs, through the relay, a python3 script on
  the target that writes bench/corpus.py output (coloured ls/git/ps/log/compiler lines,
  a test card number every 8 KB, masked by the relay) at ``--rate`` bytes/s in 10 ms
  ticks; every tick ends with a line ``CGTS <time.time() as a hex float>`` (hex, so no
  digit run can look like a card number), written in the default style so the console
  draws it as one contiguous run of text.
- Frame latency: for each token, PTY read time minus the token's time (same machine,
  same clock) the first time it appears in the console's output. The token is the last
  line of its tick, so the newest token in a frame dates the frame's newest content to
  within 10 ms. At 1 MB/s (about 125 lines per tick) most ticks scroll off between two
  frames and are never drawn, so the figure is per frame, not per line; the count of
  tokens drawn is reported.
- Keeping up: p95 over the first and the last third of the run (a backlog shows as
  growth), the lag of the final token (time from the generator's last line to the
  console drawing it), and the console must not have been dropped by the relay as too
  slow (the live screen's status line would say so).
- CPU: user+system seconds of the console process (/proc, all threads) over the
  generator's run, divided by that wall time; the relay's too.
- Memory: VmRSS of a console on the sessions screen with 0 sessions, then of the same
  console once 100 live sessions (100 asyncssh connections to the relay, each running
  ``sleep``) are listed, and of a second console started with the 100 already live.
  "Listed" is checked on the screen: the PTY output is fed to replay's terminal model.

Run: .venv/bin/python -m bench.bench_console [--rate 1000000] [--secs 20] [--sessions 100]
     [--skip memory,scroll,status]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import itertools
import json
import math
import os
import pty
import re
import shutil
import signal
import statistics
import struct
import subprocess
import tempfile
import termios
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh

from bench.bench_ssh import relay, sshd
from bench.corpus import terminal_output
from replay.terminal import new_terminal
from tests.fix_relay import CASTGATE, TOKENS, Relay

TOKEN = TOKENS["alice"]
COLS, ROWS = 160, 50
TICK = 0.01
_TOKEN_RE = re.compile(rb"CGTS (0x[0-9a-f.]+p[+-]\d+)")

# Runs on the target (any python3): paced corpus output, a token line per tick, and a
# summary on stderr at the end.
GENERATOR = r"""
import sys, time
data = open(sys.argv[1], "rb").read()
rate, secs, tick = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
status = sys.argv[5] == "status"
per = max(1, int(rate * tick))
out = sys.stdout.buffer
pos = sent = k = 0
last = 0.0
if status:
    # A full screen first, then one line rewritten in place (a progress display).
    out.write(data[: data.find(b"\n", 4096) + 1])
t0 = time.time()
while True:
    due = t0 + k * tick
    now = time.time()
    if now < due:
        time.sleep(due - now)
    if due - t0 >= secs:
        break
    if status:
        last = time.time()
        line = b"\r\x1b[0mCGTS " + last.hex().encode() + b" step %d\x1b[K" % k
        out.write(line)
        out.flush()
        sent += len(line)
        k += 1
        continue
    nxt = data.find(b"\n", pos + per)
    if nxt < 0:
        pos, nxt = 0, data.find(b"\n", per)
    chunk = data[pos:nxt + 1]
    pos = nxt + 1
    last = time.time()
    line = b"\x1b[0mCGTS " + last.hex().encode() + b"\r\n"
    out.write(chunk + line)
    out.flush()
    sent += len(chunk) + len(line)
    k += 1
sys.stderr.write("GEN %d %d %s %s\n" % (sent, k, t0.hex(), last.hex()))
"""


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    out: dict[str, float] = {f"p{q}": round(_pct(values, q) * 1000, 1) for q in (50, 95, 99)}
    out["max"] = round(max(values) * 1000, 1)
    out["n"] = len(values)
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _api(r: Relay, path: str) -> Any:
    import urllib.request

    req = urllib.request.Request(r.api + path, headers={"Authorization": f"Bearer {TOKEN}"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return json.loads(resp.read())


def _live_ids(r: Relay, marker: str) -> list[str]:
    rows = _api(r, "/api/v1/sessions?live=true&limit=500")["sessions"]
    return [str(s["id"]) for s in rows if marker in (s.get("title") or "")]


class Console:
    """``castgate console`` on a PTY of this process; a thread drains and timestamps its
    output, keeps it for the terminal model, and collects first sightings of tokens."""

    def __init__(self, r: Relay, keep_screen: bool = True) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CASTGATE_", "TEXTUAL"))}
        env.update(TERM="xterm-256color", COLORTERM="truecolor", LANG="C.UTF-8")
        self.proc = subprocess.Popen(
            [CASTGATE, "console", "--api", r.api, "--token", TOKEN],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        os.close(slave)
        self.master = master
        self.seen: dict[bytes, float] = {}
        self.bytes = 0
        # Output bytes at each first sighting of a token: the bytes between two are
        # one frame's worth (or a few, when a frame brought no new token).
        self.frame_marks: list[int] = []
        self.keep_screen = keep_screen
        self.term = new_terminal(COLS, ROWS)
        self._lock = threading.Lock()
        self._tail = b""
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:
                return
            now = time.time()
            if not data:
                return
            self.bytes += len(data)
            buf = self._tail + data
            for m in _TOKEN_RE.finditer(buf):
                if m.group(1) not in self.seen:
                    self.seen[m.group(1)] = now
                    self.frame_marks.append(self.bytes)
            # A token cut by the read boundary is found whole next time.
            self._tail = buf[-48:]
            if self.keep_screen:
                with self._lock:
                    self.term.feed(data.decode("utf-8", "replace"))

    def screen(self) -> str:
        """The console's screen as the terminal shows it."""
        with self._lock:
            return self.term.text()

    def wait_screen(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if re.search(pattern, text):
                return text
            if self.proc.poll() is not None:
                raise RuntimeError(f"console exited {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"console screen never showed {pattern!r}:\n{self.screen()}")

    def keys(self, data: str, pause: float = 0.3) -> None:
        os.write(self.master, data.encode())
        time.sleep(pause)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.write(self.master, b"\x11")  # Ctrl+Q
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        os.close(self.master)
        self._thread.join(10)


# -- frame latency at 1 MB/s -----------------------------------------------------------


def latency(r: Relay, rate: int, secs: float, workdir: Path, mode: str) -> dict[str, Any]:
    """Watch one session in the console for ``secs``: ``scroll`` prints ``rate``
    bytes/s of corpus output, ``status`` rewrites one line of a full screen every tick
    (only that row should be redrawn)."""
    corpus = workdir / "corpus.bin"
    if not corpus.exists():
        corpus.write_bytes(terminal_output(4 << 20, pan_every=8192))
    gen = workdir / "gen.py"
    gen.write_text(GENERATOR)
    marker = f"conbench-{mode}"
    con = Console(r)
    agent: subprocess.Popen[bytes] | None = None
    try:
        con.wait_screen(r"identity\s+target")
        # The sleep lets the console join before the first byte.
        command = f": {marker}; sleep 6; exec python3 {gen} {corpus} {rate} {secs} {TICK} {mode}"
        agent = subprocess.Popen(
            ["ssh", "-F", "none", *r.ssh_args(), "web@127.0.0.1", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while not _live_ids(r, marker):
            if time.monotonic() > deadline:
                raise RuntimeError("the agent session never went live")
            time.sleep(0.1)
        con.keys("\x12", 1.0)  # Ctrl+R: reload the table now
        con.keys("/")
        con.keys(marker)
        con.keys("\r")
        con.wait_screen(r"Live: ci-agent@web", 10)
        joined = time.time()
        # CPU is counted from the first token drawn to the last: the generator's run.
        deadline = time.monotonic() + 30
        while not con.seen and time.monotonic() < deadline:
            time.sleep(0.005)
        cpu0, rcpu0 = _cpu_s(con.proc.pid), _cpu_s(r.proc.pid)
        t_cpu0, bytes0 = time.time(), con.bytes
        assert agent.stderr is not None
        err = agent.stderr.read().decode(errors="replace")
        agent.wait(60)
        gen_line = next((ln for ln in err.splitlines() if ln.startswith("GEN ")), None)
        if gen_line is None:
            raise RuntimeError(f"generator failed: {err[-2000:]}")
        sent, ticks, t0_hex, last_hex = gen_line.split()[1:]
        t_start, t_last = float.fromhex(t0_hex), float.fromhex(last_hex)
        if t_start < joined:
            raise RuntimeError("the console joined after the output began: raise the sleep")
        # The final token has to be drawn; wait for it (a hang guard, not a threshold).
        last_key = last_hex.encode()
        deadline = time.monotonic() + 60
        while last_key not in con.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        t_cpu1 = time.time()
        cpu1, rcpu1 = _cpu_s(con.proc.pid), _cpu_s(r.proc.pid)
        bytes1 = con.bytes
        time.sleep(1.0)
        screen = con.screen()
        wall = t_cpu1 - t_cpu0
        samples = sorted((float.fromhex(k.decode()), seen) for k, seen in con.seen.items() if k)
        samples = [(t, s) for t, s in samples if t >= t_start]
        lat = [s - t for t, s in samples]
        marks = [b for b in con.frame_marks if bytes0 <= b <= bytes1]
        frames = [b - a for a, b in itertools.pairwise(marks)]
        third = (t_last - t_start) / 3
        first = [s - t for t, s in samples if t < t_start + third]
        last = [s - t for t, s in samples if t >= t_last - third]
        what = (
            f"{rate} B/s of corpus output"
            if mode == "scroll"
            else "a full screen, then one line rewritten in place"
        )
        return {
            "session": f"ssh web@relay python3 generator: {what} for {secs} s, "
            f"token every {TICK * 1000:.0f} ms",
            "bytes_sent": int(sent),
            "achieved_Bps": round(int(sent) / (t_last - t_start)),
            "tokens_sent": int(ticks),
            "tokens_drawn": len(samples),
            "frames_per_s_with_new_token": round(len(samples) / (t_last - t_start), 1),
            "frame_latency_ms": _ms(lat),
            "frame_latency_first_third_ms": _ms(first),
            "frame_latency_last_third_ms": _ms(last),
            "final_token_lag_ms": round((con.seen[last_key] - t_last) * 1000, 1)
            if last_key in con.seen
            else None,
            "console_cpu_s": round(cpu1 - cpu0, 2),
            "console_cpu_fraction_of_one_core": round((cpu1 - cpu0) / wall, 3),
            "relay_cpu_fraction_of_one_core": round((rcpu1 - rcpu0) / wall, 3),
            "measured_wall_s": round(wall, 2),
            "console_output_bytes_per_frame": {
                "median": statistics.median(frames) if frames else None,
                "mean": round((bytes1 - bytes0) / max(len(samples), 1)),
            },
            "dropped_as_too_slow": "too slow" in screen,
            "status_line": next((ln for ln in screen.splitlines() if "session " in ln), ""),
            "console_rss_mb": round(_rss_mb(con.proc.pid), 1),
        }
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        con.close()


# -- memory with N live sessions -------------------------------------------------------


class IdleSessions:
    """``n`` asyncssh connections to the relay, each running ``: idle-I; sleep 600``,
    on an event loop in a thread."""

    def __init__(self, r: Relay, n: int) -> None:
        self.r, self.n = r, n
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.conns: list[asyncssh.SSHClientConnection] = []

    async def _open(self) -> None:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                conn = await asyncssh.connect(
                    "127.0.0.1",
                    self.r.port,
                    username="web",
                    client_keys=[str(self.r.agent_key)],
                    known_hosts=self.r.known_hosts_obj(),
                    config=[],
                    agent_path=None,
                    connect_timeout=60,
                )
                self.conns.append(conn)
                await conn.create_process(f": idle-{i}; sleep 600")

        await asyncio.gather(*(one(i) for i in range(self.n)))

    def open(self) -> None:
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(300)

    def close(self) -> None:
        async def close() -> None:
            for c in self.conns:
                c.close()
            await asyncio.gather(*(c.wait_closed() for c in self.conns), return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _settle(con: Console, secs: float) -> tuple[float, float]:
    """Let the console run ``secs`` (several table refreshes); its RSS then, and its CPU
    fraction of one core over that time."""
    c0, t0 = _cpu_s(con.proc.pid), time.time()
    time.sleep(secs)
    return _rss_mb(con.proc.pid), (_cpu_s(con.proc.pid) - c0) / (time.time() - t0)


def _live_rows(screen: str) -> int:
    return sum(1 for ln in screen.splitlines() if re.search(r"\bidle-\d+", ln) and " live " in ln)


def memory(r: Relay, n: int) -> dict[str, Any]:
    """RSS of the console with 0 sessions and with ``n`` live sessions listed."""
    if _api(r, "/api/v1/sessions?limit=500")["sessions"]:
        raise RuntimeError("the relay already has sessions: run the memory part first")
    out: dict[str, Any] = {}
    con = Console(r)
    idle: IdleSessions | None = None
    fresh: Console | None = None
    try:
        con.wait_screen(r"identity\s+target")
        rss0, cpu0 = _settle(con, 10)
        out["console_0_sessions"] = {"rss_mb": round(rss0, 1), "cpu_fraction": round(cpu0, 3)}
        idle = IdleSessions(r, n)
        t = time.monotonic()
        idle.open()
        deadline = time.monotonic() + 60
        while len(_live_ids(r, "idle-")) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(_live_ids(r, 'idle-'))} of {n} sessions live")
            time.sleep(0.2)
        out["sessions_opened_in_s"] = round(time.monotonic() - t, 1)
        visible = _live_rows(con.wait_screen(r" live .*idle-\d+", 30))
        rss1, cpu1 = _settle(con, 10)
        visible = _live_rows(con.screen())
        out["console_with_sessions_listed"] = {
            "live_sessions_in_api": len(_live_ids(r, "idle-")),
            "live_rows_visible_on_screen": visible,
            "rss_mb": round(rss1, 1),
            "cpu_fraction": round(cpu1, 3),
        }
        fresh = Console(r)
        fresh.wait_screen(r" live .*idle-\d+", 60)
        rss2, cpu2 = _settle(fresh, 10)
        out["fresh_console_with_sessions_listed"] = {
            "live_rows_visible_on_screen": _live_rows(fresh.screen()),
            "rss_mb": round(rss2, 1),
            "cpu_fraction": round(cpu2, 3),
        }
        out["rss_delta_mb"] = round(rss1 - rss0, 1)
        out["rss_delta_fresh_mb"] = round(rss2 - rss0, 1)
        out["relay_rss_mb"] = round(_rss_mb(r.proc.pid), 1)
        return out
    finally:
        if fresh is not None:
            fresh.close()
        con.close()
        if idle is not None:
            idle.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=1_000_000, help="bytes per second")
    ap.add_argument("--secs", type=float, default=20.0)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--skip", default="", help="comma list of memory,scroll,status to skip")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "terminal": f"{COLS}x{ROWS} PTY, TERM=xterm-256color",
    }
    workdir = Path(tempfile.mkdtemp(prefix="castgate-bench-console-"))
    try:
        with sshd() as target, relay(target) as r:
            if "memory" not in skip:
                out["memory"] = memory(r, args.sessions)
            for mode in ("scroll", "status"):
                if mode not in skip:
                    res = latency(r, args.rate, args.secs, workdir, mode)
                    res["target_p95_ms"] = 100
                    out[f"latency_{mode}"] = res
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
