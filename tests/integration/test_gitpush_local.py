"""A real `git push` to a real `git receive-pack`, held by the gitpush machine in between.

The harness below is what the SSH relay's hook will do, with pipes instead of SSH
channels: `git push --receive-pack=<harness>` starts it in place of receive-pack; it
fetches the target's objects with a real `git upload-pack`, starts the real
`git receive-pack`, passes the advertisement through, holds the client's request until
it is complete, writes what the push does to a JSON file, then forwards the held bytes
(approve) or answers with git's own refusal (deny).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from dulwich.object_store import DiskObjectStore

from relay.gitpush.describe import describe, open_push_store
from relay.gitpush.fetchio import fetch_into
from relay.gitpush.receive import ReceivePack, State
from relay.gitpush.report import TARGET_CANCEL, refusal
from tests.unit.test_gitpush_push import GitWorld

ROOT = Path(__file__).resolve().parents[2]
_READ = 64 * 1024


def _fetch_base(path: str, store: DiskObjectStore) -> None:
    async def run() -> None:
        # git passes GIT_PROTOCOL=version=2 to its transport; the fetch speaks v0 (the
        # relay's own channel sends no GIT_PROTOCOL either).
        env = {k: v for k, v in os.environ.items() if k != "GIT_PROTOCOL"}
        proc = await asyncio.create_subprocess_exec(
            "git", "upload-pack", path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        assert proc.stdin is not None and proc.stdout is not None
        await fetch_into(proc.stdout, proc.stdin, store)
        proc.stdin.close()
        await proc.wait()

    asyncio.run(run())


def harness_main() -> int:
    """receive-pack stand-in: argv[1] is the repository; CG_DECISION approve|deny,
    CG_REASON the refusal, CG_SUMMARY where the description goes."""
    path = sys.argv[1]
    out = os.environ["CG_SUMMARY"]
    with tempfile.TemporaryDirectory(prefix="cg-push-") as tmp:
        base = DiskObjectStore.init(Path(tmp) / "base")
        _fetch_base(path, base)
        target = subprocess.Popen(
            ["git", "receive-pack", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert target.stdin is not None and target.stdout is not None
        machine = ReceivePack(memory_limit=256 * 1024, spool_dir=tmp)
        while machine.state is State.ADVERTISEMENT:
            data = os.read(target.stdout.fileno(), _READ)
            if not data:
                break
            machine.target_bytes(data)
            os.write(1, data)
        while not machine.complete and not machine.opaque:
            data = os.read(0, _READ)
            if not data:
                machine.client_eof()
                break
            machine.client_bytes(data)
        if not machine.complete:
            Path(out).write_text(json.dumps({"opaque": machine.opaque_reason or "cut short"}))
            target.stdin.close()
            target.wait()
            return 1
        req = machine.request
        store = open_push_store(req, base, str(Path(tmp) / "push"))
        Path(out).write_text(json.dumps(describe(req, store, base).as_dict()))
        store.close()
        base.close()
        if os.environ["CG_DECISION"] == "approve":
            for chunk in req.forward():
                target.stdin.write(chunk)
            target.stdin.close()
            while data := os.read(target.stdout.fileno(), _READ):
                os.write(1, data)
            machine.close()
            return target.wait()
        os.write(1, refusal(req, os.environ["CG_REASON"]))
        target.stdin.write(TARGET_CANCEL)
        target.stdin.close()
        target.wait()
        machine.close()
        return 0


class Harness:
    def __init__(self, world: GitWorld) -> None:
        self.world = world
        self.script = world.root / "held-receive-pack"
        self.script.write_text(
            "#!/bin/sh\n"
            f"cd {ROOT} && exec {sys.executable} -c "
            "'from tests.integration.test_gitpush_local import harness_main as m; "
            'raise SystemExit(m())\' "$@"\n'
        )
        self.script.chmod(0o755)
        self.summary_file = world.root / "summary.json"

    def push(
        self, *args: str, decision: str, reason: str = ""
    ) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
        self.summary_file.unlink(missing_ok=True)
        env = {
            **self.world.env,
            "CG_DECISION": decision,
            "CG_REASON": reason,
            "CG_SUMMARY": str(self.summary_file),
        }
        res = subprocess.run(
            ["git", "push", f"--receive-pack={self.script}", str(self.world.target), *args],
            cwd=self.world.work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert self.summary_file.exists(), res.stderr
        summary: dict[str, object] = json.loads(self.summary_file.read_text())
        return res, summary


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(GitWorld(tmp_path))


def _rev_list(world: GitWorld, ref: str) -> list[str]:
    return world.git("--git-dir", str(world.target), "rev-list", ref).split()


def test_approved_push_lands_exactly(harness: Harness) -> None:
    world = harness.world
    world.commit("first", {"README": b"hello\n"})
    res, summary = harness.push("main", decision="approve")
    assert res.returncode == 0, res.stderr
    world.commit("second", {"README": b"hello\nworld\n", "src/app.py": b"x = 1\n"})
    tip = world.commit("third", {"src/app.py": b"x = 2\n"})
    res, summary = harness.push("main", decision="approve")
    assert res.returncode == 0, res.stderr
    assert world.target_ref("refs/heads/main") == tip
    assert _rev_list(world, "main") == world.git("rev-list", "HEAD", cwd=world.work).split()
    world.git("--git-dir", str(world.target), "fsck", "--strict")
    (upd,) = summary["updates"]  # type: ignore[misc]
    assert upd["ref"] == "refs/heads/main" and upd["kind"] == "fast-forward"
    assert [c["subject"] for c in upd["commits"]] == ["third", "second"]
    stats = {f["path"]: (f["added"], f["removed"]) for f in upd["files"]}
    assert stats == {"README": (1, 0), "src/app.py": (1, 0)}


def test_denied_push_fails_with_the_reason(harness: Harness) -> None:
    world = harness.world
    before = world.commit("first", {"f": b"1\n"})
    assert harness.push("main", decision="approve")[0].returncode == 0
    world.commit("sneaky", {"f": b"2\n"})
    res, summary = harness.push("main", decision="deny", reason="denied by alice: not today")
    assert res.returncode != 0
    assert "[remote rejected] main -> main (denied by alice: not today)" in res.stderr
    assert "remote: castgate: denied by alice: not today" in res.stderr
    assert "hung up" not in res.stderr
    assert world.target_ref("refs/heads/main") == before
    (upd,) = summary["updates"]  # type: ignore[misc]
    assert [c["subject"] for c in upd["commits"]] == ["sneaky"]


def test_force_push_is_marked_and_lands_when_approved(harness: Harness) -> None:
    world = harness.world
    world.commit("one", {"f": b"1\n"})
    world.commit("two", {"f": b"2\n"})
    assert harness.push("main", decision="approve")[0].returncode == 0
    world.git("reset", "-q", "--hard", "HEAD~1", cwd=world.work)
    tip = world.commit("rewritten", {"f": b"again\n"})
    res, summary = harness.push("--force", "main", decision="approve")
    assert res.returncode == 0, res.stderr
    (upd,) = summary["updates"]  # type: ignore[misc]
    assert upd["kind"] == "force"
    assert world.target_ref("refs/heads/main") == tip


def test_atomic_multi_ref_denial_rejects_every_ref(harness: Harness) -> None:
    world = harness.world
    world.commit("one", {"f": b"1\n"})
    world.git("branch", "other", cwd=world.work)
    res, _ = harness.push("--atomic", "main", "other", decision="deny", reason="no")
    assert res.returncode != 0
    assert "[remote rejected] main -> main (no)" in res.stderr
    assert "[remote rejected] other -> other (no)" in res.stderr
    assert world.git("--git-dir", str(world.target), "for-each-ref").strip() == ""
