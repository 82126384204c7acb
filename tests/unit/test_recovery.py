"""Crash recovery of unsealed casts, and verification of unsealed casts against the
store's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from recorder.integrity import Verdict, chain_path, manifest_path, verify_cast
from recorder.recording import CastWriter
from recorder.recovery import REASON, recover_cast, recover_crashed
from recorder.signing import SigningKey
from recorder.store import Store

KEY = SigningKey.generate()


class Crashed:
    """A cast as a killed relay leaves it: the first ``synced`` events fsynced and
    checkpointed, more written after, no manifest."""

    def __init__(self, path: Path, synced: int = 10, later: int = 5, sid: str = "s1") -> None:
        self.path = path
        self.checkpoints: list[tuple[int, str]] = []
        w = CastWriter(
            path,
            width=80,
            height=24,
            session_id=sid,
            signing_key=KEY,
            fsync_interval=1e9,
            on_checkpoint=lambda n, h: self.checkpoints.append((n, h)),
        )
        for i in range(synced):
            w.output(f"synced {i}\r\n".encode())
        w.sync()
        for i in range(later):
            w.output(f"later {i}\r\n".encode())
        w.abort()

    @property
    def checkpoint(self) -> tuple[int, str]:
        return self.checkpoints[-1]

    def lines(self) -> list[bytes]:
        return self.path.read_bytes().split(b"\n")[:-1]


def test_unsealed_cast_is_authentic_up_to_the_checkpoint(tmp_path: Path) -> None:
    c = Crashed(tmp_path / "a.cast")
    report = verify_cast(c.path, KEY.public, lambda sid: c.checkpoint if sid == "s1" else None)
    assert report.verdict is Verdict.UNSEALED and report.verdict.exit_code == 1
    assert "authentic up to the last fsync: lines 1-11" in report.message
    assert "5 later line(s) not covered" in report.message


def test_unsealed_cast_changed_before_the_checkpoint_is_tampered(tmp_path: Path) -> None:
    c = Crashed(tmp_path / "a.cast")
    # Rewrite line 3 and the chain file consistently: the chain file alone cannot
    # tell, the store's checkpoint can.
    lines = c.lines()
    lines[2] = lines[2].replace(b"synced 1", b"forged 1")
    c.path.write_bytes(b"\n".join(lines) + b"\n")
    from recorder.integrity import CHAIN_ENTRY, HashChain

    chain = HashChain()
    chain_path(c.path).write_bytes(b"".join(chain.add(x)[:CHAIN_ENTRY] for x in lines))
    assert verify_cast(c.path, KEY.public).verdict is Verdict.UNSEALED
    report = verify_cast(c.path, KEY.public, lambda sid: c.checkpoint)
    assert report.verdict is Verdict.TAMPERED, report.line()
    assert "do not chain to the store's checkpoint" in report.message


def test_unsealed_cast_missing_checkpointed_lines_is_truncated(tmp_path: Path) -> None:
    c = Crashed(tmp_path / "a.cast", later=0)
    c.path.write_bytes(b"\n".join(c.lines()[:6]) + b"\n")
    report = verify_cast(c.path, KEY.public, lambda sid: c.checkpoint)
    assert report.verdict is Verdict.TRUNCATED and report.first_bad_line == 7


def test_recovery_keeps_consistent_lines_and_drops_a_torn_one(tmp_path: Path) -> None:
    c = Crashed(tmp_path / "a.cast")
    with c.path.open("ab") as fh:
        fh.write(b'[9.5, "o", "cut mid-wr')
    result = recover_cast(c.path, KEY, c.checkpoint)
    assert result.sealed and result.problem is None
    assert (result.lines, result.checkpoint_lines, result.dropped_lines) == (16, 11, 1)
    assert c.path.read_bytes().endswith(b'"later 4\\r\\n"]\n')
    assert len(chain_path(c.path).read_bytes()) == 16 * 8
    manifest = json.loads(manifest_path(c.path).read_text())
    assert manifest["end_reason"].startswith(REASON) and "16 lines kept" in manifest["end_reason"]
    assert manifest["recovered"]["checkpoint_lines"] == 11
    report = verify_cast(c.path, KEY.public)
    assert report.verdict is Verdict.TRUNCATED_AUTHENTIC, report.line()
    assert report.verdict.exit_code == 1 and report.lines == 16
    assert "TRUNCATED-AUTHENTIC" in report.line()
    # A recovered cast is as tamper-evident as any sealed one.
    data = bytearray(c.path.read_bytes())
    data[data.index(b"later 2")] = ord("L")
    c.path.write_bytes(bytes(data))
    assert verify_cast(c.path, KEY.public).verdict is Verdict.TAMPERED


def test_recovery_stops_where_the_chain_file_disagrees(tmp_path: Path) -> None:
    c = Crashed(tmp_path / "a.cast")
    lines = c.lines()
    lines[12] = lines[12].replace(b"later 1", b"LATER 1")  # line 13, after the checkpoint
    c.path.write_bytes(b"\n".join(lines) + b"\n")
    result = recover_cast(c.path, KEY, c.checkpoint)
    assert result.sealed and (result.lines, result.dropped_lines) == (12, 4)
    assert verify_cast(c.path, KEY.public).verdict is Verdict.TRUNCATED_AUTHENTIC


def test_recovery_refuses_a_cast_changed_before_the_checkpoint(tmp_path: Path) -> None:
    c = Crashed(tmp_path / "a.cast")
    lines = c.lines()
    lines[4] = lines[4].replace(b"synced 3", b"forged 3")
    c.path.write_bytes(b"\n".join(lines) + b"\n")
    before = c.path.read_bytes()
    result = recover_cast(c.path, KEY, c.checkpoint)
    assert not result.sealed and "do not chain to the store's checkpoint" in str(result.problem)
    assert c.path.read_bytes() == before and not manifest_path(c.path).exists()


def test_recovery_without_a_checkpoint_keeps_the_consistent_lines(tmp_path: Path) -> None:
    c = Crashed(tmp_path / "a.cast")
    result = recover_cast(c.path, KEY, None)
    assert result.sealed and (result.lines, result.checkpoint_lines) == (16, 0)
    assert verify_cast(c.path, KEY.public).verdict is Verdict.TRUNCATED_AUTHENTIC


def test_recover_crashed_ends_live_sessions_and_leaves_deliberate_aborts(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        crashed = {}
        for sid, status in (
            ("live1", None),
            ("peer-interrupted", "interrupted"),
            ("failed", "recording failed"),
        ):
            store.create_session(sid, "ci-agent", "web", "ssh", node="n1")
            c = crashed[sid] = Crashed(recordings / f"{sid}.cast", sid=sid)
            store.add_checkpoint(sid, *c.checkpoint)
            if status is not None:
                store.end_session(sid, status=status)
        store.create_session("other-node", "ci-agent", "web", "ssh", node="n2")
        Crashed(recordings / "other-node.cast", sid="other-node")

        results = {r.session_id: r for r in recover_crashed(store, recordings, KEY, "n1")}

        assert set(results) == {"live1", "peer-interrupted"}
        assert all(r.sealed for r in results.values())
        row = store.get_session("live1")
        assert row is not None and row["status"] == "interrupted" and row["lines"] == 16
        assert store.get_manifest("live1") == json.loads(
            manifest_path(recordings / "live1.cast").read_text()
        )
        assert store.get_manifest("peer-interrupted") is not None
        assert not manifest_path(recordings / "failed.cast").exists()
        assert not manifest_path(recordings / "other-node.cast").exists()
        events = store.list_events(kind="recording.recovered")
        assert {e["session_id"] for e in events} == {"live1", "peer-interrupted"}
        assert all(e["outcome"] == "success" and e["detail"]["lines"] == 16 for e in events)
        # Idempotent: a second start finds nothing left to do.
        assert recover_crashed(store, recordings, KEY, "n1") == []


def test_recover_crashed_reports_a_cast_it_refuses_to_seal(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.create_session("forged", "ci-agent", "web", "ssh", node="n1")
        c = Crashed(recordings / "forged.cast", sid="forged")
        store.add_checkpoint("forged", *c.checkpoint)
        lines = c.lines()
        lines[3] = lines[3].replace(b"synced 2", b"forged 2")
        c.path.write_bytes(b"\n".join(lines) + b"\n")

        (result,) = recover_crashed(store, recordings, KEY, "n1")

        assert not result.sealed and not manifest_path(c.path).exists()
        (event,) = store.list_events(kind="recording.recovered")
        assert event["outcome"] == "failure" and event["resource"] == "session:forged"
        assert "do not chain to the store's checkpoint" in event["detail"]["problem"]
        row = store.get_session("forged")
        assert row is not None and row["ended_at"] is None  # interrupt_stale ends it


def test_sync_pass_checkpoints_casts_that_grew_since_the_last_pass(tmp_path: Path) -> None:
    """The relay's periodic pass: a session that fell silent (held for an approval) gets
    its last events fsynced and checkpointed without waiting for its next event."""
    from types import SimpleNamespace

    from relay.cast_sync import sync_pass

    checkpoints: list[int] = []
    w = CastWriter(
        tmp_path / "a.cast",
        width=80,
        height=24,
        session_id="s1",
        signing_key=KEY,
        fsync_interval=1e9,  # never by itself
        on_checkpoint=lambda n, h: checkpoints.append(n),
    )
    w.marker("approval #1 requested (rule r)")
    ctx = SimpleNamespace(live={"s1": SimpleNamespace(rec=SimpleNamespace(writer=w))})
    seen = sync_pass(ctx, {})  # type: ignore[arg-type]
    assert checkpoints == [2]
    seen = sync_pass(ctx, seen)  # type: ignore[arg-type]
    assert checkpoints == [2]  # nothing new, no fsync
    w.marker("approval #1 granted by alice")
    sync_pass(ctx, seen)  # type: ignore[arg-type]
    assert checkpoints == [2, 3]
    w.abort()
