"""Audit store writes that outlive a store outage.

Every write the relay makes goes through :class:`StoreSpool`. While the store answers,
a write goes straight to it. When the store fails for a connection-level reason (refused,
lost, timed out, locked: :func:`store_unavailable`), the write is appended to an on-disk
spool instead: ``DIR/ops.jsonl``, one JSON object per line, fsynced, mode 0600. From then
on every later write is appended too, so the store receives writes in the order they
were made (a command row never arrives before its session row). :meth:`StoreSpool.replay`
applies the spool in order once the store is back and removes it when it is empty; the
relay runs it in the background and once at start, so a spool left by a stopped or
killed relay is replayed by the next one.

Timestamps are taken when the write is made, not when it is replayed, so a replayed row
says when things happened. ``add_command`` returns the command's id; while the store is
away it returns a negative placeholder, which ``finish_command`` accepts and the replay
maps to the real id.

Replay is idempotent where the rows allow it without a schema change: a write that
committed but whose acknowledgement was lost (the connection died after COMMIT) is
found on replay and not applied twice. Sessions are looked up by id, events by their
time, kind, session and content, commands by session, time and text, checkpoints by
line count; manifests and approval statuses are written idempotently by the store
itself. The residual case is ``finish_command``: its ``finished_at`` is the time of the
replay (the store method takes no time).

A write the store refuses for any other reason (a bug, a constraint) is moved to
``DIR/rejected.jsonl`` with the error, so one bad write cannot hold back the others;
nothing is silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy.exc as sa_exc

from recorder.store.store import Store, StoreError

__all__ = ["StoreSpool", "store_unavailable"]

log = logging.getLogger("castgate.spool")

OPS_FILE = "ops.jsonl"
DONE_FILE = "done.jsonl"
REJECTED_FILE = "rejected.jsonl"
# A connection-level error on the same write while the store answers other queries
# means the write itself is the problem: set aside after this many attempts.
_POISON_ATTEMPTS = 3
_DT = "$dt"

_UNAVAILABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)


def store_unavailable(exc: BaseException) -> bool:
    """True when a store error says the store cannot be reached or cannot write now
    (connection refused or lost, pool timeout, database locked or read-only), rather
    than that the write itself is wrong."""
    cause = exc.__cause__ if isinstance(exc, StoreError) else exc
    if cause is None:
        return False
    return isinstance(cause, _UNAVAILABLE) or bool(getattr(cause, "connection_invalidated", False))


def _now() -> datetime:
    return datetime.now(UTC)


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {_DT: value.isoformat()}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot spool a {type(value).__name__}")


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _DT in obj:
        return datetime.fromisoformat(obj[_DT])
    return obj


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=_encode, separators=(",", ":"), ensure_ascii=False).encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Reject(Exception):
    """A spooled write that can never be applied."""


# -- replay: has this write already reached the store? -----------------------------------
# Each check returns (True, result) when the row is there, (False, None) when not.

Check = Callable[[Store, dict[str, Any]], tuple[bool, Any]]


def _event_there(store: Store, a: dict[str, Any]) -> tuple[bool, Any]:
    at: datetime = a["at"]
    sid = a.get("session_id")
    for ev in store.list_events(
        kind=a["kind"], session_id=sid, since=at, until=at + timedelta(microseconds=1)
    ):
        if (ev["session_id"], ev["actor"], ev["outcome"], ev["origin"], ev["resource"]) == (
            sid,
            a.get("actor"),
            a.get("outcome"),
            a.get("origin"),
            a.get("resource"),
        ) and ev["detail"] == a.get("detail"):
            return True, ev["id"]
    return False, None


def _session_there(store: Store, a: dict[str, Any]) -> tuple[bool, Any]:
    return store.get_session(a["id"]) is not None, None


def _session_ended(store: Store, a: dict[str, Any]) -> tuple[bool, Any]:
    row = store.get_session(a["id"])
    return row is not None and row["ended_at"] is not None, None


def _command_there(store: Store, a: dict[str, Any]) -> tuple[bool, Any]:
    for row in store.list_commands(a["session_id"]):
        if row["at"] == a["at"] and row["text"] == a["text"] and row["kind"] == a["kind"]:
            return True, row["id"]
    return False, None


def _checkpoint_there(store: Store, a: dict[str, Any]) -> tuple[bool, Any]:
    # Checkpoints of a session only grow: one covering as many lines is this one.
    latest = store.latest_checkpoint(a["session_id"])
    return latest is not None and latest["lines"] >= a["lines"], None


_CHECKS: dict[str, Check] = {
    "add_event": _event_there,
    "create_session": _session_there,
    "end_session": _session_ended,
    "add_command": _command_there,
    "add_checkpoint": _checkpoint_there,
}


class StoreSpool:
    """The one way the relay writes to its audit store (see the module docstring).

    Thread-safe: the relay calls it from worker threads (``asyncio.to_thread``) and from
    the cast writer threads (checkpoints).

    Args:
        store: the audit store; reads go to it directly.
        directory: where the spool lives (``data_dir/spool``); created 0700 when first
            needed.
    """

    def __init__(self, store: Store, directory: Path) -> None:
        self.store = store
        self.directory = directory
        self._lock = threading.Lock()
        self._replaying = threading.Lock()
        self._stopping = threading.Event()
        self._queue: deque[dict[str, Any]] = deque()
        self._refs: dict[int, int] = {}
        self._fd: int | None = None
        self._done_fd: int | None = None
        self._seq = 0
        self._head_failures = 0
        self.available = True
        """False from a connection-level failure until a replay empties the spool."""
        self.spooled = 0
        """Writes appended to the spool by this process."""
        self.replayed = 0
        """Spooled writes applied to the store by this process."""
        self.rejected = 0
        """Spooled writes the store refused, moved to ``rejected.jsonl``."""
        self._load()

    # -- state -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Writes waiting in the spool."""
        return len(self._queue)

    def _load(self) -> None:
        """Pick up a spool a previous process left (stopped or killed while the store
        was away): ops not yet marked done are queued again."""
        ops, done_path = self.directory / OPS_FILE, self.directory / DONE_FILE
        if not ops.exists():
            with contextlib.suppress(FileNotFoundError):
                done_path.unlink()  # removal of the spool was interrupted half-way
            return
        data = ops.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # The process died mid-append: that write was never acknowledged to its
            # caller as spooled; cut it so the next append starts on a fresh line.
            log.warning("spool.torn_line", extra={"spool": str(ops), "bytes": len(data) - end})
            os.truncate(ops, end)
        done: dict[int, Any] = {}
        if done_path.exists():
            for line in done_path.read_bytes().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    mark = json.loads(line)
                    done[int(mark["seq"])] = mark.get("result")
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line, object_hook=_decode)
                seq = int(entry["seq"])
            except (ValueError, KeyError, TypeError):
                log.error("spool.unreadable_line", extra={"spool": str(ops), "line": line[:200]})
                continue
            self._seq = max(self._seq, seq)
            if seq in done:
                ref, result = entry.get("ref"), done[seq]
                if isinstance(ref, int) and isinstance(result, int):
                    self._refs[ref] = result
            else:
                self._queue.append(entry)
        if self._queue:
            self.available = False
            log.warning("spool.loaded", extra={"spool": str(ops), "pending": len(self._queue)})
        else:
            self._remove_files()  # all replayed; the process died before removing it

    def _open(self, name: str) -> int:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / name
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if created:
            _fsync_dir(self.directory)
        return fd

    def _append(self, op: str, args: dict[str, Any], ref: int | None) -> None:
        """Append one write to the spool, durably (lock held)."""
        self._seq += 1
        entry: dict[str, Any] = {"seq": self._seq, "op": op, "args": args}
        if ref is not None:
            entry["ref"] = ref
        line = _dumps(entry) + b"\n"
        try:
            if self._fd is None:
                self._fd = self._open(OPS_FILE)
            _write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as exc:
            self._seq -= 1
            log.error("spool.write_failed", extra={"op": op, "error": exc.strerror})
            raise StoreError(
                f"the audit store is unavailable and its spool cannot be written: {exc.strerror}"
            ) from exc
        # Queued in the form a restarted relay would read back, so both replay alike.
        self._queue.append(json.loads(line, object_hook=_decode))
        self.spooled += 1

    def _remove_files(self) -> None:
        """The spool is empty: remove it (lock held). The done marks go first, so an
        interruption leaves ops without marks (replayed again, idempotently) and never
        marks without their ops."""
        for fd in (self._done_fd, self._fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._done_fd = None
        removed = False
        for name in (DONE_FILE, OPS_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
                removed = True
        if removed:
            with contextlib.suppress(OSError):
                _fsync_dir(self.directory)

    # -- writes ------------------------------------------------------------------------------

    def _write(self, op: str, args: dict[str, Any], ref: int | None = None) -> Any:
        with self._lock:
            if self._queue:
                self._append(op, args, ref)
                return ref
        try:
            return self._call(op, args)
        except StoreError as exc:
            if not store_unavailable(exc):
                raise
            error = str(exc)
        with self._lock:
            self._append(op, args, ref)
            first, self.available = self.available, False
        if first:
            log.warning("store.unavailable", extra={"error": error, "spool": str(self.directory)})
        return ref

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        return getattr(self.store, op)(**args)

    def add_event(
        self,
        kind: str,
        actor: str | None,
        outcome: str,
        origin: str | None,
        resource: str | None,
        detail: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        """:meth:`Store.add_event`, spooled when the store is away."""
        self._write(
            "add_event",
            {
                "kind": kind,
                "actor": actor,
                "outcome": outcome,
                "origin": origin,
                "resource": resource,
                "detail": detail,
                "session_id": session_id,
                "at": _now(),
            },
        )

    def create_session(
        self,
        id: str,
        identity: str,
        target: str,
        protocol: str,
        *,
        groups: Sequence[str] = (),
        auth_method: str | None = None,
        source: str | None = None,
        node: str | None = None,
        cast_path: str | None = None,
        title: str | None = None,
        attributes: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        """:meth:`Store.create_session`, spooled when the store is away."""
        self._write(
            "create_session",
            {
                "id": id,
                "identity": identity,
                "target": target,
                "protocol": protocol,
                "groups": list(groups),
                "auth_method": auth_method,
                "source": source,
                "node": node,
                "cast_path": cast_path,
                "title": title,
                "attributes": attributes,
                "run_id": run_id,
                "started_at": _now(),
            },
        )

    def end_session(
        self,
        id: str,
        *,
        status: str,
        exit_status: int | None = None,
        lines: int | None = None,
        final_hash: str | None = None,
        masking_counts: dict[str, int] | None = None,
    ) -> None:
        """:meth:`Store.end_session`, spooled when the store is away."""
        self._write(
            "end_session",
            {
                "id": id,
                "status": status,
                "exit_status": exit_status,
                "lines": lines,
                "final_hash": final_hash,
                "masking_counts": masking_counts,
                "ended_at": _now(),
            },
        )

    def add_command(
        self,
        session_id: str,
        text: str,
        *,
        kind: str,
        action: str,
        rule: str | None = None,
        approval_id: int | None = None,
    ) -> int:
        """:meth:`Store.add_command`; while the store is away, returns a negative
        placeholder id that :meth:`finish_command` accepts."""
        ref = -(secrets.randbits(52) + 1)  # JSON-safe, never a real (positive) id
        result = self._write(
            "add_command",
            {
                "session_id": session_id,
                "text": text,
                "kind": kind,
                "action": action,
                "rule": rule,
                "approval_id": approval_id,
                "at": _now(),
            },
            ref,
        )
        return int(result)

    def finish_command(
        self,
        id: int,
        *,
        status: str,
        exit_status: int | None = None,
        rows: int | None = None,
        duration_ms: float | None = None,
        bytes_in: int | None = None,
        bytes_out: int | None = None,
    ) -> None:
        """:meth:`Store.finish_command` (``id`` may be a placeholder from
        :meth:`add_command`), spooled when the store is away."""
        if id < 0:
            with self._lock:
                # Resolved now if its add_command was replayed already: a later spool
                # file (after a restart) would no longer know the placeholder.
                id = self._refs.get(id, id)
        self._write(
            "finish_command",
            {
                "id": id,
                "status": status,
                "exit_status": exit_status,
                "rows": rows,
                "duration_ms": duration_ms,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
            },
        )

    def add_finished_commands(self, rows: Sequence[dict[str, Any]]) -> None:
        """:meth:`Store.add_finished_commands` (rows carry their own times), spooled when
        the store is away."""
        if rows:
            self._write("add_finished_commands", {"rows": list(rows)})

    def add_checkpoint(self, session_id: str, lines: int, chain_hash: str) -> None:
        """:meth:`Store.add_checkpoint`, spooled when the store is away."""
        self._write(
            "add_checkpoint",
            {"session_id": session_id, "lines": lines, "chain_hash": chain_hash, "at": _now()},
        )

    def put_manifest(self, session_id: str, manifest: dict[str, Any]) -> None:
        """:meth:`Store.put_manifest`, spooled when the store is away."""
        self._write("put_manifest", {"session_id": session_id, "manifest": manifest})

    def set_approval_status(self, id: int, status: str, *, reason: str | None = None) -> None:
        """:meth:`Store.set_approval_status`, spooled when the store is away."""
        self._write("set_approval_status", {"id": id, "status": status, "reason": reason})

    # -- replay ------------------------------------------------------------------------------

    def replay(self) -> int:
        """Apply the spooled writes to the store, oldest first, and remove the spool once
        it is empty. Stops at the first write the store cannot take for a connection-level
        reason (it is still away) and at :meth:`stop`. Returns how many were applied.
        One replay runs at a time."""
        applied = 0
        with self._replaying:
            while not self._stopping.is_set():
                with self._lock:
                    if not self._queue:
                        self._remove_files()
                        if not self.available:
                            log.info("store.available", extra={"replayed": self.replayed})
                        self.available = True
                        return applied
                    entry = self._queue[0]
                try:
                    result = self._apply(entry)
                except StoreError as exc:
                    if store_unavailable(exc) and not self._poisoned():
                        self.available = False
                        return applied
                    self._reject(entry, str(exc))
                    continue
                except (_Reject, KeyError, TypeError, ValueError) as exc:
                    self._reject(entry, str(exc) or type(exc).__name__)
                    continue
                self._done(entry, result)
                applied += 1
        return applied

    def _apply(self, entry: dict[str, Any]) -> Any:
        op, args = entry["op"], dict(entry["args"])
        store = self.store
        if op == "finish_command" and args["id"] < 0:
            real = self._refs.get(args["id"])
            if real is None:
                raise _Reject("its command was never recorded")
            args["id"] = real
        check = _CHECKS.get(op)
        if check is not None:
            there, result = check(store, args)
            if there:
                return result
        if op == "add_finished_commands":
            rows = args["rows"]
            seen: dict[str, set[tuple[datetime, str]]] = {}
            for sid in {r["session_id"] for r in rows}:
                seen[sid] = {(c["at"], c["text"]) for c in store.list_commands(sid)}
            args["rows"] = [r for r in rows if (r["at"], r["text"]) not in seen[r["session_id"]]]
            if not args["rows"]:
                return None
        try:
            return self._call(op, args)
        except StoreError as exc:
            if op == "finish_command" and str(exc).endswith("has already finished"):
                return None  # applied before the connection died
            raise

    def _poisoned(self) -> bool:
        """After a connection-level failure of the head write: does the store answer
        other queries? Then the write itself fails, and after a few tries it is set
        aside instead of holding back everything behind it."""
        try:
            self.store.latest_checkpoint("")
        except StoreError:
            self._head_failures = 0
            return False
        self._head_failures += 1
        return self._head_failures >= _POISON_ATTEMPTS

    def _mark(self, entry: dict[str, Any], result: Any) -> None:
        """Pop the head and mark it done (lock held). Marks are not fsynced: a lost mark
        only means an idempotent replay of that write."""
        popped = self._queue.popleft()
        assert popped is entry
        self._head_failures = 0
        ref = entry.get("ref")
        if isinstance(ref, int) and isinstance(result, int):
            self._refs[ref] = result
        with contextlib.suppress(OSError):
            if self._done_fd is None:
                self._done_fd = self._open(DONE_FILE)
            _write_all(self._done_fd, _dumps({"seq": entry["seq"], "result": result}) + b"\n")

    def _done(self, entry: dict[str, Any], result: Any) -> None:
        with self._lock:
            self._mark(entry, result if isinstance(result, int) else None)
            self.replayed += 1

    def _reject(self, entry: dict[str, Any], error: str) -> None:
        log.error(
            "spool.rejected",
            extra={"op": entry.get("op"), "seq": entry.get("seq"), "error": error},
        )
        with self._lock:
            try:
                fd = self._open(REJECTED_FILE)
                try:
                    _write_all(fd, _dumps({**entry, "error": error}) + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("spool.reject_write_failed", extra={"error": exc.strerror})
            self._mark(entry, None)
            self.rejected += 1

    def stop(self) -> None:
        """Make a running replay return after its current write (shutdown)."""
        self._stopping.set()

    def close(self) -> None:
        """Close the spool's files; what is pending stays on disk for the next start."""
        self.stop()
        with self._lock:
            for fd in (self._fd, self._done_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fd = self._done_fd = None
