"""``castgate export``: a cast as text for grep, as one self-contained HTML page with
the asciinema player, or converted to asciicast v3.

- ``txt``: one block per screen change, stamped with its time: the lines that scrolled
  off the top since the block before, then the screen's text once the output settled
  (no output for ``settle`` seconds). Markers get their own line. Every line that was
  ever on the screen of a scrolling session is in the file, in order.
- ``html``: the asciinema-player JS and CSS (vendored, replay/assets/asciinema-player,
  Apache-2.0) and the cast inlined into one page that works offline from a file, with
  the recording's markers listed as links that seek the player. The poster is the
  first frame with text on it.
- ``v3``: asciicast v3: a ``term`` header, intervals instead of absolute times, an
  ``x`` event with the exit status when the cast's manifest records it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from recorder.integrity import manifest_path
from replay.castfile import CastFile, Event, parse_size
from replay.player import fmt_time
from replay.terminal import Terminal, new_terminal

FORMATS = ("txt", "html", "v3")
PLAYER_VERSION = "3.18.0"


def _stamp(t: float) -> str:
    return f"{fmt_time(t)}.{round((t - int(t)) * 1000) % 1000:03}"


def export_txt(path: Path, out: TextIO, *, settle: float = 0.1, backend: str | None = None) -> None:
    """Write the text of each screen change of the cast at ``path`` to ``out``."""
    cast = CastFile(path)
    h = cast.header
    term = new_terminal(h.width, h.height, backend)
    scrolled: list[str] = []
    out.write(
        f"# castgate text export of {path.name}: asciicast v{h.version}, {h.width}x{h.height}\n"
    )
    out.write("# each block: lines that scrolled off since the block before, then the screen\n")
    last_screen: str | None = None
    dirty = False
    changed_at = 0.0

    def block(t: float) -> None:
        nonlocal last_screen, dirty
        screen = term.text()
        if scrolled or screen != last_screen:
            out.write(f"\n--- {_stamp(t)} ---\n")
            for line in scrolled:
                out.write(line + "\n")
            scrolled.clear()
            if screen:
                out.write(screen + "\n")
            last_screen = screen
        dirty = False

    end = 0.0
    for _, ev in cast.events():
        if dirty and (ev.time - changed_at >= settle or ev.code == "m"):
            block(changed_at)
        end = ev.time
        if ev.code == "o":
            scrolled.extend(term.feed_scrolled(ev.data))
            dirty, changed_at = True, ev.time
        elif ev.code == "r":
            size = parse_size(ev.data)
            if size is not None:
                scrolled.extend(term.resize_scrolled(*size))
                dirty, changed_at = True, ev.time
        elif ev.code == "m":
            out.write(f"\n--- {_stamp(ev.time)} marker: {ev.data} ---\n")
    if dirty:
        block(changed_at)
    trailer = " (last line torn)" if cast.torn else ""
    out.write(f"\n--- {_stamp(end)} end{trailer} ---\n")


def _exit_status(path: Path) -> int | None:
    try:
        manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    status = manifest.get("exit_status") if isinstance(manifest, dict) else None
    return status if isinstance(status, int) else None


def v3_lines(path: Path) -> Iterator[str]:
    """The cast at ``path`` as asciicast v3 lines (without newlines)."""
    cast = CastFile(path)
    h = cast.header
    raw = dict(h.raw)
    term: dict[str, Any] = {"cols": h.width, "rows": h.height}
    if h.term_type:
        term["type"] = h.term_type
    if h.theme:
        term["theme"] = h.theme
    header: dict[str, Any] = {"version": 3, "term": term}
    for key in ("timestamp", "idle_time_limit", "command", "title"):
        if raw.get(key) is not None:
            header[key] = raw[key]
    env = {k: v for k, v in h.env.items() if k != "TERM"}
    if env:
        header["env"] = env
    for key, value in raw.items():  # keep extensions (castgate's session id, tags)
        if (
            key not in ("version", "width", "height", "term", "env", "theme", "stdout", "duration")
            and key not in header
        ):
            header[key] = value
    yield json.dumps(header, ensure_ascii=False)
    # Intervals from whole microseconds, so that summing them gives back the times.
    prev = 0
    saw_exit = False
    for _, ev in cast.events():
        us = round(ev.time * 1_000_000)
        yield json.dumps([(us - prev) / 1_000_000, ev.code, ev.data], ensure_ascii=False)
        prev = us
        saw_exit = saw_exit or ev.code == "x"
    status = _exit_status(path)
    if not saw_exit and status is not None:
        yield json.dumps([0.0, "x", str(status)])


def export_v3(path: Path, out: TextIO) -> None:
    """Write the cast at ``path`` converted to asciicast v3."""
    for line in v3_lines(path):
        out.write(line + "\n")


def _asset(name: str) -> str:
    return (
        resources.files("replay")
        .joinpath("assets", "asciinema-player", name)
        .read_text(encoding="utf-8")
    )


def _poster_time(path: Path) -> float:
    """Time of the first frame with text on the screen (0 when there is none)."""
    cast = CastFile(path)
    term = new_terminal(cast.header.width, cast.header.height)
    for n, (_, ev) in enumerate(cast.events()):
        if ev.code in ("o", "r"):
            _apply(term, ev)
            if term.text().strip():
                return ev.time
        if n > 100_000:
            break
    return 0.0


def _apply(term: Terminal, ev: Event) -> None:
    if ev.code == "o":
        term.feed(ev.data)
    else:
        size = parse_size(ev.data)
        if size is not None:
            term.resize(*size)


def _script_json(value: Any) -> str:
    # In a <script> element, "</script>" or "<!--" inside the data would end it early;
    # JSON may spell "<" as \u003c anywhere it appears (only inside strings).
    text = json.dumps(value, ensure_ascii=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


_PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
.meta { color: #555; font-size: 0.9em; margin: 0 0 1em; }
#markers li { margin: 0.2em 0; }
#markers a { font-family: monospace; }
footer { color: #777; font-size: 0.8em; margin-top: 2em; }
"""


