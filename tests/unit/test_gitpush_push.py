"""The receive-pack machine and the push description on pushes made by the real git.

Each push goes to a real `git receive-pack` through a wrapper that copies both
directions to files: the client's bytes are exactly what the relay would hold. The
target's objects are fetched before the push with a real `git upload-pack`, as the relay
would fetch them over a second channel.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dulwich.object_store import DiskObjectStore

from relay.gitpush.describe import (
    DescribeError,
    PushSummary,
    describe,
    open_push_store,
    unreadable,
)
from relay.gitpush.fetchio import FetchResult, fetch_into
from relay.gitpush.pktline import PktDecoder
from relay.gitpush.receive import ReceivePack, State

_CAPTURE = """#!/bin/sh
tee "$CAP_IN" | git receive-pack "$1" | tee "$CAP_OUT"
"""


@dataclass
class Captured:
    advert: bytes
    client: Path
    answer: bytes


def split_advert(out: bytes) -> tuple[bytes, bytes]:
    """The target's advertisement (up to its flush) and what it sent after."""
    dec = PktDecoder()
    dec.feed(out)
    for pkt in dec.packets():
        if pkt.data is None:
            break
    rest = dec.rest()
    return out[: len(out) - len(rest)], rest


class GitWorld:
    """A bare target, a working clone and the means to capture pushes between them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.target = root / "target.git"
        self.work = root / "work"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
            "HOME": str(root),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "Ada Pusher",
            "GIT_AUTHOR_EMAIL": "ada@example.test",
            "GIT_COMMITTER_NAME": "Ada Pusher",
            "GIT_COMMITTER_EMAIL": "ada@example.test",
            "GIT_AUTHOR_DATE": "2026-01-02T03:04:05+01:00",
            "GIT_COMMITTER_DATE": "2026-01-02T03:04:05+01:00",
        }
        self.git("init", "-q", "--bare", str(self.target))
        self.git("init", "-q", "-b", "main", str(self.work))
        self.wrapper = root / "capture.sh"
        self.wrapper.write_text(_CAPTURE)
        self.wrapper.chmod(0o755)
        self.pushes = 0
        self.stores: list[DiskObjectStore] = []

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def git(self, *args: str, cwd: Path | None = None) -> str:
        res = subprocess.run(
            ["git", *args], cwd=cwd, env=self.env, capture_output=True, timeout=120
        )
        assert res.returncode == 0, res.stderr.decode()
        return res.stdout.decode()

    def commit(self, subject: str, files: dict[str, bytes | None] | None = None) -> str:
        for rel, data in (files or {}).items():
            path = self.work / rel
            if data is None:
                path.unlink()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.git("add", "-A", cwd=self.work)
        self.git("commit", "-q", "--allow-empty", "-m", subject, cwd=self.work)
        return self.head()

    def head(self, rev: str = "HEAD") -> str:
        return self.git("rev-parse", rev, cwd=self.work).strip()

    def target_ref(self, ref: str) -> str:
        return self.git("--git-dir", str(self.target), "rev-parse", ref).strip()

    def push(self, *args: str) -> Captured:
        self.pushes += 1
        cin = self.root / f"push{self.pushes}.in"
        cout = self.root / f"push{self.pushes}.out"
        env = {**self.env, "CAP_IN": str(cin), "CAP_OUT": str(cout)}
        res = subprocess.run(
            ["git", "push", "-q", f"--receive-pack={self.wrapper}", str(self.target), *args],
            cwd=self.work,
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr.decode()
        advert, answer = split_advert(cout.read_bytes())
        return Captured(advert, cin, answer)

    def base(self, name: str = "base") -> DiskObjectStore:
        """The target's objects now, fetched with the real upload-pack."""
        store = DiskObjectStore.init(str(self.root / name))
        self.stores.append(store)
        self.fetch(store)
        return store

    def fetch(self, store: DiskObjectStore, haves: list[str] | None = None) -> FetchResult:
        async def run() -> FetchResult:
            proc = await asyncio.create_subprocess_exec(
                "git",
                "upload-pack",
                str(self.target),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=self.env,
            )
            assert proc.stdin is not None and proc.stdout is not None
            result = await fetch_into(proc.stdout, proc.stdin, store, haves=haves or ())
            proc.stdin.close()
            assert await proc.wait() == 0
            return result

        return asyncio.run(run())


