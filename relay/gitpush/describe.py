"""What a held push does, read from its pack with dulwich: each ref update (created,
deleted, fast-forward, forced, tag), the commits it adds and a diffstat per update.

A push is a thin pack: its deltas and its commits' parents refer to objects only the
target has. `open_push_store` indexes the pack into a temporary dulwich store whose
alternate is `base`, a store of the target's objects (filled by `fetch`), which completes
the thin pack and answers for the old tips. Commit subjects and paths are the pusher's
raw text: the relay masks them before they leave it, as it masks everything else.
"""

from __future__ import annotations

import difflib
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from dulwich.diff_tree import tree_changes
from dulwich.object_store import BaseObjectStore, DiskObjectStore
from dulwich.objects import Commit, ObjectID, Tag, Tree

from relay.gitpush.receive import Command, PushRequest

MAX_COMMITS = 500
MAX_FILES = 500
# Blobs larger than this are not line-diffed (SequenceMatcher is quadratic at worst).
MAX_DIFF_BLOB = 1024 * 1024
_BINARY_PROBE = 8000
# Ancestry walks prune commits older than the old tip by more than this: a clock skew
# beyond it can only make a fast-forward look forced, never hide a force.
ANCESTRY_SLOP = timedelta(days=1)
MAX_WALK = 2_000_000
_FILEMODE_GITLINK = 0o160000


class DescribeError(Exception):
    """The pack could not be read into a store (damaged, or bases the store lacks)."""


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    author: str
    date: str
    subject: str


@dataclass(frozen=True)
class FileStat:
    path: str
    change: str
    added: int | None
    removed: int | None
    binary: bool = False


@dataclass
class RefUpdate:
    ref: str
    old: str
    new: str
    kind: str
    """create | delete | fast-forward | force | update (ancestry unknown: old tip missing)"""
    tag: bool = False
    commits: list[CommitInfo] = field(default_factory=list)
    commits_total: int = 0
    files: list[FileStat] = field(default_factory=list)
    files_total: int = 0
    added: int = 0
    removed: int = 0
    note: str = ""

    @property
    def forced(self) -> bool:
        return self.kind == "force"


@dataclass
class PushSummary:
    sha256: str
    size: int
    updates: list[RefUpdate]
    push_options: list[str]
    objects: int
    unreadable: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _oid(text: str) -> ObjectID:
    return ObjectID(text.encode("ascii"))


def open_push_store(request: PushRequest, base: DiskObjectStore, path: str) -> DiskObjectStore:
    """Index the held pack into a new store at `path` that falls back on `base`.

    Raises:
        DescribeError: the pack is damaged or refers to objects neither has.
    """
    Path(path).mkdir(parents=True, exist_ok=True)
    store = DiskObjectStore.init(path)
    store.add_alternate_path(base.path)
    if request.pack_offset is None:
        return store
    reader = request.held.reader(request.pack_offset)
    try:
        store.add_thin_pack(reader.read_all, reader.read)
    except Exception as exc:  # dulwich raises a dozen kinds for one damaged or thin pack
        store.close()
        raise DescribeError(f"pack not readable: {type(exc).__name__}: {exc}") from None
    return store


def describe(request: PushRequest, store: BaseObjectStore, base: BaseObjectStore) -> PushSummary:
    """What the push does. `store` has the push's objects and the target's, `base` the
    target's alone (what decides which commits are new)."""
    updates = [_safe_update(cmd, store, base) for cmd in request.commands]
    return PushSummary(
        sha256=request.sha256,
        size=request.size,
        updates=updates,
        push_options=list(request.push_options),
        objects=request.pack.objects if request.pack else 0,
    )


def unreadable(request: PushRequest, reason: str) -> PushSummary:
    """The summary of a complete push whose pack could not be read (DescribeError, or
    the target's objects could not be fetched): the ref updates as asked, no commits."""
    return PushSummary(
        sha256=request.sha256,
        size=request.size,
        updates=[
            RefUpdate(c.ref, c.old, c.new, c.kind, tag=c.ref.startswith("refs/tags/"))
            for c in request.commands
        ],
        push_options=list(request.push_options),
        objects=request.pack.objects if request.pack else 0,
        unreadable=reason,
    )


def _safe_update(cmd: Command, store: BaseObjectStore, base: BaseObjectStore) -> RefUpdate:
    """One update described, or its bare ref update with a note: an object missing from
    both stores (a shallow target, a pack that lies) never stops the others."""
    try:
        return _update(cmd, store, base)
    except (KeyError, ValueError, AssertionError) as exc:
        upd = RefUpdate(cmd.ref, cmd.old, cmd.new, cmd.kind, tag=cmd.ref.startswith("refs/tags/"))
        upd.note = f"not fully readable: {type(exc).__name__}: {exc}"[:300]
        return upd


