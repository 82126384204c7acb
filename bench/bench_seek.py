"""Seek in a huge cast: index build rate, index size, seek latency against feeding
from the start (what asciinema-player does when you click the progress bar).

Run: taskset -c 1 .venv/bin/python -m bench.bench_seek [--mb 200] [--seeks 100]

The generated cast is a ten-hour session at 120x40: bursts of coloured scrolling
output (ls, git log, ps, logs, compiler warnings), typing at a prompt, full-screen
periods in the alternate screen (a top-like dashboard redrawn every second), window
resizes and markers. It is written once to --dir (default: a temporary directory)
and reused when it already exists with the same size.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from bench.corpus import GENERATORS
from replay.castfile import CastFile
from replay.seekindex import advance, build_index, index_path, open_index, start


def _dashboard(r: random.Random, cols: int, rows: int, tick: int) -> str:
    out = ["\x1b[H\x1b[1;37;44m", f" top - {tick:06d} load {r.random() * 4:.2f}".ljust(cols)]
    out.append("\x1b[0m")
    for row in range(2, rows + 1):
        out.append(
            f"\x1b[{row};1H\x1b[3{row % 8}m{r.randint(1, 99999):>6} root "
            f"{r.random() * 100:5.1f} {r.random() * 100:5.1f} proc-{r.randint(1, 999)}\x1b[K"
        )
    return "".join(out)


def generate_cast(path: Path, mb: float, seed: int = 11) -> None:
    """Write a cast of about ``mb`` MB (deterministic for a given seed)."""
    r = random.Random(seed)
    target = int(mb * 1e6)
    cols, rows = 120, 40
    t = 0.0
    size = 0
    with path.open("wb") as fh:
        header = {"version": 2, "width": cols, "height": rows, "timestamp": 1_780_000_000}
        line = orjson.dumps(header) + b"\n"
        fh.write(line)
        size += len(line)

        def ev(code: str, data: str) -> None:
            nonlocal size
            line = orjson.dumps([round(t, 6), code, data]) + b"\n"
            fh.write(line)
            size += len(line)

        tick = 0
        while size < target:
            phase = r.random()
            if phase < 0.55:  # a command with a burst of scrolling output
                for ch in "ls -la /srv\r":
                    t += 0.05 + r.random() * 0.1
                    ev("i", ch)
                    ev("o", ch if ch != "\r" else "\r\n")
                gen = r.choice(GENERATORS)
                for _ in range(r.randint(20, 400)):
                    t += r.random() * 0.01
                    ev("o", "".join(gen(r) for _ in range(r.randint(1, 30))))
                ev("o", "\x1b[1;32muser@host\x1b[0m:\x1b[1;34m~\x1b[0m$ ")
            elif phase < 0.8:  # a full-screen app for a while
                ev("o", "\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J")
                for _ in range(r.randint(30, 300)):
                    t += 1.0
                    tick += 1
                    ev("o", _dashboard(r, cols, rows, tick))
                ev("o", "\x1b[?25h\x1b[?1049l")
            elif phase < 0.95:  # idle at the prompt
                t += r.random() * 120
                ev("o", "\x07")
            elif phase < 0.98:
                cols, rows = r.choice([(120, 40), (100, 30), (160, 50), (80, 24)])
                t += 0.5
                ev("r", f"{cols}x{rows}")
            else:
                t += 0.1
                ev("m", f"approval #{r.randint(1, 999)} granted by alice")


def _feed_from_start(path: Path, t: float) -> float:
    cast = CastFile(path)
    head = start(cast)
    began = time.perf_counter()
    advance(head, cast, until=t)
    return time.perf_counter() - began


def run(path: Path, seeks: int, baseline_seeks: int, seed: int) -> dict[str, object]:
    """Build the index, seek to random points, compare with feeding from the start."""
    index_path(path).unlink(missing_ok=True)
    size = path.stat().st_size
    began = time.perf_counter()
    index = build_index(path)
    build_s = time.perf_counter() - began
    began = time.perf_counter()
    loaded = open_index(path)
    open_s = time.perf_counter() - began
    assert loaded.rebuilt is None, loaded.rebuilt
    r = random.Random(seed)
    points = [r.random() * index.duration for _ in range(seeks)]
    times = []
    for p in points:
        began = time.perf_counter()
        loaded.seek(p)
        times.append(time.perf_counter() - began)
    base_points = sorted(points[:baseline_seeks])
    base = [_feed_from_start(path, p) for p in base_points]
    # Spot-check correctness on the baseline points.
    for p in base_points[:3]:
        ref = start(CastFile(path))
        advance(ref, CastFile(path), until=p)
        assert loaded.seek(p).terminal.screen() == ref.terminal.screen()
    return {
        "cast_MB": round(size / 1e6, 1),
        "duration_h": round(index.duration / 3600, 2),
        "events": index.events,
        "index_build_s": round(build_s, 2),
        "index_build_MBps": round(size / build_s / 1e6, 1),
        "index_KB": round(index.size_bytes / 1e3, 1),
        "index_pct_of_cast": round(100 * index.size_bytes / size, 3),
        "keyframes": len(index.keyframes),
        "open_s (hash + load)": round(open_s, 3),
        "seeks": seeks,
        "seek_median_ms": round(statistics.median(times) * 1e3, 1),
        "seek_max_ms": round(max(times) * 1e3, 1),
        "feed_from_start_points": len(base),
        "feed_from_start_median_ms": round(statistics.median(base) * 1e3, 1),
        "feed_from_start_max_ms": round(max(base) * 1e3, 1),
    }


def main() -> None:
    """Command line entry."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=200, help="size of the generated cast")
    p.add_argument("--seeks", type=int, default=100)
    p.add_argument("--baseline-seeks", type=int, default=10, help="feed-from-start subset")
    p.add_argument("--dir", help="where the cast is kept (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-seek-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench-{args.mb:g}mb.cast"
    if not path.exists():
        began = time.perf_counter()
        generate_cast(path, args.mb)
        print(f"generated {path} in {time.perf_counter() - began:.1f} s")
    print(json.dumps(run(path, args.seeks, args.baseline_seeks, args.seed), indent=2))


if __name__ == "__main__":
    main()