def hold(cap: Captured, chunk: int = 4096, **kw: int) -> ReceivePack:
    machine = ReceivePack(**kw)
    machine.target_bytes(cap.advert)
    assert machine.state is State.COMMANDS, machine.opaque_reason
    with cap.client.open("rb") as f:
        while data := f.read(chunk):
            machine.client_bytes(data)
    return machine


def summary(world: GitWorld, machine: ReceivePack, base: DiskObjectStore) -> PushSummary:
    assert machine.complete, machine.opaque_reason
    store = open_push_store(machine.request, base, str(world.root / f"push{world.pushes}"))
    world.stores.append(store)
    return describe(machine.request, store, base)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[GitWorld]:
    w = GitWorld(tmp_path)
    yield w
    w.close()


def test_new_branch_to_an_empty_target(world: GitWorld) -> None:
    world.commit("add readme", {"README": b"hello\n"})
    tip = world.commit("add app", {"app.py": b"print(1)\nprint(2)\n"})
    base = world.base()
    cap = world.push("main")
    machine = hold(cap, chunk=7)
    req = machine.request
    assert [(c.kind, c.ref, c.new) for c in req.commands] == [("create", "refs/heads/main", tip)]
    assert "report-status" in req.caps or "report-status-v2" in req.caps
    assert req.pack is not None and req.pack.by_type["commit"] == 2
    raw = cap.client.read_bytes()
    assert b"".join(req.forward()) == raw
    assert req.sha256 == hashlib.sha256(raw).hexdigest()
    (upd,) = summary(world, machine, base).updates
    assert upd.kind == "create"
    assert [c.subject for c in upd.commits] == ["add app", "add readme"]
    assert upd.commits[0].author == "Ada Pusher <ada@example.test>"
    assert upd.commits[0].date == "2026-01-02T03:04:05+01:00"
    assert {(f.path, f.added, f.removed) for f in upd.files} == {("README", 1, 0), ("app.py", 2, 0)}


def test_fast_forward_and_diffstat(world: GitWorld) -> None:
    old = world.commit("base", {"a.txt": b"one\ntwo\nthree\n", "gone.txt": b"x\n"})
    world.push("main")
    new = world.commit("edit", {"a.txt": b"one\n2\nthree\nfour\n", "gone.txt": None})
    base = world.base()
    machine = hold(world.push("main"))
    (upd,) = summary(world, machine, base).updates
    assert (upd.old, upd.new, upd.kind) == (old, new, "fast-forward")
    assert [c.subject for c in upd.commits] == ["edit"]
    stats = {f.path: (f.change, f.added, f.removed) for f in upd.files}
    assert stats == {"a.txt": ("modify", 2, 1), "gone.txt": ("delete", 0, 1)}
    assert (upd.added, upd.removed) == (2, 2)


def test_force_push_is_marked(world: GitWorld) -> None:
    world.commit("one", {"f": b"1\n"})
    world.commit("two", {"f": b"2\n"})
    world.push("main")
    world.git("reset", "-q", "--hard", "HEAD~1", cwd=world.work)
    world.commit("two, rewritten", {"f": b"two\n"})
    base = world.base()
    machine = hold(world.push("--force", "main"))
    (upd,) = summary(world, machine, base).updates
    assert upd.kind == "force" and upd.forced
    assert [c.subject for c in upd.commits] == ["two, rewritten"]
    assert {(f.path, f.added, f.removed) for f in upd.files} == {("f", 1, 1)}


