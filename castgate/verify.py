"""``castgate verify FILE|DIR...``: check casts offline, and evidence bundles whole."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recorder.integrity import CheckpointLookup, Report, Verdict, manifest_path, verify_cast
from recorder.signing import public_from_raw_b64
from replay.evidence import bundle_key, is_bundle, verify_bundle

if TYPE_CHECKING:
    from recorder.store import Store


def _casts(target: Path) -> Iterable[Path]:
    if target.is_dir():
        found = sorted(target.rglob("*.cast"))
        if not found:
            yield target  # reported as unreadable below
        yield from found
    else:
        yield target


class StoreCheckpoints:
    """The audit store's last checkpoint of a session, for authenticating the fsynced
    lines of unsealed casts. The store opens on the first lookup; a store that cannot be
    opened is reported once on stderr and the casts are verified without it."""

    def __init__(self, config: Path) -> None:
        self._config = config
        self._store: Store | None = None
        self._failed = False

    def __call__(self, session_id: str) -> tuple[int, str] | None:
        """(lines, chain hash) of the session's last checkpoint, or None."""
        from recorder.config import load_config
        from recorder.errors import CastgateError
        from recorder.store import Store

        if self._failed:
            return None
        try:
            if self._store is None:
                self._store = Store.open(load_config(self._config).store_url())
            found = self._store.latest_checkpoint(session_id)
        except CastgateError as exc:
            self._failed = True
            print(f"castgate verify: checkpoints not checked: {exc}", file=sys.stderr)
            return None
        return None if found is None else (int(found["lines"]), str(found["chain_hash"]))

    def close(self) -> None:
        """Close the store if it was opened."""
        if self._store is not None:
            self._store.close()


def fetch_missing(paths: list[Path], config: Path | None) -> list[Path]:
    """The paths, with each cast (``NAME.cast``, or a session id) that is not on this
    machine replaced by its copy fetched from the ``[s3]`` bucket of ``config``; paths
    with nothing to fetch stay as given (and are reported unreadable)."""
    missing = [p for p in paths if not p.exists()]
    if not missing or config is None:
        return paths
    from recorder.config import load_config
    from recorder.objectstore import locate_cast

    cfg = load_config(config)
    if cfg.s3 is None:
        return paths
    found: dict[Path, Path] = {}
    for target in missing:
        name = target.name if target.name.endswith(".cast") else f"{target.name}.cast"
        cast = locate_cast(cfg, cfg.recordings_dir / name)
        if cast.is_file():
            found[target] = cast
    return [found.get(p, p) for p in paths]


def manifest_key(cast: Path, trusted: list[Ed25519PublicKey]) -> Ed25519PublicKey | None:
    """The trusted key equal to the one a cast's manifest names, or the first trusted
    key (which then reports the mismatch); None when nothing is trusted."""
    if not trusted:
        return None
    try:
        embedded = json.loads(manifest_path(cast).read_text(encoding="utf-8"))["public_key"]
        named = public_from_raw_b64(str(embedded)).public_bytes_raw()
    except (OSError, ValueError, KeyError, TypeError):
        return trusted[0]
    return next((k for k in trusted if k.public_bytes_raw() == named), trusted[0])


def verify_paths(
    paths: list[Path],
    pinned: Ed25519PublicKey | list[Ed25519PublicKey] | None,
    checkpoints: CheckpointLookup | None = None,
) -> list[Report]:
    """Verify every cast named or found under the directories named. A directory that
    is an evidence bundle also has every file checked against its manifest; its casts
    are checked against the bundle's key unless a key is pinned. ``checkpoints`` (the
    store's, see StoreCheckpoints) authenticates the fsynced lines of unsealed casts."""
    trusted = pinned if isinstance(pinned, list) else [pinned] if pinned is not None else []
    reports: list[Report] = []
    for target in paths:
        bundle = None
        if target.is_dir() and is_bundle(target):
            reports.extend(verify_bundle(target, trusted[0] if trusted else None))
            bundle = bundle_key(target)
        for cast in _casts(target):
            if cast.is_dir():
                reports.append(Report(cast, Verdict.UNREADABLE, "no .cast files in directory"))
            else:
                key = manifest_key(cast, trusted) or bundle
                reports.append(verify_cast(cast, key, checkpoints))
    return reports


def exit_code(reports: list[Report]) -> int:
    """2 if anything was unreadable, else 1 if anything is not intact, else 0."""
    return max((r.verdict.exit_code for r in reports), default=2)