def _update(cmd: Command, store: BaseObjectStore, base: BaseObjectStore) -> RefUpdate:
    upd = RefUpdate(cmd.ref, cmd.old, cmd.new, cmd.kind, tag=cmd.ref.startswith("refs/tags/"))
    if cmd.kind == "delete":
        return upd
    try:
        new = _peel(store, _oid(cmd.new))
    except KeyError:
        upd.note = "new tip not in the pack nor the target"
        return upd
    if new is None:
        upd.note = "new tip is not a commit"
        return upd
    added = list(_added(store, base, new))
    upd.commits_total = len(added)
    upd.commits = [_info(c) for c in added[:MAX_COMMITS]]
    old: Commit | None = None
    if cmd.kind == "update":
        try:
            old = _peel(store, _oid(cmd.old))
        except KeyError:
            old = None
        if old is None:
            upd.note = "old tip not known to the relay: ancestry unknown"
        else:
            upd.kind = "fast-forward" if _is_ancestor(store, old, new) else "force"
    if old is None:
        old = _fork_point(store, base, new)
    _diffstat(upd, store, old.tree if old is not None else None, new.tree)
    return upd


def _peel(store: BaseObjectStore, oid: ObjectID) -> Commit | None:
    obj = store[oid]
    for _ in range(32):
        if isinstance(obj, Tag):
            obj = store[obj.object[1]]
        else:
            break
    return obj if isinstance(obj, Commit) else None


def _added(store: BaseObjectStore, base: BaseObjectStore, tip: Commit) -> Iterator[Commit]:
    """Commits reachable from `tip` that the target does not have, newest first."""
    seen: set[ObjectID] = {tip.id}
    todo: deque[Commit] = deque([tip])
    while todo:
        commit = todo.popleft()
        if commit.id in base:
            continue
        yield commit
        for parent in commit.parents:
            if parent not in seen:
                seen.add(parent)
                obj = store[parent]
                if isinstance(obj, Commit):
                    todo.append(obj)


def _fork_point(store: BaseObjectStore, base: BaseObjectStore, tip: Commit) -> Commit | None:
    """The first commit on `tip`'s first-parent line that the target has: a new branch's
    diffstat is what it adds since it left the history the target knows."""
    commit = tip
    for _ in range(MAX_WALK):
        if commit.id in base:
            return commit
        if not commit.parents:
            return None
        obj = store[commit.parents[0]]
        if not isinstance(obj, Commit):
            return None
        commit = obj
    return None


def _is_ancestor(store: BaseObjectStore, old: Commit, new: Commit) -> bool:
    """Whether `old` is reachable from `new`; commits well older than `old` are not
    walked (see ANCESTRY_SLOP), so False can mean "not found in the window"."""
    floor = old.commit_time - int(ANCESTRY_SLOP.total_seconds())
    seen: set[ObjectID] = {new.id}
    todo: deque[Commit] = deque([new])
    walked = 0
    while todo and walked < MAX_WALK:
        commit = todo.popleft()
        walked += 1
        if commit.id == old.id:
            return True
        if commit.commit_time < floor:
            continue
        for parent in commit.parents:
            if parent not in seen:
                seen.add(parent)
                try:
                    obj = store[parent]
                except KeyError:
                    continue
                if isinstance(obj, Commit):
                    todo.append(obj)
    return False


def _info(commit: Commit) -> CommitInfo:
    tz = timezone(timedelta(seconds=commit.author_timezone))
    when = datetime.fromtimestamp(commit.author_time, UTC).astimezone(tz)
    message = commit.message.decode("utf-8", "replace")
    return CommitInfo(
        sha=commit.id.decode("ascii"),
        author=commit.author.decode("utf-8", "replace"),
        date=when.isoformat(),
        subject=message.strip().split("\n", 1)[0][:200] if message.strip() else "",
    )


def _diffstat(
    upd: RefUpdate, store: BaseObjectStore, old_tree: ObjectID | None, new_tree: ObjectID
) -> None:
    if old_tree is not None and not isinstance(store[old_tree], Tree):
        return
    for change in tree_changes(store, old_tree, new_tree):
        entry = change.new or change.old
        assert entry is not None
        upd.files_total += 1
        stat = _file_stat(store, change.type, change.old, change.new)
        upd.added += stat.added or 0
        upd.removed += stat.removed or 0
        if len(upd.files) < MAX_FILES:
            upd.files.append(stat)


def _blob(store: BaseObjectStore, entry: Any) -> bytes | None:
    if entry is None or entry.sha is None:
        return b""
    if entry.mode == _FILEMODE_GITLINK:
        return None
    obj = store[entry.sha]
    return obj.as_raw_string()


def _file_stat(store: BaseObjectStore, kind: str, old: Any, new: Any) -> FileStat:
    entry = new if new is not None and new.path is not None else old
    path = entry.path.decode("utf-8", "replace")
    a, b = _blob(store, old), _blob(store, new)
    if a is None or b is None:
        return FileStat(path, kind, None, None)
    if b"\0" in a[:_BINARY_PROBE] or b"\0" in b[:_BINARY_PROBE]:
        return FileStat(path, kind, None, None, binary=True)
    a_lines, b_lines = a.splitlines(), b.splitlines()
    if not a_lines or not b_lines:
        return FileStat(path, kind, len(b_lines), len(a_lines))
    if len(a) > MAX_DIFF_BLOB or len(b) > MAX_DIFF_BLOB:
        return FileStat(path, kind, None, None)
    added = removed = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a_lines, b_lines).get_opcodes():
        if op in ("replace", "delete"):
            removed += i2 - i1
        if op in ("replace", "insert"):
            added += j2 - j1
    return FileStat(path, kind, added, removed)
