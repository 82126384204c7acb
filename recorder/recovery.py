"""Crash recovery: seal the casts a relay left open when it was killed (SIGKILL, the OOM
killer, a power cut).

Such a cast has no manifest. Its lines up to the relay's last fsync are anchored by the
store's last checkpoint (line count and chain hash); lines written after it may be
complete (a killed process loses nothing the kernel already has) or cut mid-write.
Recovery keeps the lines the checkpoint covers, plus the following lines as long as
they are complete events consistent with the chain file, drops the rest (a torn line, a
line the chain file contradicts), rewrites the chain file for exactly the kept lines and
seals the cast with a signed manifest whose ``recovered`` record says how many lines
the checkpoint covered and how many were dropped. ``verify`` reports such a cast as
truncated but authentic.

A cast whose checkpointed lines no longer chain to the checkpoint was changed after the
crash: it is left unsealed (sealing it would sign the change) and reported.

The relay runs :func:`recover_crashed` before it accepts connections, so what it leaves
behind is an ordinary sealed cast (manifest, chain file) for whatever ships casts on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from recorder.integrity import (
    CHAIN_ENTRY,
    HashChain,
    chain_path,
    manifest_path,
    session_of,
    sign_manifest,
)
from recorder.signing import SigningKey
from recorder.store import Store

log = logging.getLogger("castgate.recovery")

REASON = "relay crashed, recovered at restart"


@dataclass(frozen=True)
class Recovery:
    """What recovery did with one cast."""

    path: Path
    session_id: str | None
    lines: int = 0
    checkpoint_lines: int = 0
    dropped_lines: int = 0
    dropped_bytes: int = 0
    manifest: dict[str, Any] | None = None
    problem: str | None = None

    @property
    def sealed(self) -> bool:
        """True when the cast was sealed."""
        return self.manifest is not None


def _event_time(line: bytes, last: float) -> float | None:
    """The time of a well-formed event line that does not go backwards, else None."""
    try:
        ev = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if (
        isinstance(ev, list)
        and len(ev) == 3
        and isinstance(ev[0], int | float)
        and isinstance(ev[1], str)
        and isinstance(ev[2], str)
        and ev[0] >= last
    ):
        return float(ev[0])
    return None


def _read_header(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as fh:
        first = fh.readline()
    if not first.endswith(b"\n"):
        return None
    try:
        header = orjson.loads(first)
    except orjson.JSONDecodeError:
        return None
    return header if isinstance(header, dict) and header.get("version") == 2 else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover_cast(
    path: Path,
    key: SigningKey,
    checkpoint: tuple[int, str] | None,
    *,
    started_at: datetime | None = None,
) -> Recovery:
    """Seal one unsealed cast after a crash (see the module docstring).

    Args:
        path: the cast; its chain file and manifest go next to it.
        key: signs the manifest.
        checkpoint: the store's last checkpoint of the session, (lines, chain hash hex).
        started_at: when the session started (default: the header's timestamp).
    """
    if manifest_path(path).exists():
        return Recovery(path, None, problem="already sealed")
    header = _read_header(path)
    if header is None:
        return Recovery(path, None, problem="no complete asciicast v2 header line")
    sid = session_of(header)
    anchor_lines, anchor_hash = checkpoint if checkpoint is not None else (0, "")
    expected = chain_path(path).read_bytes() if chain_path(path).exists() else b""

    chain = HashChain()
    entries = bytearray()
    file_hash = hashlib.sha256()
    kept_bytes = 0
    lines = 0
    final_hash = ""
    last_t = 0.0
    total = path.stat().st_size
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                break  # torn: the relay died mid-write
            line = raw[:-1]
            t = last_t
            # Lines before the checkpoint's are proven by its hash; parsing them would
            # only cost time on a large cast (the one at the checkpoint gives the time).
            if n > 1 and n >= anchor_lines:
                parsed = _event_time(line, last_t)
                if parsed is None:
                    if n <= anchor_lines:
                        return Recovery(path, sid, problem=f"line {n} is not a valid event")
                    break
                t = parsed
            h = chain.add(line)
            ref = expected[(n - 1) * CHAIN_ENTRY : n * CHAIN_ENTRY]
            if n > anchor_lines and len(ref) == CHAIN_ENTRY and ref != h[:CHAIN_ENTRY]:
                break  # the chain file contradicts this line: not kept
            if n == anchor_lines and h.hex() != anchor_hash:
                return Recovery(
                    path,
                    sid,
                    problem=f"lines 1-{n} do not chain to the store's checkpoint "
                    "(changed after they were fsynced); left unsealed",
                )
            last_t = t
            entries += h[:CHAIN_ENTRY]
            file_hash.update(raw)
            kept_bytes += len(raw)
            lines, final_hash = n, h.hex()
    if lines < anchor_lines:
        return Recovery(
            path,
            sid,
            problem=f"only {lines} complete lines, the store's checkpoint covers {anchor_lines}; "
            "left unsealed",
        )
    dropped_bytes = total - kept_bytes
    dropped_lines = 0
    if dropped_bytes:
        with path.open("rb") as fh:
            fh.seek(kept_bytes)
            tail = fh.read()
        dropped_lines = tail.count(b"\n") + (0 if tail.endswith(b"\n") else 1)
        os.truncate(path, kept_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _write_atomic(chain_path(path), bytes(entries))

    found = header.get("castgate")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    if started_at is None:
        started_at = datetime.fromtimestamp(int(header.get("timestamp", 0)), UTC)
    reason = (
        f"{REASON}: {lines} lines kept ({anchor_lines} covered by the last checkpoint), "
        f"{dropped_lines} dropped"
    )
    manifest: dict[str, Any] = {
        "session_id": sid,
        "cast": path.name,
        "lines": lines,
        "final_hash": final_hash,
        "file_sha256": file_hash.hexdigest(),
        "chain_sha256": hashlib.sha256(entries).hexdigest(),
        "started_at": started_at.isoformat(),
        "sealed_at": datetime.now(UTC).isoformat(),
        "duration": round(last_t, 6),
        "end_reason": reason,
        "exit_status": None,
        "identity": meta.get("identity"),
        "target": meta.get("target"),
        "recovered": {
            "checkpoint_lines": anchor_lines,
            "checkpoint_hash": anchor_hash or None,
            "dropped_lines": dropped_lines,
            "dropped_bytes": dropped_bytes,
        },
    }
    signed = sign_manifest(manifest, key)
    _write_atomic(
        manifest_path(path), (json.dumps(signed, indent=2, sort_keys=True) + "\n").encode()
    )
    _fsync_dir(path.parent)
    return Recovery(path, sid, lines, anchor_lines, dropped_lines, dropped_bytes, signed)


def _mine(row: dict[str, Any] | None, node: str | None) -> bool:
    """A session this relay left behind: still live, or already marked interrupted (by
    another relay that saw this one stop). A session that ended otherwise with an
    unsealed cast stopped recording on purpose (``recording.on_failure``)."""
    if row is None:
        return True
    if node is not None and row.get("node") not in (None, node):
        return False
    return row.get("ended_at") is None or row.get("status") == "interrupted"


def recover_crashed(
    store: Store, recordings: Path, key: SigningKey, node: str | None = None
) -> list[Recovery]:
    """Seal every cast in ``recordings`` that a crash left unsealed, end its session as
    ``interrupted`` with the recovered line count, store the manifest and write an
    audit event (``recording.recovered``, or a failure naming what was wrong)."""
    results: list[Recovery] = []
    for sess in store.list_sessions(live=True):
        # Sealed just before the crash, but the session row was never closed.
        cast = Path(sess["cast_path"]) if sess.get("cast_path") else None
        if cast is None or not _mine(sess, node) or not manifest_path(cast).exists():
            continue
        try:
            manifest = json.loads(manifest_path(cast).read_bytes())
        except (OSError, ValueError):
            continue  # verify reports it; the session is interrupted like any other
        store.end_session(
            sess["id"],
            status="interrupted",
            lines=manifest.get("lines"),
            final_hash=manifest.get("final_hash"),
        )
        store.put_manifest(sess["id"], manifest)
    if not recordings.is_dir():
        return results
    for cast in sorted(recordings.glob("*.cast")):
        if manifest_path(cast).exists():
            continue
        try:
            header = _read_header(cast)
            sid = session_of(header) if header is not None else None
            row = store.get_session(sid) if sid is not None else None
            if not _mine(row, node):
                continue
            checkpoint = None
            if sid is not None:
                found = store.latest_checkpoint(sid)
                if found is not None:
                    checkpoint = (int(found["lines"]), str(found["chain_hash"]))
            started = row.get("started_at") if row is not None else None
            result = recover_cast(cast, key, checkpoint, started_at=started)
        except OSError as exc:
            result = Recovery(cast, None, problem=f"cannot read or write: {exc.strerror or exc}")
        results.append(result)
        _record(store, result, row if result.session_id else None, node)
    return results


def _record(store: Store, result: Recovery, row: dict[str, Any] | None, node: str | None) -> None:
    sid = result.session_id
    resource = f"session:{sid}" if sid else f"recording:{result.path.name}"
    detail: dict[str, Any] = {"cast": result.path.name}
    if result.manifest is None:
        log.error(
            "recording.recovery_failed", extra={"cast": str(result.path), "problem": result.problem}
        )
        detail["problem"] = result.problem
        store.add_event(
            "recording.recovered", None, "failure", node, resource, detail, session_id=sid
        )
        return
    detail.update(
        lines=result.lines,
        checkpoint_lines=result.checkpoint_lines,
        dropped_lines=result.dropped_lines,
    )
    log.warning("recording.recovered", extra={"session": sid, **detail})
    if row is not None and sid is not None:
        if row.get("ended_at") is None:
            store.end_session(
                sid,
                status="interrupted",
                lines=result.lines,
                final_hash=result.manifest["final_hash"],
            )
        store.put_manifest(sid, result.manifest)
    store.add_event("recording.recovered", None, "success", node, resource, detail, session_id=sid)
