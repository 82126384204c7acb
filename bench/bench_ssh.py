"""SSH relay: bulk throughput and keystroke echo latency through ``castgate relay``,
against direct OpenSSH to the same sshd, measured in one run.

- Bulk: the real OpenSSH ``ssh`` client (``-c aes128-gcm@openssh.com``) runs
  ``head -c NM /dev/zero`` (the easy case: nothing the masker can match) and
  ``seq 1 1000000000 | head -c NM`` (digits and newlines: the masker must scan every
  run) on the target, directly and through the relay; its stdout is a pipe this process
  drains, counts and checksums (the count and the CRC must be exact). Paths: direct,
  the castgate relay, and bench/bare_relay.py (a bare asyncssh relay: DESIGN.md's
  ceiling, re-measured; ``--no-bare`` skips it); with ``--split``, bench/split_relay.py
  too (a two-process prototype: masking and recording on the target's hop, in a process
  of its own). Runs are interleaved, the order rotating each round.
- Echo: an asyncssh client opens an interactive PTY shell (term_type xterm) directly and
  through the relay, types one printable character at a time and times the arrival of
  its echo; it waits ``--pause-ms`` of quiet after each echo so that every sample is one
  round trip. A shorter digit series shows the masker's hold-back on typed digits.

The relay runs with the test identities and targets of ``tests/fix_relay.py`` but the
product's defaults for what matters here: masking on, recording on (input = commands),
``recording.fsync_interval`` 1.0 (the default), ``masking.hold_deadline_ms`` 20.

Run: .venv/bin/python -m bench.bench_ssh [--mb 200] [--runs 3] [--keys 200] [--no-bare]
     [--split] [--profile /tmp/relay]  (py-spy, after the measured runs; not part of the figures)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh

import tests.fix_relay as fix_relay
import tests.fix_sshd as fix_sshd
from tests.fix_relay import Relay, start_relay
from tests.fix_sshd import SshTarget

CIPHER = "aes128-gcm@openssh.com"
TARGET = "web"  # a target of tests/fix_relay.py's config, reachable by ci-agent
_PIPE_SIZE = 1 << 20
_READ = 1 << 20


# -- processes -------------------------------------------------------------------------


@contextlib.contextmanager
def sshd() -> Iterator[SshTarget]:
    """The sshd of tests/fix_sshd.py (same config, same keys), outside pytest."""
    fix_sshd.PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    base = Path(tempfile.mkdtemp(prefix="castgate-bench-sshd-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        host_key = base / "ssh_host_ed25519_key"
        host_key_line = fix_sshd._keygen(host_key)
        client_key = base / "id_ed25519"
        authorized_keys = base / "authorized_keys"
        authorized_keys.write_text(fix_sshd._keygen(client_key) + "\n")
        logfile = base / "sshd.log"
        port = 0
        for _attempt in range(3):
            port = fix_sshd._free_port()
            config = fix_sshd._write_config(base, port, host_key, authorized_keys)
            proc = fix_sshd._start(config, port, logfile)
            if proc is not None:
                break
        if proc is None:
            raise RuntimeError(f"sshd did not start:\n{fix_sshd._log_tail(logfile)}")
        known_hosts = base / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_key_line}\n")
        yield SshTarget("127.0.0.1", port, user, client_key, host_key_line, known_hosts)
    finally:
        if proc is not None:
            fix_sshd._stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def _product_config(*args: Any, **kwargs: Any) -> Path:
    """tests/fix_relay.py's config with the test-only ``fsync_interval = 0.2`` removed,
    so the relay fsyncs at the product default (1.0 s)."""
    path: Path = _write_config_orig(*args, **kwargs)
    text = path.read_text()
    if "fsync_interval = 0.2\n" not in text:
        raise RuntimeError("tests/fix_relay.py: the config no longer sets fsync_interval = 0.2")
    path.write_text(text.replace("fsync_interval = 0.2\n", ""))
    return path


_write_config_orig = fix_relay.write_config


@contextlib.contextmanager
def relay(target: SshTarget) -> Iterator[Relay]:
    """A real ``castgate relay`` process (tests/fix_relay.start_relay) with the default
    fsync interval; stopped (SIGTERM, then SIGKILL) on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="castgate-bench-relay-"))
    try:
        fix_relay.write_config = _product_config
        try:
            r = start_relay(workdir, target)
        finally:
            fix_relay.write_config = _write_config_orig
        try:
            yield r
        finally:
            r.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def bare_relay(target: SshTarget, module: str = "bench.bare_relay") -> Iterator[list[str]]:
    """bench/bare_relay.py (or ``module``, which takes the same arguments) in its own
    process; yields the ssh client arguments."""
    workdir = Path(tempfile.mkdtemp(prefix="castgate-bench-bare-"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            module,
            f"{target.host}:{target.port}",
            target.user,
            str(target.client_key),
            target.host_key_line,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port, key_type, blob = proc.stdout.readline().decode().split()
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {blob}\n")
        yield [
            "-p",
            port,
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-c",
            CIPHER,
            "bare@127.0.0.1",
        ]
    finally:
        fix_sshd._stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_sealed(r: Relay, timeout: float = 120) -> None:
    """Wait until the relay has sealed the session (its manifest is written) so the next
    run does not share the event loop with the seal, then drop the recording (disk).

    The manifest file, not the ``session.end`` log line: the relay never logs that line
    for a session whose agent disconnects right after the exit status (see RESULTS.md).
    """
    deadline = time.monotonic() + timeout
    while not any(r.recordings().glob("*.manifest.json")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"relay did not seal the session: {r.logs[-5:]}")
        if r.proc.poll() is not None:
            raise RuntimeError(f"relay exited: {r.logs[-10:]}")
        time.sleep(0.05)
    time.sleep(0.2)  # what follows the seal: store writes, audit event
    for f in r.recordings().glob("*"):
        f.unlink(missing_ok=True)


# -- bulk ------------------------------------------------------------------------------


def _drain(argv: list[str], size: int, crc: int) -> dict[str, float]:
    """Run the ssh client, drain its stdout pipe; seconds from start and from first byte."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            n = 0
            got = 0
            t_first = 0.0
            while True:
                chunk = os.read(fd, _READ)
                if not chunk:
                    break
                if not n:
                    t_first = time.perf_counter()
                n += len(chunk)
                got = zlib.crc32(chunk, got)
            t_end = time.perf_counter()
            proc.stdout.close()
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if rc != 0 or n != size or got != crc:
        raise RuntimeError(
            f"{argv[-2:]}: exit {rc}, {n} bytes (want {size}), crc {got:#x} (want {crc:#x})"
            f": {stderr[-500:]}"
        )
    return {"total_s": t_end - t0, "stream_s": t_end - t_first}


def _expected(command: str) -> tuple[int, int]:
    """Size and CRC-32 of the command's output, run locally."""
    proc = subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    n = crc = 0
    while chunk := proc.stdout.read(_READ):
        n += len(chunk)
        crc = zlib.crc32(chunk, crc)
    proc.wait()
    return n, crc


def _summary(size: int, runs: list[dict[str, float]], key: str) -> dict[str, float]:
    rates = [size / r[key] / 1e6 for r in runs]
    return {"best": round(max(rates), 1), "median": round(statistics.median(rates), 1)}


WORKLOADS = {
    "zeros": "head -c {mb}M /dev/zero",
    "digits": "seq 1 1000000000 | head -c {mb}M",
}


def bulk(
    paths: dict[str, list[str]],
    r: Relay,
    mb: int,
    runs: int,
    workloads: tuple[str, ...] = tuple(WORKLOADS),
) -> dict[str, object]:
    """MB/s per workload and path (``direct`` is the reference); the paths of a round run
    one after another, in an order that rotates every round."""
    out: dict[str, object] = {}
    names = list(paths)
    for name in workloads:
        command = WORKLOADS[name].format(mb=mb)
        size, crc = _expected(command)
        res: dict[str, list[dict[str, float]]] = {p: [] for p in names}
        for i in range(runs):
            for path in names[i % len(names) :] + names[: i % len(names)]:
                res[path].append(_drain([*paths[path], command], size, crc))
                if path == "relay":
                    _wait_sealed(r)
        entry: dict[str, object] = {"command": command, "bytes": size}
        for key, label in (("stream_s", "first_byte_to_eof"), ("total_s", "incl_connect")):
            figures: dict[str, object] = {}
            ref = _summary(size, res["direct"], key) if "direct" in res else None
            for path in names:
                v = _summary(size, res[path], key)
                figures[path] = v
                if ref is not None and path != "direct":
                    figures[f"{path}/direct"] = {
                        "best": round(v["best"] / ref["best"], 3),
                        "median": round(v["median"] / ref["median"], 3),
                    }
            if "relay" in res and "bare_asyncssh" in res:
                v, b = _summary(size, res["relay"], key), _summary(size, res["bare_asyncssh"], key)
                figures["relay/bare_asyncssh"] = {
                    "best": round(v["best"] / b["best"], 3),
                    "median": round(v["median"] / b["median"], 3),
                }
            entry[label] = figures
        entry["raw_s"] = {p: [round(x["stream_s"], 3) for x in lst] for p, lst in res.items()}
        out[name] = entry
    return out


# -- echo latency ----------------------------------------------------------------------


class _Echo(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.last = time.perf_counter()
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.last = time.perf_counter()
        self.buf += data
        self.arrived.set()


async def _quiet(s: _Echo, quiet: float, limit: float = 5.0) -> None:
    """Wait until no output has arrived for ``quiet`` seconds."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        idle = time.perf_counter() - s.last
        if idle >= quiet:
            return
        await asyncio.sleep(quiet - idle)


async def _echo_series(
    s: _Echo, chan: asyncssh.SSHClientChannel[bytes], keys: str, pause: float, clear_every: int
) -> tuple[list[float], set[str]]:
    """Echo times in ms, and the keys whose echo took longer than 10 ms."""
    samples: list[float] = []
    slow: set[str] = set()
    slow_ms = 10.0
    for i, ch in enumerate(keys):
        if i and i % clear_every == 0:
            chan.write(b"\x15")  # Ctrl-U: empty the line, stay far from the margin
            await _quiet(s, 0.1)
        s.buf.clear()
        s.arrived.clear()
        want = ch.encode()
        t0 = time.perf_counter()
        chan.write(want)
        while want not in s.buf:
            await asyncio.wait_for(s.arrived.wait(), 5)
            s.arrived.clear()
        samples.append((s.last - t0) * 1000)
        if samples[-1] > slow_ms:
            slow.add(ch)
        await asyncio.sleep(pause)
        await _quiet(s, pause)
    chan.write(b"\x15")
    await _quiet(s, 0.1)
    return samples, slow


def _pct(series: tuple[list[float], set[str]]) -> dict[str, Any]:
    samples, slow = series
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50": round(statistics.median(samples), 3),
        "p95": round(q[94], 3),
        "p99": round(q[98], 3),
        "n": len(samples),
        "keys_over_10ms": "".join(sorted(slow)),
    }


async def _echo(
    host: str,
    port: int,
    username: str,
    key: Path,
    known_hosts: object,
    n: int,
    pause: float,
) -> dict[str, dict[str, Any]]:
    async with asyncssh.connect(
        host,
        port,
        username=username,
        client_keys=[str(key)],
        known_hosts=known_hosts,
        config=[],
        agent_path=None,
        encryption_algs=[CIPHER],
    ) as conn:
        chan, session = await conn.create_session(
            _Echo, term_type="xterm", term_size=(200, 50), encoding=None
        )
        assert isinstance(session, _Echo)
        s = session
        await _quiet(s, 0.5)  # the prompt
        letters = "abcdefghijklmnopqrstuvwxyz"
        await _echo_series(s, chan, letters[:10], pause, 50)  # warm-up, not counted
        text = "".join(letters[i % 26] for i in range(n))
        out = {"letters": _pct(await _echo_series(s, chan, text, pause, 50))}
        digits = "".join("123456789"[i % 9] for i in range(max(20, n // 4)))
        out["digits"] = _pct(await _echo_series(s, chan, digits, pause, 12))
        chan.write(b"exit\r")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(chan.wait_closed(), 5)
    return out


def echo(target: SshTarget, r: Relay, n: int, pause: float) -> dict[str, object]:
    direct_kh: object = ([asyncssh.import_public_key(target.host_key_line)], [], [])
    res: dict[str, dict[str, dict[str, Any]]] = {}
    res["direct"] = asyncio.run(
        _echo(target.host, target.port, target.user, target.client_key, direct_kh, n, pause)
    )
    res["relay"] = asyncio.run(
        _echo("127.0.0.1", r.port, TARGET, r.agent_key, r.known_hosts_obj(), n, pause)
    )
    _wait_sealed(r)
    out: dict[str, object] = {"keystrokes": n, "pause_ms": pause * 1000}
    for series in ("letters", "digits"):
        d, v = res["direct"][series], res["relay"][series]
        out[series] = {
            "direct_ms": d,
            "relay_ms": v,
            "added_p50_ms": round(v["p50"] - d["p50"], 3),
        }
    return out


# -- profiling (optional, after the figures) -------------------------------------------


def profile(via: list[str], r: Relay, mb: int, prefix: str) -> dict[str, str]:
    """py-spy on the relay during one relay run of each bulk workload: raw stacks
    (PREFIX-WORKLOAD.txt) and a flame graph of the digits run (PREFIX-digits.svg)."""
    spy = shutil.which("py-spy") or str(Path(fix_relay.BIN) / "py-spy")
    files: dict[str, str] = {}
    for name, fmt, ext in (
        ("zeros", "raw", "txt"),
        ("digits", "raw", "txt"),
        ("digits", "flamegraph", "svg"),
    ):
        path = f"{prefix}-{name}.{ext}"
        rec = subprocess.Popen(
            [spy, "record", "-r", "200", "-f", fmt, "-o", path, "--pid", str(r.proc.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            bulk({"relay": via}, r, mb, 1, (name,))
        finally:
            rec.send_signal(signal.SIGINT)  # py-spy writes the file and exits
            try:
                rec.wait(timeout=30)
            except subprocess.TimeoutExpired:
                rec.kill()
                rec.wait()
        files[f"{name}.{ext}"] = path
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200, help="MiB per bulk transfer")
    ap.add_argument("--runs", type=int, default=3, help="runs per path and workload")
    ap.add_argument("--keys", type=int, default=200, help="keystrokes per echo series")
    ap.add_argument("--pause-ms", type=float, default=10.0)
    ap.add_argument(
        "--no-bare", action="store_true", help="skip the bare asyncssh relay (the ceiling)"
    )
    ap.add_argument("--profile", metavar="PREFIX", help="py-spy the relay afterwards")
    ap.add_argument(
        "--split",
        action="store_true",
        help="also measure bench/split_relay.py (two processes, one per hop: a prototype)",
    )
    args = ap.parse_args()
    out: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cipher": CIPHER,
        "relay_config": "masking on (bin6-last4 + 1 custom pattern), recording on "
        "(input=commands), fsync_interval 1.0, hold_deadline_ms 20",
    }
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(sshd())
        r = stack.enter_context(relay(target))
        ssh = ["ssh", "-F", "none"]
        paths = {
            "direct": [*ssh, *target.ssh_args(), "-c", CIPHER, f"{target.user}@127.0.0.1"],
            "relay": [*ssh, *r.ssh_args(), "-c", CIPHER, f"{TARGET}@127.0.0.1"],
        }
        if not args.no_bare:
            paths["bare_asyncssh"] = [*ssh, *stack.enter_context(bare_relay(target))]
        if args.split:
            split = stack.enter_context(bare_relay(target, "bench.split_relay"))
            paths["split_prototype"] = [*ssh, *split]
        out["bulk_MBps"] = bulk(paths, r, args.mb, args.runs)
        out["echo"] = echo(target, r, args.keys, args.pause_ms / 1000)
        if args.profile:
            out["profile"] = profile(paths["relay"], r, args.mb, args.profile)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
