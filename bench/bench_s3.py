"""Upload throughput of sealed casts to an S3-compatible server (moto's server mode on
this machine), against a baseline of boto3 ``put_object`` of the same bytes in the same
run.

``ours`` is what the relay's upload worker does per cast (recorder/objectstore.py
``upload_cast`` on a cast's first attempt): hash every file (SHA-256, and part digests
above the multipart threshold), PUT with ``ChecksumSHA256`` and the SHA-256 as metadata,
HEAD to confirm size and checksum. The baseline is a plain boto3 client putting the same files' bytes read into
memory, with boto3's default checksum behaviour and nothing verified. Rounds
alternate between the two, each into a fresh bucket.

Run: .venv/bin/python -m bench.bench_s3 [--casts 20] [--mb 5] [--big-mb 80] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.corpus import terminal_output
from recorder.config import S3Config
from recorder.objectstore import ObjectStore, cast_files
from recorder.recording import CastWriter
from recorder.signing import SigningKey
from tests.fix_s3 import CREDENTIALS, KEY_ENV, SECRET_ENV, S3Server


def make_casts(base: Path, count: int, mb: float, big_mb: float) -> list[Path]:
    """Real sealed casts (cast, chain, manifest) written by CastWriter: ``count`` of
    ``mb`` MB of terminal output, plus one of ``big_mb`` (a multipart upload)."""
    key = SigningKey.generate()
    sizes = [mb] * count + ([big_mb] if big_mb > 0 else [])
    corpus = terminal_output(int(max(sizes) * 1e6))
    casts = []
    for i, size in enumerate(sizes):
        path = base / f"bench-{i:03d}.cast"
        w = CastWriter(path, width=120, height=40, session_id=f"bench-{i}", signing_key=key)
        data = corpus[: int(size * 1e6)]
        for off in range(0, len(data), 4096):
            w.output(data[off : off + 4096])
        w.close()
        casts.append(path)
    return casts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--casts", type=int, default=20)
    ap.add_argument("--mb", type=float, default=5.0, help="output per ordinary cast, MB")
    ap.add_argument("--big-mb", type=float, default=80.0, help="one large cast, MB (0: none)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.update(CREDENTIALS)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        casts = make_casts(base, args.casts, args.mb, args.big_mb)
        files = [f for c in casts for f in cast_files(c)]
        total = sum(f.stat().st_size for f in files)
        server = S3Server(base)
        server.start()
        try:
            client = server.client()
            ours: list[float] = []
            baseline: list[float] = []
            for _ in range(args.rounds):
                bucket = server.bucket()
                t = time.perf_counter()
                for f in files:
                    client.put_object(Bucket=bucket, Key=f.name, Body=f.read_bytes())
                baseline.append(time.perf_counter() - t)

                bucket = server.bucket()
                cfg = S3Config(
                    bucket=bucket,
                    endpoint_url=server.endpoint,
                    region="us-east-1",
                    access_key_id_env=KEY_ENV,
                    secret_access_key_env=SECRET_ENV,
                )
                store = ObjectStore(cfg)
                t = time.perf_counter()
                for c in casts:
                    store.upload_cast(c, skip_stored=False)  # a fresh cast's first attempt
                ours.append(time.perf_counter() - t)
        finally:
            server.stop()
    t_base, t_ours = statistics.median(baseline), statistics.median(ours)
    print(
        json.dumps(
            {
                "casts": len(casts),
                "files": len(files),
                "MB": round(total / 1e6, 1),
                "baseline_put_object_MBps": round(total / t_base / 1e6, 1),
                "ours_upload_cast_MBps": round(total / t_ours / 1e6, 1),
                "ratio_to_baseline": round(t_base / t_ours, 3),
                "baseline_s_rounds": [round(x, 2) for x in baseline],
                "ours_s_rounds": [round(x, 2) for x in ours],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
