"""An evidence bundle built from a recorded session verifies with ``castgate verify
DIR``; changing, removing or adding any file makes verify fail and name the file.
Reading recordings by session id (evidence, export, play) is itself audited."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from recorder.config import load_config
from recorder.masking import luhn_complete
from recorder.store import Store
from replay.seekindex import open_index

BIN = Path(sys.executable).parent
CASTGATE = str(BIN / "castgate")
VISA = luhn_complete("411111111111111")


def run(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CASTGATE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "CASTGATE_HOME": str(cwd), "CASTGATE_IDENTITY": "auditor-ann"},
    )


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """castgate init + castgate rec -c: one recorded session in the store, with a
    command log and an approval added the way the relay records them."""
    root = tmp_path_factory.mktemp("evidence")
    assert run("init", str(root / "gw"), cwd=root).returncode == 0
    work = root / "gw"
    script = f"print('paying with {VISA}'); print('deploy finished')"
    res = run(
        "rec", "-o", "s.cast", "-c", "castgate.toml", "--", sys.executable, "-c", script, cwd=work
    )
    assert res.returncode == 0, res.stderr
    store = Store.open(load_config(work / "castgate.toml").store_url())
    try:
        (row,) = store.list_sessions()
        sid = row["id"]
        store.add_command(
            sid, "DROP DATABASE app", kind="sql", action="block", rule="no-drop-database"
        )
        approval = store.create_approval(
            session_id=sid,
            identity=row["identity"],
            target="local",
            command="git push origin main",
            rule="push-needs-approval",
            expires_at=datetime.now(UTC) + timedelta(minutes=10),
            approver_groups=["sre"],
        )
        store.add_decision(approval, approver="alice", decision="approve", reason="change #42")
        store.add_command(
            sid, "git push origin main", kind="git", action="approve", rule="push-needs-approval",
            approval_id=approval,
        )  # fmt: skip
    finally:
        store.close()
    return work, sid


def verify_in_process(path: Path) -> tuple[int, str]:
    from castgate.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["verify", str(path)])
    return code, out.getvalue()


def events(work: Path, kind: str) -> list[dict[str, object]]:
    store = Store.open(load_config(work / "castgate.toml").store_url())
    try:
        return store.list_events(kind=kind)
    finally:
        store.close()


def test_bundle_verifies_and_every_changed_file_is_named(
    session: tuple[Path, str], tmp_path: Path
) -> None:
    work, sid = session
    bundle = tmp_path / "bundle"
    res = run("evidence", "--session", sid, "-o", str(bundle), "-c", "castgate.toml", cwd=work)
    assert res.returncode == 0, res.stderr
    assert "1 session(s)" in res.stdout and "signed by SHA256:" in res.stdout

    ok = run("verify", str(bundle), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "evidence-manifest.json: INTACT" in ok.stdout
    assert "s.cast: INTACT" in ok.stdout
    pinned = run("verify", "-c", str(work / "castgate.toml"), str(bundle), cwd=tmp_path)
    assert pinned.returncode == 0 and "pinned key" in pinned.stdout

    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    names = {p.relative_to(bundle).as_posix() for p in files}
    folder = f"sessions/{sid}"
    assert {
        "index.html",
        "keys/signing_ed25519.pub.pem",
        "SHA256SUMS",
        "evidence-manifest.json",
        f"{folder}/audit-record.json",
        f"{folder}/s.cast",
        f"{folder}/s.cast.chain",
        f"{folder}/s.cast.manifest.json",
        f"{folder}/replay.html",
    } == names
    # sha256sum -c works without castgate.
    sums = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True, timeout=30
    )
    assert sums.returncode == 0, sums.stdout

    for rel in sorted(names):
        copy = tmp_path / f"edited-{rel.replace('/', '_')}"
        shutil.copytree(bundle, copy)
        target = copy / rel
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x20  # one character, in the middle
        target.write_bytes(bytes(data))
        # In-process (the same main() the console script runs): nine CLI start-ups
        # would cost more than everything else here.
        code, out = verify_in_process(copy)
        # 1 (tampered), or 2 when the edit broke a cast's header line (unreadable).
        assert code in (1, 2), f"{rel}: {out}"
        bad = [line for line in out.splitlines() if "INTACT" not in line]
        assert any(line.startswith(f"{target}: TAMPERED") for line in bad), (
            f"{rel} not named:\n{out}"
        )
        shutil.rmtree(copy)

    removed = tmp_path / "removed"
    shutil.copytree(bundle, removed)
    (removed / folder / "audit-record.json").unlink()
    res = run("verify", str(removed), cwd=tmp_path)
    assert res.returncode == 1 and "audit-record.json: TAMPERED: missing" in res.stdout

    added = tmp_path / "added"
    shutil.copytree(bundle, added)
    (added / folder / "note.txt").write_text("inserted later")
    res = run("verify", str(added), cwd=tmp_path)
    assert res.returncode == 1 and "note.txt: TAMPERED: not listed" in res.stdout

    # A seek index a player leaves next to a bundled cast is a cache, not evidence.
    open_index(bundle / folder / "s.cast")
    assert run("verify", str(bundle), cwd=tmp_path).returncode == 0


def test_audit_record_fields_and_pci_mapping(session: tuple[Path, str], tmp_path: Path) -> None:
    work, sid = session
    bundle = tmp_path / "b"
    res = run("evidence", "--session", sid, "-o", str(bundle), "-c", "castgate.toml", cwd=work)
    assert res.returncode == 0, res.stderr
    record = json.loads((bundle / "sessions" / sid / "audit-record.json").read_text())
    fields = record["fields"]
    assert fields["identity"]["value"] and "8.2.1" in fields["identity"]["pci_dss"]
    assert fields["protocol"]["value"] == "pty" and fields["target"]["value"] == "local"
    assert fields["auth_method"]["value"] == "local"
    assert fields["exit_status"]["value"] == 0 and fields["status"]["value"] == "closed"
    assert fields["masking_counts"]["value"]["pan"] == 1
    assert "3.4.1" in fields["masking_counts"]["pci_dss"]
    commands = fields["commands"]["value"]
    assert [(c["action"], c["rule"]) for c in commands] == [
        ("block", "no-drop-database"),
        ("approve", "push-needs-approval"),
    ]
    (approval,) = fields["approvals"]["value"]
    assert approval["status"] == "approved" and "6.5.1" in fields["approvals"]["pci_dss"]
    assert approval["decisions"][0]["approver"] == "alice"
    assert approval["decisions"][0]["reason"] == "change #42"
    rec = fields["recording"]["value"]
    assert rec["verdict"] == "intact" and len(rec["file_sha256"]) == 64
    assert "10.3.4" in fields["recording"]["pci_dss"]
    reads = [e for e in fields["audit_events"]["value"] if e["kind"] == "recording.read"]
    assert reads and reads[-1]["actor"] == "auditor-ann"
    assert reads[-1]["detail"]["purpose"] == "evidence"
    for req in ("7.2.1", "8.2.1", "10.2.1.3", "10.2.2", "10.3.4", "3.4.1", "6.5.1"):
        assert record["pci_dss"][req]["fields"], req
    # The bundle never holds the raw card number.
    for path in bundle.rglob("*"):
        if path.is_file():
            assert VISA.encode() not in path.read_bytes(), path
    page = (bundle / "index.html").read_text()
    assert sid in page and "intact" in page and "alice: approve" in page


def test_time_range_selection_and_refusals(session: tuple[Path, str], tmp_path: Path) -> None:
    work, sid = session
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    res = run(
        "evidence", "--since", yesterday, "-o", str(tmp_path / "r"), "-c", "castgate.toml", cwd=work
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "r" / "sessions" / sid).is_dir()
    again = run(
        "evidence", "--since", yesterday, "-o", str(tmp_path / "r"), "-c", "castgate.toml", cwd=work
    )
    assert again.returncode == 2 and "never overwritten" in again.stderr
    empty = run(
        "evidence", "--since", "2001-01-01", "--until", "2001-01-02", "-o", str(tmp_path / "e"),
        "-c", "castgate.toml", cwd=work,
    )  # fmt: skip
    assert empty.returncode == 2 and "no sessions" in empty.stderr
    unknown = run(
        "evidence", "--session", "nope", "-o", str(tmp_path / "u"), "-c", "castgate.toml", cwd=work
    )
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1


def test_reading_by_session_is_audited(session: tuple[Path, str]) -> None:
    work, sid = session
    before = len(events(work, "recording.read"))
    res = run("export", sid, "--format", "txt", "-c", "castgate.toml", cwd=work)
    assert res.returncode == 0, res.stderr
    assert f"paying with {VISA[:6]}******{VISA[-4:]}" in res.stdout
    reads = events(work, "recording.read")
    assert len(reads) == before + 1
    last = reads[-1]
    assert last["session_id"] == sid and last["actor"] == "auditor-ann"
    assert last["outcome"] == "success" and last["detail"]["purpose"] == "export txt"  # type: ignore[index]
    missing = run("play", "no-such-session", "-c", "castgate.toml", cwd=work)
    assert missing.returncode == 2 and "no such file or session" in missing.stderr
    failed = events(work, "recording.read")[-1]
    assert failed["outcome"] == "failure" and failed["resource"] == "session no-such-session"