def test_delete_only_push_has_no_pack(world: GitWorld) -> None:
    world.commit("one")
    world.git("branch", "doomed", cwd=world.work)
    world.push("main", "doomed")
    base = world.base()
    cap = world.push("--delete", "doomed")
    machine = hold(cap)
    assert machine.complete
    assert machine.request.pack_offset is None and machine.request.pack is None
    (upd,) = summary(world, machine, base).updates
    assert (upd.ref, upd.kind) == ("refs/heads/doomed", "delete")


def test_tags_and_several_refs_at_once(world: GitWorld) -> None:
    world.commit("one", {"f": b"1\n", "README": b"untouched\n"})
    world.push("main")
    world.commit("two", {"f": b"1\n2\n"})
    world.git("tag", "-a", "v1", "-m", "release 1", cwd=world.work)
    world.git("tag", "light", cwd=world.work)
    world.git("checkout", "-q", "-b", "feature", cwd=world.work)
    world.commit("feature work", {"g": b"g\n"})
    base = world.base()
    machine = hold(world.push("main", "feature", "refs/tags/v1", "refs/tags/light"))
    ups = {u.ref: u for u in summary(world, machine, base).updates}
    assert set(ups) == {"refs/heads/main", "refs/heads/feature", "refs/tags/v1", "refs/tags/light"}
    assert ups["refs/heads/main"].kind == "fast-forward"
    assert ups["refs/heads/feature"].kind == "create"
    assert [c.subject for c in ups["refs/heads/feature"].commits] == ["feature work", "two"]
    # The new branch's diffstat is what it adds since the history the target has.
    assert {f.path for f in ups["refs/heads/feature"].files} == {"f", "g"}
    assert ups["refs/tags/v1"].tag and ups["refs/tags/v1"].kind == "create"
    assert [c.subject for c in ups["refs/tags/v1"].commits] == ["two"]
    assert ups["refs/tags/light"].tag
    assert machine.request.pack is not None
    assert machine.request.pack.by_type.get("tag") == 1


def test_thin_pack_resolved_against_the_target(world: GitWorld) -> None:
    body = b"".join(
        b"line %d of a file long enough to be sent as a delta\n" % i for i in range(3000)
    )
    world.commit("big file", {"big.txt": body})
    world.push("main")
    world.commit("one line", {"big.txt": body.replace(b"line 1500 ", b"LINE 1500 ")})
    base = world.base()
    machine = hold(world.push("main"))
    pack = machine.request.pack
    assert pack is not None and pack.ref_delta_bases >= 1, pack  # thin: a base outside the pack
    (upd,) = summary(world, machine, base).updates
    assert upd.kind == "fast-forward"
    assert {(f.path, f.added, f.removed) for f in upd.files} == {("big.txt", 1, 1)}


def test_thin_pack_without_the_target_objects_is_unreadable(world: GitWorld) -> None:
    body = b"".join(b"row %d, padding padding padding padding\n" % i for i in range(3000))
    world.commit("big file", {"big.txt": body})
    world.push("main")
    world.commit("one line", {"big.txt": body + b"tail\n"})
    empty = DiskObjectStore.init(str(world.root / "empty"))
    world.stores.append(empty)
    machine = hold(world.push("main"))
    with pytest.raises(DescribeError, match="pack not readable") as err:
        open_push_store(machine.request, empty, str(world.root / "p"))
    shown = unreadable(machine.request, str(err.value))
    (upd,) = shown.updates
    assert (upd.ref, upd.kind, upd.commits) == ("refs/heads/main", "update", [])
    assert shown.unreadable.startswith("pack not readable")


def test_empty_commit_and_existing_commit_on_a_new_branch(world: GitWorld) -> None:
    world.commit("one", {"f": b"1\n"})
    world.push("main")
    world.commit("nothing changed")
    world.git("branch", "same", "HEAD~1", cwd=world.work)
    base = world.base()
    machine = hold(world.push("main", "same"))
    ups = {u.ref: u for u in summary(world, machine, base).updates}
    main = ups["refs/heads/main"]
    assert main.kind == "fast-forward"
    assert [c.subject for c in main.commits] == ["nothing changed"] and main.files == []
    same = ups["refs/heads/same"]
    assert same.kind == "create" and same.commits == [] and same.files == []


