"""Tamper evidence for casts: the hash chain, the chain sidecar, the signed manifest,
and verification.

Chain: ``h0 = SHA-256(header line)``, ``hi = SHA-256(h(i-1) || line i)``, lines taken
without their newline, hashes as 32 raw bytes. Next to ``NAME.cast`` the recorder keeps

- ``NAME.cast.chain``: the first 8 bytes of every ``hi``, so verification can name the
  first line that no longer matches (a changed, deleted or reordered line);
- ``NAME.cast.manifest.json``: written when the recording is sealed: session id, line
  count, final chain hash, SHA-256 of the cast and of the chain file, signed with the
  relay's Ed25519 key.

An unsealed cast (the recorder was killed) still verifies line by line against its chain
file up to the last complete line, and is reported as unsealed, never as intact. Given the
store's last checkpoint of the session (line count and chain hash, written at every
fsync), the lines it covers are checked against it: an unsealed cast is then authentic up
to its last fsync, or tampered. A cast sealed by crash recovery (``recorder.recovery``)
carries a signed ``recovered`` record and verifies as truncated but authentic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recorder.signing import (
    SigningKey,
    key_id,
    public_from_raw_b64,
    public_raw_b64,
    verify_signature,
)

CHAIN_SUFFIX = ".chain"
MANIFEST_SUFFIX = ".manifest.json"
CHAIN_ENTRY = 8
MANIFEST_FORMAT = "castgate-manifest/1"
# The store's last checkpoint of a session: (lines, chain hash hex), or None.
CheckpointLookup = Callable[[str], tuple[int, str] | None]


def chain_path(cast: Path) -> Path:
    """Path of a cast's chain sidecar."""
    return cast.with_name(cast.name + CHAIN_SUFFIX)


def manifest_path(cast: Path) -> Path:
    """Path of a cast's signed manifest."""
    return cast.with_name(cast.name + MANIFEST_SUFFIX)


