"""``castgate verify FILE|DIR...``: check casts offline, and evidence bundles whole."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recorder.integrity import Report, Verdict, verify_cast
from replay.evidence import bundle_key, is_bundle, verify_bundle


def _casts(target: Path) -> Iterable[Path]:
    if target.is_dir():
        found = sorted(target.rglob("*.cast"))
        if not found:
            yield target  # reported as unreadable below
        yield from found
    else:
        yield target


def verify_paths(paths: list[Path], pinned: Ed25519PublicKey | None) -> list[Report]:
    """Verify every cast named or found under the directories named. A directory that
    is an evidence bundle also has every file checked against its manifest; its casts
    are checked against the bundle's key unless a key is pinned."""
    reports: list[Report] = []
    for target in paths:
        key = pinned
        if target.is_dir() and is_bundle(target):
            reports.extend(verify_bundle(target, pinned))
            key = pinned or bundle_key(target)
        for cast in _casts(target):
            if cast.is_dir():
                reports.append(Report(cast, Verdict.UNREADABLE, "no .cast files in directory"))
            else:
                reports.append(verify_cast(cast, key))
    return reports


def exit_code(reports: list[Report]) -> int:
    """2 if anything was unreadable, else 1 if anything is not intact, else 0."""
    return max((r.verdict.exit_code for r in reports), default=2)
