"""``castgate play``, ``export`` and ``evidence``: argument parsing and glue.

A recording is named by its file or by its session id; a session id is looked up in
the audit store of ``-c castgate.toml`` (or ./castgate.toml), and that read is logged
as a ``recording.read`` audit event (PCI DSS 10.2.1.3: every access to audit logs).
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recorder.errors import CastgateError

if TYPE_CHECKING:
    from recorder.config import Config
    from recorder.store import Store

_TIME = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+(?:\.\d*)?)$")


class ReplayCliError(CastgateError):
    """A user-facing error of play/export/evidence (one line, exit status 2)."""


def parse_offset(text: str) -> float:
    """Seconds from ``90``, ``90.5``, ``1:30`` or ``1:02:03``."""
    m = _TIME.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use 90, 1:30 or 1:02:03)")
    a, b, c = m.groups()
    if b is not None:
        return int(a) * 3600 + int(b) * 60 + float(c)
    if a is not None:
        return int(a) * 60 + float(c)
    return float(c)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def parse_when(text: str) -> datetime:
    """An ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date or time: {text!r} (use 2026-11-27 or 2026-11-27T14:00:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _actor() -> str:
    return os.environ.get("CASTGATE_IDENTITY") or getpass.getuser()


def _origin() -> str:
    return f"cli@{socket.gethostname()}"


def _config(explicit: str | None) -> tuple[Config | None, Path | None]:
    from castgate.runtime import find_config
    from recorder.config import load_config

    path = find_config(explicit)
    if path is None:
        return None, None
    return load_config(path), path


def _index_key(cfg: Config | None) -> bytes:
    from castgate.runtime import default_home
    from replay.seekindex import load_or_create_key

    keys = cfg.keys_dir if cfg is not None else default_home() / "keys"
    return load_or_create_key(keys)


def resolve_recording(target: str, config: str | None, purpose: str) -> tuple[Path, Config | None]:
    """The cast file for ``target`` (a path, or a session id looked up in the store,
    which logs the read)."""
    cfg, _ = _config(config)
    path = Path(target)
    if path.exists():
        return path, cfg
    if cfg is None:
        raise ReplayCliError(
            f"{target}: no such file (to play a session by id, give -c castgate.toml)"
        )
    from recorder.store import Store
    from replay.evidence import cast_file

    store = Store.open(cfg.store_url())
    try:
        row = store.get_session(target)
        cast = cast_file(cfg, row) if row is not None else None
        ok = cast is not None and cast.exists()
        store.add_event(
            "recording.read",
            _actor(),
            "success" if ok else "failure",
            _origin(),
            f"session {target}",
            {"purpose": purpose, "cast": str(cast) if cast else None},
            session_id=target if row is not None else None,
        )
    finally:
        store.close()
    if row is None:
        raise ReplayCliError(f"{target}: no such file or session")
    if cast is None or not cast.exists():
        raise ReplayCliError(f"session {target}: its recording {cast} is not there")
    return cast, cfg


def _progress(name: str) -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None
    shown = [False]

    def report(done: int, total: int) -> None:
        if done >= total and not shown[0]:
            return  # a small cast: indexed before a bar was worth showing
        shown[0] = True
        sys.stderr.write(
            f"\rindexing {name}: {100 * done // total:3d}% ({done / 1e6:.0f}/{total / 1e6:.0f} MB)"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def _cmd_play(args: argparse.Namespace) -> int:
    import time

    from replay.castfile import CastFile
    from replay.player import Options, Player, run_player
    from replay.seekindex import open_index

    path, cfg = resolve_recording(args.recording, args.config, "play")
    header = CastFile(path).header
    index = open_index(
        path, key=_index_key(cfg), backend=args.backend, progress=_progress(path.name)
    )
    idle = args.idle_limit if args.idle_limit is not None else header.idle_time_limit
    options = Options(speed=args.speed, idle_limit=idle, start=args.start)
    return run_player(Player(index, options, wall=time.monotonic()))


def _cmd_export(args: argparse.Namespace) -> int:
    from replay.export import export

    path, _ = resolve_recording(args.recording, args.config, f"export {args.format}")
    if args.output in (None, "-"):
        export(path, args.format, sys.stdout)
        sys.stdout.flush()
        return 0
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            export(path, args.format, fh)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_evidence(args: argparse.Namespace) -> int:
    from recorder.store import Store
    from replay.evidence import build_bundle, select_sessions

    given = [bool(args.session), args.since is not None or args.until is not None, bool(args.run)]
    if not any(given):
        raise ReplayCliError(
            "evidence: name sessions with --session ID, a run with --run ID, or a range with --since"
        )
    if sum(given) > 1:
        raise ReplayCliError("evidence: --session, --run and --since/--until are exclusive")
    if args.until is not None and args.since is None:
        raise ReplayCliError("evidence: --until needs --since")
    cfg, cfg_path = _config(args.config)
    if cfg is None:
        raise ReplayCliError("evidence: no config (-c castgate.toml)")
    store: Store = Store.open(cfg.store_url())
    run: dict[str, Any] | None = None
    try:
        until = args.until or datetime.now(UTC)
        if args.run:
            runs = store.list_runs(run_id=args.run)
            if not runs:
                raise ReplayCliError(f"evidence: no pipeline run {args.run} in the audit store")
            run = runs[0]
            rows = store.run_sessions(args.run)
            selection: dict[str, Any] = {"run": args.run}
        else:
            rows = select_sessions(store, args.session or (), args.since, until)
            selection = (
                {"sessions": list(args.session)}
                if args.session
                else {"since": args.since.isoformat(), "until": until.isoformat()}
            )
        selection["config"] = str(cfg_path)
        manifest = build_bundle(
            store,
            cfg,
            rows,
            Path(args.output),
            actor=_actor(),
            origin=_origin(),
            selection=selection,
            run=run,
        )
    finally:
        store.close()
    signed = f"signed by {manifest['key_id']}" if "signature" in manifest else "UNSIGNED"
    print(
        f"wrote {args.output}: {len(manifest['sessions'])} session(s), "
        f"{len(manifest['files'])} files, manifest {signed}"
    )
    print(f"check it with: castgate verify {args.output}")
    return 0


def add_replay_commands(sub: Any) -> None:
    """Register ``play``, ``export`` and ``evidence`` on the ``castgate`` subparsers."""
    s = sub.add_parser("play", help="play a cast in this terminal (keys: space . <- -> [ ] q)")
    s.add_argument("recording", metavar="FILE|SESSION")
    s.add_argument("--speed", type=_positive, default=1.0, help="playback speed factor")
    s.add_argument(
        "--idle-limit",
        type=_positive,
        metavar="S",
        help="shorten pauses longer than S seconds to S (default: the cast's idle_time_limit)",
    )
    s.add_argument(
        "--from",
        dest="start",
        type=parse_offset,
        default=0.0,
        metavar="T",
        help="start at T (seconds, MM:SS or H:MM:SS)",
    )
    s.add_argument("--backend", choices=["avt", "pyte"], help="terminal emulator (default avt)")
    s.add_argument("-c", "--config", help="castgate.toml, to find a SESSION's recording")
    s.set_defaults(func=_cmd_play)

    s = sub.add_parser("export", help="export a cast as txt, a self-contained html page, or v3")
    s.add_argument("recording", metavar="FILE|SESSION")
    s.add_argument("--format", "-f", required=True, choices=["txt", "html", "v3"])
    s.add_argument("-o", "--output", metavar="OUT", help="output file (default: stdout)")
    s.add_argument("-c", "--config", help="castgate.toml, to find a SESSION's recording")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("evidence", help="write a PCI DSS evidence bundle for sessions or a run")
    s.add_argument("--session", action="append", metavar="ID", help="a session (repeatable)")
    s.add_argument("--run", metavar="ID", help="a pipeline run (castgate runs), with its timeline")
    s.add_argument("--since", type=parse_when, metavar="T", help="sessions started at or after T")
    s.add_argument("--until", type=parse_when, metavar="T", help="... and before T (default: now)")
    s.add_argument("-o", "--output", required=True, metavar="DIR", help="new directory")
    s.add_argument("-c", "--config", help="castgate.toml (default: ./castgate.toml)")
    s.set_defaults(func=_cmd_evidence)