def export_html(path: Path, out: TextIO, *, title: str | None = None) -> None:
    """Write one self-contained HTML page that plays the cast at ``path``."""
    cast = CastFile(path)
    h = cast.header
    text = path.read_text(encoding="utf-8", errors="replace")
    markers: list[tuple[float, str]] = []
    duration = 0.0
    for _, ev in cast.events():
        duration = ev.time
        if ev.code == "m":
            markers.append((ev.time, ev.data))
    name = title or h.title or path.name
    poster = _poster_time(path)
    options = {
        "cols": h.width,
        "rows": h.height,
        "preload": True,
        # npt:T shows the events before T, so a hair after the first frame with text.
        "poster": f"npt:{poster + 0.001:.3f}",
        "fit": "width",
        "markers": [[t, label] for t, label in markers],
        "terminalFontFamily": "'DejaVu Sans Mono', 'Liberation Mono', monospace",
    }
    if h.idle_time_limit:
        options["idleTimeLimit"] = h.idle_time_limit
    session = (
        h.raw.get("castgate", {}).get("session")
        if isinstance(h.raw.get("castgate"), dict)
        else None
    )
    meta = [f"asciicast v{h.version}", f"{h.width}x{h.height}", f"duration {fmt_time(duration)}"]
    if session:
        meta.insert(0, f"session {session}")
    if cast.torn:
        meta.append("last line torn (recording cut short)")
    items = "".join(
        f'<li><a href="#" data-time="{t:.6f}">{_stamp(t)}</a> {html.escape(label)}</li>'
        for t, label in markers
    )
    marker_list = f'<ol id="markers">{items}</ol>' if markers else '<p id="markers">No markers.</p>'
    out.write(
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{html.escape(name)}</title>\n"
        f"<style>{_asset('asciinema-player.css')}</style>\n"
        f"<style>{_PAGE_CSS}</style>\n"
        "</head><body>\n"
        f"<h1>{html.escape(name)}</h1>\n"
        f'<p class="meta">{html.escape(" · ".join(meta))}</p>\n'
        '<div id="player"></div>\n'
        f"<h2>Markers</h2>\n{marker_list}\n"
        f"<footer>Exported by castgate from {html.escape(path.name)}. Player: asciinema-player "
        f"{PLAYER_VERSION} (Apache-2.0).</footer>\n"
        f"<script>{_asset('asciinema-player.min.js')}</script>\n"
        f'<script id="cast" type="application/json">{_script_json(text)}</script>\n'
        f'<script id="options" type="application/json">{_script_json(options)}</script>\n'
        "<script>\n"
        "const cast = JSON.parse(document.getElementById('cast').textContent);\n"
        "const options = JSON.parse(document.getElementById('options').textContent);\n"
        # replay.html#t=12.5 opens the recording at 12.5 s (links from an evidence timeline).
        "const at = /^#t=([0-9]+(?:\\.[0-9]+)?)$/.exec(location.hash);\n"
        "if (at) { options.startAt = parseFloat(at[1]); options.poster = 'npt:' + at[1]; }\n"
        "const player = AsciinemaPlayer.create({data: cast}, "
        "document.getElementById('player'), options);\n"
        "document.querySelectorAll('#markers a').forEach(a => a.addEventListener('click', e => {\n"
        "  e.preventDefault(); player.seek(parseFloat(a.dataset.time));\n"
        "}));\n"
        "</script>\n</body></html>\n"
    )


def export(path: Path, fmt: str, out: TextIO) -> None:
    """Export the cast at ``path`` in ``fmt`` (txt, html or v3) to ``out``."""
    if fmt == "txt":
        export_txt(path, out)
    elif fmt == "html":
        export_html(path, out)
    elif fmt == "v3":
        export_v3(path, out)
    else:
        raise ValueError(f"unknown export format {fmt!r}")
