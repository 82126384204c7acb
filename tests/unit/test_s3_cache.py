"""The S3 read cache keeps at most ``s3.cache_max_mb``: least recently used casts go
first, with all their sidecars, and the cast being read always stays."""

from __future__ import annotations

import os
from pathlib import Path

from recorder.objectstore import evict_cache


def put(directory: Path, name: str, size: int, age: float) -> None:
    for suffix, n in ((".cast", size), (".cast.chain", 8), (".cast.manifest.json", 100)):
        path = directory / f"{name}{suffix}"
        path.write_bytes(b"x" * n)
        os.utime(path, (age, age))


def test_least_recently_used_go_first_with_their_sidecars(tmp_path: Path) -> None:
    put(tmp_path, "old", 1000, 100.0)
    put(tmp_path, "mid", 1000, 200.0)
    put(tmp_path, "new", 1000, 300.0)
    removed = evict_cache(tmp_path, 2300, keep=tmp_path / "new.cast")
    assert removed == ["old.cast"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mid.cast",
        "mid.cast.chain",
        "mid.cast.manifest.json",
        "new.cast",
        "new.cast.chain",
        "new.cast.manifest.json",
    ]


def test_the_cast_being_read_stays_even_over_the_limit(tmp_path: Path) -> None:
    put(tmp_path, "big", 5000, 100.0)
    put(tmp_path, "other", 10, 200.0)
    assert evict_cache(tmp_path, 0, keep=tmp_path / "big.cast") == ["other.cast"]
    assert (tmp_path / "big.cast").exists()
    assert evict_cache(tmp_path / "missing", 0, keep=tmp_path / "x.cast") == []
