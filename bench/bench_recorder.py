"""Recorder throughput: events/s written by CastWriter (JSON line, hash chain, chain
sidecar, fsync every second) and by SessionRecorder (masking + recording), against a
baseline of bare os.write of pre-encoded lines in the same run.

Run: .venv/bin/python -m bench.bench_recorder [--events 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.corpus import terminal_output
from recorder.masking import Masker
from recorder.recording import CastWriter
from recorder.session import SessionRecorder
from recorder.signing import SigningKey


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=80)
    args = ap.parse_args()
    data = terminal_output(args.events * args.chunk)
    chunks = [data[i : i + args.chunk] for i in range(0, len(data), args.chunk)]
    key = SigningKey.generate()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        lines = [
            json.dumps([i * 0.001, "o", c.decode()]).encode() + b"\n" for i, c in enumerate(chunks)
        ]
        fd = os.open(base / "baseline", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        t = time.perf_counter()
        for line in lines:
            os.write(fd, line)
        os.fsync(fd)
        t_base = time.perf_counter() - t
        os.close(fd)

        w = CastWriter(base / "w.cast", width=120, height=40, session_id="b", signing_key=key)
        t = time.perf_counter()
        for c in chunks:
            w.output(c)
        w.close()
        t_writer = time.perf_counter() - t

        w2 = CastWriter(base / "s.cast", width=120, height=40, session_id="b", signing_key=key)
        rec = SessionRecorder(w2, Masker())
        t = time.perf_counter()
        for c in chunks:
            rec.output(c)
        rec.close()
        t_session = time.perf_counter() - t
    n = len(chunks)
    out["events"] = n
    out["baseline_write_events_per_s"] = round(n / t_base)
    out["castwriter_events_per_s"] = round(n / t_writer)
    out["session_mask_and_record_events_per_s"] = round(n / t_session)
    out["castwriter_ratio_to_baseline"] = round(t_base / t_writer, 3)
    out["session_ratio_to_baseline"] = round(t_base / t_session, 3)
    out["session_MBps"] = round(len(data) / t_session / 1e6, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
