"""Masking throughput on one core: ordinary coloured output and one PAN per KB.

Run: .venv/bin/python -m bench.bench_masking [--mb 50]

The baseline in the same run is zlib.crc32 over the same bytes (one C pass that
touches every byte), so the ratio tells how far masking is from a bare scan on this
machine whatever its load.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib

from bench.corpus import terminal_output
from recorder.masking import Masker

CHUNK = 64 * 1024


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(mb: int, repeat: int) -> dict[str, float]:
    masker = Masker()
    results: dict[str, float] = {}
    for name, pan_every in (("ordinary", 0), ("dense_1_pan_per_kb", 1024)):
        data = terminal_output(mb * 1024 * 1024, pan_every)
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

        def mask(chunks: list[bytes] = chunks) -> None:
            s = masker.stream()
            for c in chunks:
                s.feed(c)
            s.flush()

        def baseline(data: bytes = data) -> None:
            zlib.crc32(data)

        t_mask = _best(mask, repeat)
        t_base = _best(baseline, repeat)
        s = masker.stream()
        out = b"".join(s.feed(c) for c in chunks) + s.flush()
        assert len(out) == len(data)
        results[f"{name}_MBps"] = round(len(data) / t_mask / 1e6, 1)
        results[f"{name}_crc32_MBps"] = round(len(data) / t_base / 1e6, 1)
        results[f"{name}_ratio_to_crc32"] = round(t_base / t_mask, 4)
        results[f"{name}_masked"] = sum(s.counts.values())
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(run(args.mb, args.repeat), indent=2))


if __name__ == "__main__":
    main()
