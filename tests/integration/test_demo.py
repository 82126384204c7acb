"""``castgate demo``, README's first Quick start command, runs end to end without sshd."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from recorder.masking import luhn_complete


def test_demo_runs_the_embedded_default(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "castgate"),
            "demo",
            "--no-console",
            "--dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    visa = luhn_complete("411111111111111")
    assert visa not in out and f"{visa[:6]}******{visa[-4:]}" in out
    assert "blocked by rule no-rm-rf" in out and "[exit status 126]" in out
    assert "approval #1 required" in out and "granted by alice" in out
    assert "app restarted (simulated)" in out
    assert out.count(": INTACT: ") == 3
    assert "Warning" not in res.stderr
    casts = list((tmp_path / "d" / "data" / "recordings").glob("*.cast"))
    assert len(casts) == 3 and all(visa not in c.read_text() for c in casts)