def test_push_options_and_protocol_v1(world: GitWorld) -> None:
    world.git("--git-dir", str(world.target), "config", "receive.advertisePushOptions", "true")
    world.commit("one", {"f": b"1\n"})
    world.env["GIT_PROTOCOL"] = "version=1"
    world.env["GIT_CONFIG_PARAMETERS"] = "'protocol.version=1'"
    cap = world.push("-o", "ci.skip", "-o", "reviewer=bob", "main")
    assert cap.advert.startswith(b"000eversion 1\n")
    machine = hold(cap)
    assert machine.complete, machine.opaque_reason
    assert machine.request.push_options == ["ci.skip", "reviewer=bob"]
    assert machine.request.advertisement.version == 1


def test_fifty_megabyte_pack_is_spooled_with_memory_bounded(world: GitWorld) -> None:
    blob = os.urandom(50 * 1024 * 1024)
    world.commit("a large binary", {"blob.bin": blob})
    del blob
    base = world.base()
    cap = world.push("main")
    size = cap.client.stat().st_size
    assert size > 50 * 1024 * 1024
    tracemalloc.start()
    try:
        machine = hold(cap, chunk=64 * 1024, memory_limit=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert machine.complete and machine.request.held.spooled
    assert peak < 4 * 1024 * 1024, peak
    digest = hashlib.sha256()
    for chunk in machine.request.forward():
        digest.update(chunk)
    with cap.client.open("rb") as f:
        assert digest.hexdigest() == hashlib.file_digest(f, "sha256").hexdigest()
    assert machine.request.sha256 == digest.hexdigest()
    (upd,) = summary(world, machine, base).updates
    (stat,) = upd.files
    assert (stat.path, stat.binary) == ("blob.bin", True)
    machine.close()


def test_push_from_a_shallow_clone_sends_shallow_lines(world: GitWorld) -> None:
    for i in range(3):
        world.commit(f"c{i}", {"f": b"%d\n" % i})
    world.push("main")
    shallow = world.root / "shallow"
    world.git("clone", "-q", "--depth", "1", "-b", "main", f"file://{world.target}", str(shallow))
    graft = world.target_ref("refs/heads/main")
    world.work = shallow
    world.commit("from a shallow clone", {"f": b"3\n"})
    base = world.base()
    machine = hold(world.push("main"))
    assert machine.request.shallow == [graft]
    (upd,) = summary(world, machine, base).updates
    assert upd.kind == "fast-forward"
    assert [c.subject for c in upd.commits] == ["from a shallow clone"]


def test_a_kept_store_fetches_only_what_changed(world: GitWorld) -> None:
    big = os.urandom(200_000)
    world.commit("large", {"big.bin": big})
    world.push("main")
    store = DiskObjectStore.init(str(world.root / "kept"))
    world.stores.append(store)
    first = world.fetch(store)
    assert first.pack_bytes > 200_000
    tip = world.commit("small", {"small.txt": b"s\n"})
    world.push("main")
    again = world.fetch(store, haves=first.tips)
    assert again.wants == [tip] and again.pack_bytes < 2_000
    assert tip.encode() in store
    unchanged = world.fetch(store, haves=again.tips)
    assert unchanged.wants == [] and unchanged.pack_bytes == 0


def test_objects_missing_from_both_stores_give_a_note_not_a_crash(world: GitWorld) -> None:
    world.commit("one", {"f": b"1\n"})
    world.push("main")
    world.commit("empty on top")
    empty = DiskObjectStore.init(str(world.root / "empty"))
    world.stores.append(empty)
    machine = hold(world.push("main"))
    store = open_push_store(machine.request, empty, str(world.root / "p"))
    world.stores.append(store)
    (upd,) = describe(machine.request, store, empty).updates
    assert upd.ref == "refs/heads/main" and upd.note.startswith("not fully readable: KeyError")
