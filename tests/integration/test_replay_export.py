"""``castgate export``: the html page in headless Chromium (the player renders the first
frame), txt for grep, and v3 that reads back to the same events."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from replay.castfile import CastFile

CASTGATE = str(Path(sys.executable).parent / "castgate")
CHROMIUM = [
    "chromium",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def castgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CASTGATE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "CASTGATE_HOME": str(cwd), "HOME": str(cwd)},
    )


def write_demo_cast(path: Path) -> None:
    events = [
        [0.2, "o", "\x1b[1;32m$\x1b[0m deploy --env prod\r\n"],
        [0.4, "o", "\x1b[33mFIRST-FRAME-MARK\x1b[0m step one\r\n"],
        [1.0, "m", "approval #17 granted by alice"],
        [1.5, "o", "".join(f"scrolled line {i}\r\n" for i in range(40))],
        [2.0, "o", "\x1b[?1049h\x1b[H\x1b[2J\x1b[7m top dashboard \x1b[0m"],
        [2.5, "r", "100x30"],
        [3.0, "o", "\x1b[?1049l"],
        [3.5, "m", "blocked: no-drop-database"],
        [4.0, "o", "bye\r\n"],
    ]
    header = {"version": 2, "width": 80, "height": 24, "title": "deploy session"}
    path.write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n", encoding="utf-8")


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB or RGBA non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    pixels = [row[x : x + 3] for row in rows for x in range(0, stride, channels)]
    return width, height, pixels


def test_html_export_plays_in_headless_chromium(tmp_path: Path) -> None:
    cast = tmp_path / "demo.cast"
    write_demo_cast(cast)
    res = castgate("export", str(cast), "--format", "html", "-o", "demo.html", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "demo.html").read_text()
    # One self-contained file: no external scripts, styles or fetches.
    assert "<script src" not in page and "<link" not in page and "AsciinemaPlayer" in page
    url = (tmp_path / "demo.html").as_uri()
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(
        [*CHROMIUM, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The player drew its terminal, and the first frame's text is on its lines.
    assert "ap-line" in dom.stdout
    assert "FIRST-FRAME-MARK" in dom.stdout and "deploy --env prod" in dom.stdout
    assert "approval #17 granted by alice" in dom.stdout  # the marker list
    shot = tmp_path / "shot.png"
    res2 = subprocess.run(
        [
            *CHROMIUM,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--window-size=1000,700",
            f"--screenshot={shot}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res2.returncode == 0 and shot.exists(), res2.stderr[-2000:]
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1000, 700)
    colours = set(pixels)
    assert len(colours) > 20  # text, terminal, page: not a blank page
    # The terminal's dark background covers a large part of the page.
    dark = sum(1 for p in pixels if max(p) < 60)
    assert dark > width * height // 10


def test_txt_export_has_every_line_and_the_markers(tmp_path: Path) -> None:
    cast = tmp_path / "demo.cast"
    write_demo_cast(cast)
    res = castgate("export", str(cast), "--format", "txt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for i in range(40):  # lines that scrolled past within one burst
        assert f"scrolled line {i}\n" in text
    assert "--- 00:01.000 marker: approval #17 granted by alice ---" in text
    assert "top dashboard" in text  # the full-screen app's screen
    assert "\x1b" not in text
    blocks = text.split("\n--- ")
    assert blocks[-1].startswith("00:04.000 end")


def test_v3_export_reads_back_to_the_same_events(tmp_path: Path) -> None:
    cast = tmp_path / "demo.cast"
    write_demo_cast(cast)
    (tmp_path / "demo.cast.manifest.json").write_text(json.dumps({"exit_status": 3}))
    res = castgate("export", str(cast), "--format", "v3", "-o", "demo-v3.cast", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "demo-v3.cast"
    header = json.loads(out.read_text().splitlines()[0])
    assert header["version"] == 3 and header["term"]["cols"] == 80
    assert header["title"] == "deploy session"
    original = [ev for _, ev in CastFile(cast).events()]
    converted = [ev for _, ev in CastFile(out).events()]
    assert converted[-1].code == "x" and converted[-1].data == "3"
    assert [(e.code, e.data) for e in converted[:-1]] == [(e.code, e.data) for e in original]
    assert all(abs(a.time - b.time) < 1e-6 for a, b in zip(original, converted[:-1], strict=True))
    # Exporting the v3 file again gives the same file: v3 in, v3 out.
    again = castgate("export", str(out), "--format", "v3", cwd=tmp_path)
    assert again.stdout == out.read_text()
