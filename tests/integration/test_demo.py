"""``castgate demo``, README's first Quick start command, runs end to end without sshd,
with a local PostgreSQL target when the server binaries are installed (they are: the
test setup installs them) and without one when they are not."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recorder.masking import luhn_complete

CASTGATE = str(Path(sys.executable).parent / "castgate")
VISA = luhn_complete("411111111111111")
PANS = [VISA, luhn_complete("555555555555444"), luhn_complete("37828224631000")]


def _start(
    workdir: Path, env: dict[str, str] | None = None, *, keep: bool = False
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [CASTGATE, "demo", "--no-console", "--dir", str(workdir), *(["--keep"] if keep else [])],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    # SIGTERM first: the demo then stops its PostgreSQL server, which SIGKILL would
    # leave running.
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _demo(workdir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = _start(workdir, env)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        _stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _files_with_raw_pans(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {pan}" for pan in PANS if pan.encode() in data]
    return hits


def _cluster(out: str) -> Path:
    match = re.search(r"cluster in (\S+)", out)
    assert match, out
    return Path(match.group(1))


def _casts(workdir: Path) -> list[Path]:
    return sorted((workdir / "data" / "recordings").glob("*.cast"))


def test_demo_runs_the_embedded_default_with_a_postgres_target(tmp_path: Path) -> None:
    workdir = tmp_path / "d"
    res = _demo(workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert VISA not in out and f"{VISA[:6]}******{VISA[-4:]}" in out
    assert "blocked by rule no-rm-rf" in out and "[exit status 126]" in out
    assert "approval #1 required" in out and "granted by alice" in out
    assert "app restarted (simulated)" in out
    # PostgreSQL: the card table comes back masked (the masked column and the card
    # number inside free text), and the DROP is refused with the policy SQLSTATE.
    for pan in PANS:
        masked = pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
        assert f"| {masked:<16} | paid with {masked}" in out, out
    assert "blocked by rule no-drop" in out and "SQLSTATE 42501" in out
    assert re.search(r"closed\s+ci-agent@appdb", out), out
    assert out.count(": INTACT: ") == 4
    assert "Warning" not in res.stderr
    casts = _casts(workdir)
    assert len(casts) == 4
    pg_casts = [c for c in casts if '"protocol": "postgres"' in c.read_text().splitlines()[0]]
    assert len(pg_casts) == 1
    pg_cast = pg_casts[0].read_text()
    assert "DROP TABLE cards" in pg_cast and '"m","blocked: no-drop"' in pg_cast
    verify = subprocess.run(
        [CASTGATE, "verify", str(pg_casts[0])], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and "INTACT" in verify.stdout, verify.stdout + verify.stderr
    # The server was stopped and its cluster (the only place the raw numbers lived)
    # removed; nothing the demo left behind holds a raw card number.
    cluster = _cluster(out)
    assert not cluster.exists()
    assert _files_with_raw_pans(workdir) == []
    assert not any(pan in out or pan in res.stderr for pan in PANS)


def test_demo_without_postgres_binaries_skips_that_target(tmp_path: Path) -> None:
    workdir = tmp_path / "d"
    res = _demo(workdir, {"CASTGATE_PG_BINDIR": str(tmp_path / "no-such-dir")})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "skipped the PostgreSQL target" in res.stdout
    assert "appdb" not in res.stdout and "cluster in" not in res.stdout
    assert res.stdout.count(": INTACT: ") == 3 and len(_casts(workdir)) == 3
    assert _files_with_raw_pans(workdir) == []


def _alive(pid: int) -> bool:
    # A zombie has exited: nobody may reap an orphaned postmaster in a container.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize(
    "sig",
    [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
    ids=["ctrl-c", "sigterm", "sighup", "sigkill"],
)
def test_however_the_demo_ends_its_postgres_relay_and_cluster_go_with_it(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # SIGHUP is what a closed terminal sends; SIGKILL runs none of the demo's code, so
    # the kernel's parent-death signal stops the server and the relay, and the reaper
    # removes the cluster (it holds the demo's card table).
    workdir = tmp_path / "d"
    # --keep: the demo cannot finish its script and exit before the signal arrives (on a
    # loaded machine it did), so the signal always meets a running demo.
    proc = _start(workdir, keep=True)
    try:
        assert proc.stdout is not None
        out = ""
        deadline = time.monotonic() + 120
        # SIGHUP after the script (a user closing the window of a kept demo), the
        # others in the middle of it.
        wait = "The relay keeps running" if sig == signal.SIGHUP else "relay: SSH"
        while wait not in out and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
        assert wait in out, out
        cluster = _cluster(out)
        postmaster = int((cluster / "data" / "postmaster.pid").read_text().split()[0])
        relay = int(json.loads((workdir / "data" / "relay.json").read_text())["pid"])
        assert _alive(postmaster) and _alive(relay)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=90)
    finally:
        _stop(proc)
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + sig
    assert proc.returncode == expected, out + rest + err
    deadline = time.monotonic() + 60
    while (_alive(postmaster) or _alive(relay) or cluster.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(postmaster) and not _alive(relay)
    assert not cluster.exists()
