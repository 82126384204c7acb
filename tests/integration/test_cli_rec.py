"""``castgate init`` / ``rec`` / ``verify`` as a user runs them, with the real asciinema
client reading what ``rec`` writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recorder.masking import luhn_complete

BIN = Path(sys.executable).parent
CASTGATE = str(BIN / "castgate")
ASCIINEMA = str(BIN / "asciinema")
VISA = luhn_complete("411111111111111")
AMEX = luhn_complete("37828224631000")


def run(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "CASTGATE_HOME": str(cwd or Path.cwd())},
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    res = run(CASTGATE, "init", str(tmp_path / "gw"))
    assert res.returncode == 0, res.stderr
    return tmp_path / "gw"


def test_init_creates_config_keys_and_store(workdir: Path) -> None:
    cfg = (workdir / "castgate.toml").read_text()
    assert 'name = "ci-agent"' in cfg and "token_sha256" in cfg
    token = (workdir / "ci-agent.token").read_text().strip()
    assert token not in cfg
    key = workdir / "data" / "keys" / "signing_ed25519.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (workdir / "data" / "keys").stat().st_mode & 0o777 == 0o700
    assert (workdir / "data" / "castgate.db").exists()
    again = run(CASTGATE, "init", str(workdir))
    assert again.returncode == 2 and "already exists" in again.stderr


def printer(code: int = 0) -> list[str]:
    script = (
        f"import sys; print('card {VISA}'); "
        f"print('amex \\x1b[1m{AMEX[:4]}\\x1b[0m-{AMEX[4:10]}-{AMEX[10:]}'); "
        f"print('snowman \\u2603 ok'); sys.exit({code})"
    )
    return [sys.executable, "-c", script]


def test_rec_masks_agent_and_cast_and_asciinema_reads_it(workdir: Path) -> None:
    cast = workdir / "s.cast"
    res = run(
        CASTGATE, "rec", "-o", str(cast), "-c", "castgate.toml", "--", *printer(), cwd=workdir
    )
    assert res.returncode == 0, res.stderr
    assert VISA not in res.stdout and f"{VISA[:6]}******{VISA[-4:]}" in res.stdout
    assert AMEX[4:10] not in res.stdout
    raw = cast.read_text()
    assert VISA not in raw and AMEX not in raw
    # The title (the command line) is masked too.
    assert f"card {VISA[:6]}******{VISA[-4:]}" in json.loads(raw.splitlines()[0])["title"]
    output = "".join(json.loads(x)[2] for x in raw.splitlines()[1:])
    assert AMEX[4:10] not in output and VISA[6:12] not in output
    cat = run(ASCIINEMA, "cat", str(cast))
    assert cat.returncode == 0, cat.stderr
    assert f"card {VISA[:6]}******{VISA[-4:]}" in cat.stdout
    assert "snowman \u2603 ok" in cat.stdout
    ok = run(CASTGATE, "verify", "-c", "castgate.toml", str(cast), cwd=workdir)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "INTACT" in ok.stdout and "pinned key" in ok.stdout


@pytest.mark.parametrize(("code", "expected"), [(0, 0), (1, 1), (42, 42)])
def test_rec_exits_with_the_command_status(workdir: Path, code: int, expected: int) -> None:
    res = run(
        CASTGATE, "rec", "-o", str(workdir / f"{code}.cast"), "--", *printer(code), cwd=workdir
    )
    assert res.returncode == expected


def test_rec_reports_death_by_signal(workdir: Path) -> None:
    res = run(CASTGATE, "rec", "-o", "k.cast", "--", "sh", "-c", "kill -TERM $$", cwd=workdir)
    assert res.returncode == 128 + signal.SIGTERM


def test_store_holds_session_checkpoints_and_manifest(workdir: Path) -> None:
    from recorder.config import load_config
    from recorder.store import Store

    res = run(CASTGATE, "rec", "-o", "s.cast", "--", *printer(), cwd=workdir)
    assert res.returncode == 0, res.stderr
    cfg = load_config(workdir / "castgate.toml")
    store = Store.open(cfg.store_url())
    try:
        (session,) = store.list_sessions()
        assert session["status"] == "closed" and session["exit_status"] == 0
        assert session["masking_counts"]["pan"] == 2
        manifest = store.get_manifest(session["id"])
        assert manifest is not None and manifest["final_hash"] == session["final_hash"]
        checkpoint = store.latest_checkpoint(session["id"])
        assert checkpoint is not None and checkpoint["lines"] == manifest["lines"]
    finally:
        store.close()


def test_tampered_cast_names_the_line(workdir: Path) -> None:
    cast = workdir / "s.cast"
    assert run(CASTGATE, "rec", "-o", "s.cast", "--", *printer(), cwd=workdir).returncode == 0
    lines = cast.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"card", b"cart")
    cast.write_bytes(b"\n".join(lines))
    res = run(CASTGATE, "verify", str(cast), cwd=workdir)
    assert res.returncode == 1
    assert "TAMPERED" in res.stdout and "line 2" in res.stdout


def test_sigkilled_rec_leaves_a_readable_unsealed_cast(workdir: Path) -> None:
    cfg = workdir / "castgate.toml"
    cfg.write_text(cfg.read_text().replace("fsync_interval = 1.0", "fsync_interval = 0.05"))
    cast = workdir / "killed.cast"
    # Ends by itself once rec is gone (echo to the closed terminal fails), also where
    # SIGHUP is ignored (under nohup): nothing is left running after the test.
    loop = "i=0; while echo line $i; do i=$((i+1)); sleep 0.01; done"
    proc = subprocess.Popen(
        [CASTGATE, "rec", "-o", str(cast), "--", "sh", "-c", loop],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if cast.exists() and cast.read_bytes().count(b"\n") > 20:
                break
            time.sleep(0.05)
        else:
            pytest.fail("rec wrote nothing")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    cat = run(ASCIINEMA, "cat", str(cast))
    assert cat.returncode == 0, cat.stderr
    assert "line 1\n" in cat.stdout
    res = run(CASTGATE, "verify", str(cast), cwd=workdir)
    assert res.returncode == 1, res.stdout
    assert ("UNSEALED" in res.stdout) or ("TRUNCATED" in res.stdout)
    assert "lines" in res.stdout


def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[masking]\nstyle = "bin6"\n[[targets]]\nname = "web"\nkind = "ssh"\n')
    res = run(CASTGATE, "rec", "-c", str(bad), "-o", "x.cast", "--", "true", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert str(bad) in res.stderr and "masking.style" in res.stderr
    typo = tmp_path / "typo.toml"
    typo.write_text('[[identities]]\nname = "a"\ngroup = ["x"]\n')
    res = run(CASTGATE, "verify", "-c", str(typo), "x.cast", cwd=tmp_path)
    assert res.returncode == 2
    assert "identities[0] (a).group: unknown key" in res.stderr


def test_verify_unreadable_and_missing(tmp_path: Path) -> None:
    res = run(CASTGATE, "verify", str(tmp_path / "nope.cast"), cwd=tmp_path)
    assert res.returncode == 2 and "UNREADABLE" in res.stdout
    res = run(CASTGATE, "rec", "-o", "x.cast", "--", "no-such-command-xyz", cwd=tmp_path)
    assert res.returncode == 2 and "command not found" in res.stderr


def test_asciinema_reads_input_resize_and_marker_events(workdir: Path) -> None:
    cfg = workdir / "castgate.toml"
    cfg.write_text(cfg.read_text().replace('input = "commands"', 'input = "all"'))
    cast = workdir / "i.cast"
    res = subprocess.run(
        [CASTGATE, "rec", "-o", str(cast), "--", "sh", "-c", "read x; echo got $x"],
        cwd=workdir,
        input=f"{VISA}\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    events = [json.loads(x) for x in cast.read_text().splitlines()[1:]]
    inputs = "".join(e[2] for e in events if e[1] == "i")
    assert VISA not in inputs and VISA[:6] in inputs
    assert VISA not in cast.read_text()
    assert run(ASCIINEMA, "cat", str(cast)).returncode == 0