class HashChain:
    """Running hash chain over the lines of a cast."""

    def __init__(self) -> None:
        self.lines = 0
        self.value = b""

    def add(self, line: bytes) -> bytes:
        """Extend the chain with one line; returns the new hash."""
        # Two updates instead of hashing prev + line: no copy of a large line.
        h = hashlib.sha256(self.value)
        h.update(line)
        self.value = h.digest()
        self.lines += 1
        return self.value

    @property
    def hex(self) -> str:
        """The current hash in hex."""
        return self.value.hex()


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(manifest: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """Add key identity and signature to a manifest."""
    signed = dict(manifest)
    signed["format"] = MANIFEST_FORMAT
    signed["key_id"] = key.key_id
    signed["public_key"] = public_raw_b64(key.public)
    signed["signature"] = key.sign(_canonical(signed))
    return signed


def check_manifest_signature(
    manifest: dict[str, Any], pinned: Ed25519PublicKey | None
) -> tuple[bool, str]:
    """Verify a manifest's signature; returns (ok, description of the key used)."""
    try:
        embedded = public_from_raw_b64(str(manifest["public_key"]))
    except (KeyError, ValueError):
        return False, "manifest has no usable public key"
    key = pinned or embedded
    if pinned is not None and key_id(pinned) != manifest.get("key_id"):
        return False, f"signed by {manifest.get('key_id')}, not by the pinned key {key_id(pinned)}"
    ok = verify_signature(key, _canonical(manifest), str(manifest.get("signature", "")))
    where = "pinned key" if pinned is not None else "key embedded in the manifest (unpinned)"
    return ok, f"{where} {key_id(key)}"


class Verdict(Enum):
    """Outcome of verifying one cast."""

    INTACT = "intact"
    # Sealed by crash recovery: every line present is chained and signed, and the signed
    # manifest says how many lines the store's last checkpoint covered and that what the
    # relay had not written when it stopped is missing.
    TRUNCATED_AUTHENTIC = "truncated-authentic"
    UNSEALED = "unsealed"
    TRUNCATED = "truncated"
    TAMPERED = "tampered"
    UNREADABLE = "unreadable"

    @property
    def exit_code(self) -> int:
        """DESIGN.md's contract: 0 intact, 1 tampered or truncated (a recovered cast is
        truncated, however authentic its lines: its verdict says which), 2 unreadable."""
        return {"intact": 0, "unreadable": 2}.get(self.value, 1)


@dataclass
class Report:
    """What verification found about one cast."""

    path: Path
    verdict: Verdict
    message: str
    first_bad_line: int | None = None
    lines: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One-line summary for the CLI."""
        return f"{self.path}: {self.verdict.value.upper()}: {self.message}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_event(line: bytes, last_t: float) -> tuple[float | None, str | None]:
    try:
        ev = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
        return None, "not valid JSON"
    if (
        not isinstance(ev, list)
        or len(ev) != 3
        or not isinstance(ev[0], int | float)
        or not isinstance(ev[1], str)
        or not isinstance(ev[2], str)
    ):
        return None, "not an asciicast event [time, code, data]"
    if ev[0] < last_t:
        return None, f"time goes backwards ({ev[0]} < {last_t})"
    return float(ev[0]), None


def session_of(header: dict[str, Any]) -> str | None:
    """The session id castgate writes into a cast's header, if any."""
    meta = header.get("castgate")
    sid = meta.get("session") if isinstance(meta, dict) else None
    return sid if isinstance(sid, str) else None


def _against_checkpoint(
    path: Path, anchor: tuple[int, str], anchored: str | None, complete: int
) -> Report | None:
    """Compare an unsealed cast with the store's last checkpoint of its session."""
    lines, chain_hash = anchor
    if complete < lines:
        return Report(
            path,
            Verdict.TRUNCATED,
            f"unsealed, and {lines - complete} line(s) the store's last checkpoint covers "
            f"are missing ({complete} complete lines, the checkpoint covers {lines})",
            first_bad_line=complete + 1,
            lines=complete,
        )
    if anchored != chain_hash:
        return Report(
            path,
            Verdict.TAMPERED,
            f"lines 1-{lines} do not chain to the store's checkpoint (changed after they "
            "were fsynced)",
            lines=complete,
        )
    return None


def verify_cast(
    path: Path,
    pinned: Ed25519PublicKey | None = None,
    checkpoint: CheckpointLookup | None = None,
) -> Report:
    """Recompute a cast's chain, compare it with its sidecar and manifest, check the
    signature, and name the first line that does not match.

    Args:
        path: the cast.
        pinned: the relay's public key; default: the key embedded in the manifest.
        checkpoint: looks up the store's last checkpoint of a session; consulted only
            for an unsealed cast, whose fsynced lines it then authenticates.
    """
    try:
        if not path.is_file():
            # A FIFO would block forever and a device never end.
            return Report(path, Verdict.UNREADABLE, "not a regular file")
        data = path.read_bytes()
    except OSError as exc:
        return Report(path, Verdict.UNREADABLE, f"cannot read: {exc.strerror or exc}")
    raw_lines = data.split(b"\n")
    torn = raw_lines[-1] != b""
    lines = raw_lines if torn else raw_lines[:-1]
    try:
        header = json.loads(lines[0]) if lines else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or header.get("version") != 2:
        return Report(path, Verdict.UNREADABLE, "not an asciicast v2 file (bad header line)")

    chain_file = chain_path(path)
    expected: bytes | None = None
    if chain_file.exists():
        expected = chain_file.read_bytes()
    man_file = manifest_path(path)
    manifest: dict[str, Any] | None = None
    if man_file.exists():
        try:
            loaded = json.loads(man_file.read_bytes())
        except (ValueError, RecursionError):
            return Report(path, Verdict.TAMPERED, f"{man_file.name} is not valid JSON")
        if not isinstance(loaded, dict):
            return Report(path, Verdict.TAMPERED, f"{man_file.name} is not a manifest")
        manifest = loaded

    anchor: tuple[int, str] | None = None
    sid = session_of(header)
    if manifest is None and checkpoint is not None and sid is not None:
        anchor = checkpoint(sid)
    anchored: str | None = None

    chain = HashChain()
    last_t = 0.0
    for n, line in enumerate(lines, start=1):
        if torn and n == len(lines):
            break  # a line cut by a crash or truncation: reported below, not compared
        h = chain.add(line)
        if anchor is not None and n == anchor[0]:
            anchored = h.hex()
        if expected is not None:
            ref = expected[(n - 1) * CHAIN_ENTRY : n * CHAIN_ENTRY]
            if len(ref) == CHAIN_ENTRY and ref != h[:CHAIN_ENTRY]:
                return Report(
                    path,
                    Verdict.TAMPERED,
                    f"line {n} does not match the hash chain (changed, deleted or reordered)",
                    first_bad_line=n,
                    lines=len(lines),
                )
        if n > 1:
            t, problem = _check_event(line, last_t)
            if problem:
                return Report(
                    path, Verdict.TAMPERED, f"line {n}: {problem}", first_bad_line=n, lines=n
                )
            if t is not None:
                last_t = t

    if manifest is None:
        complete = len(lines) - (1 if torn else 0)
        covered = len(expected) // CHAIN_ENTRY if expected is not None else 0
        detail = f"{complete} complete lines"
        if expected is not None:
            detail += f", {min(covered, complete)} of them checked against the chain file"
        if anchor is not None:
            mismatch = _against_checkpoint(path, anchor, anchored, complete)
            if mismatch is not None:
                return mismatch
            detail = (
                f"authentic up to the last fsync: lines 1-{anchor[0]} chain to the store's "
                f"checkpoint, {complete - anchor[0]} later line(s) not covered; {detail}"
            )
        if torn:
            return Report(
                path,
                Verdict.TRUNCATED,
                f"unsealed and truncated: last line {len(lines)} is torn (recorder stopped "
                f"mid-write); {detail}",
                first_bad_line=len(lines),
                lines=complete,
            )
        return Report(
            path,
            Verdict.UNSEALED,
            f"no signed manifest (recording was not closed); {detail}",
            lines=complete,
        )

    ok, key_desc = check_manifest_signature(manifest, pinned)
    if not ok:
        return Report(path, Verdict.TAMPERED, f"manifest signature invalid: {key_desc}")
    m_lines = manifest.get("lines")
    if not isinstance(m_lines, int) or isinstance(m_lines, bool) or m_lines < 1:
        return Report(path, Verdict.TAMPERED, f"{man_file.name} has no valid line count")
    if torn or len(lines) < m_lines:
        return Report(
            path,
            Verdict.TRUNCATED,
            f"truncated: {len(lines)} lines{' (last one torn)' if torn else ''}, "
            f"the manifest says {m_lines}",
            first_bad_line=len(lines) if torn else len(lines) + 1,
            lines=len(lines),
        )
    if len(lines) > m_lines:
        return Report(
            path,
            Verdict.TAMPERED,
            f"{len(lines) - m_lines} line(s) appended after sealing, from line {m_lines + 1}",
            first_bad_line=m_lines + 1,
            lines=len(lines),
        )
    if expected is not None and hashlib.sha256(expected).hexdigest() != manifest.get(
        "chain_sha256"
    ):
        return Report(path, Verdict.TAMPERED, f"{chain_file.name} was altered after sealing")
    if chain.hex != manifest.get("final_hash"):
        return Report(
            path, Verdict.TAMPERED, "final chain hash differs from the manifest", lines=m_lines
        )
    if file_sha256(path) != manifest.get("file_sha256"):
        return Report(path, Verdict.TAMPERED, "file SHA-256 differs from the manifest")
    recovered = manifest.get("recovered")
    if isinstance(recovered, dict):
        return Report(
            path,
            Verdict.TRUNCATED_AUTHENTIC,
            f"{m_lines} lines, sealed by crash recovery ({manifest.get('end_reason')}); "
            f"what the relay had not written when it stopped is missing; chain and "
            f"signature valid ({key_desc}), session {manifest.get('session_id')}",
            lines=m_lines,
        )
    return Report(
        path,
        Verdict.INTACT,
        f"{m_lines} lines, chain and signature valid ({key_desc}), "
        f"session {manifest.get('session_id')}",
        lines=m_lines,
    )
