"""The ``castgate`` command. Subcommands import their modules lazily so that
``castgate verify`` does not pay for the relay or the console."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from castgate.replay_cli import add_replay_commands, parse_when
from recorder.errors import CastgateError

if TYPE_CHECKING:
    from castgate.client import Api

Handler = Callable[[argparse.Namespace], int]


class CliError(CastgateError):
    """A user-facing error: printed as one line, exit status 2."""


def _cmd_init(args: argparse.Namespace) -> int:
    from castgate.initdir import init_dir

    res = init_dir(Path(args.dir))
    print(f"created {res.config_path}")
    print(f"signing public key (give it to auditors): {res.public_key}")
    print(f"relay SSH host key (for agents' known_hosts): {res.host_key_line}")
    print(f"demo identity 'ci-agent' token (shown once, also in {res.token_file}):")
    print(f"  {res.token}")
    return 0


def _cmd_rec(args: argparse.Namespace) -> int:
    from castgate.rec import record_command
    from castgate.runtime import load_runtime

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("rec: no command given (castgate rec -o FILE -- CMD...)")
    rt = load_runtime(args.config)
    try:
        return record_command(rt, Path(args.output), cmd)
    finally:
        rt.close()


def _cmd_verify(args: argparse.Namespace) -> int:
    from castgate.paths import find_config
    from castgate.verify import StoreCheckpoints, exit_code, fetch_missing, verify_paths
    from recorder.signing import PUBLIC_NAME, load_public

    pinned = []
    if args.key:
        pinned.append(load_public(Path(args.key)))
    else:
        cfg_path = find_config(args.config)
        if cfg_path is not None:
            from recorder.config import load_config

            cfg = load_config(cfg_path)
            pub = cfg.keys_dir / PUBLIC_NAME
            if pub.exists():
                pinned.append(load_public(pub))
            # The other relays of the deployment (casts recorded there, read from S3).
            pinned.extend(load_public(cfg.resolve(k)) for k in cfg.cluster.trusted_keys)
    cfg_path = find_config(args.config)
    checkpoints = StoreCheckpoints(cfg_path) if cfg_path is not None else None
    try:
        files = fetch_missing([Path(p) for p in args.files], cfg_path)  # from [s3]
        reports = verify_paths(files, pinned, checkpoints)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    for r in reports:
        print(r.line())
    return exit_code(reports)


def _cmd_relay(args: argparse.Namespace) -> int:
    from castgate.paths import find_config
    from recorder.config import load_config
    from relay.server import run_relay

    path = find_config(args.config)
    if path is None:
        raise CliError("relay: no config (castgate relay -c castgate.toml)")
    cfg = load_config(path)
    if args.worker is not None:
        from relay.workers import worker_config

        return run_relay(worker_config(cfg, args.worker), worker=args.worker)
    workers = args.workers or cfg.listen.workers
    if workers > 1:
        from relay.workers import supervise

        return supervise(cfg, path, workers)
    return run_relay(cfg)


def _api(args: argparse.Namespace) -> Api:
    from castgate.client import find_api

    return find_api(args.config, args.token)


def _cmd_sessions(args: argparse.Namespace) -> int:
    from castgate.client import cmd_sessions

    return cmd_sessions(_api(args), args.live, args.json)


def _cmd_runs(args: argparse.Namespace) -> int:
    from castgate.client import cmd_runs

    since = args.since.isoformat() if args.since is not None else None
    return cmd_runs(_api(args), since, args.json)


def _cmd_watch(args: argparse.Namespace) -> int:
    from castgate.client import cmd_watch

    return cmd_watch(_api(args), args.session)


def _cmd_approvals(args: argparse.Namespace) -> int:
    from castgate.client import cmd_approvals

    if args.action == "show":
        from castgate.client import cmd_approval_show

        if args.id is None:
            raise CliError("approvals show: which request? (castgate approvals show ID)")
        return cmd_approval_show(_api(args), args.id, args.json)
    if args.id is not None:
        raise CliError("approvals: an id goes after 'show' (castgate approvals show ID)")
    return cmd_approvals(_api(args), args.all, args.json)


def _cmd_decide(args: argparse.Namespace) -> int:
    from castgate.client import cmd_decide

    approve = args.command == "approve"
    if not approve and not args.reason:
        raise CliError("deny: --reason is required")
    return cmd_decide(_api(args), args.id, approve, args.reason)


def _cmd_console(args: argparse.Namespace) -> int:
    import os

    from castgate.client import Api, find_api

    if args.api:
        token = args.token or os.environ.get("CASTGATE_TOKEN")
        if not token:
            raise CliError("console: no token: give --token or set CASTGATE_TOKEN")
        api = Api(args.api.rstrip("/"), token)
    else:
        api = find_api(args.config, args.token)
    from console.app import run

    return run(api.url, api.token)


def _cmd_kubeconfig(args: argparse.Namespace) -> int:
    from castgate.kubeconfig import kubeconfig
    from recorder.config import load_config

    cfg = load_config(args.config or "castgate.toml")
    print(
        kubeconfig(
            cfg,
            args.target,
            server=args.server,
            token_env=args.token_env,
            namespace=args.namespace,
        ),
        end="",
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from castgate.demo import run_demo

    return run_demo(
        Path(args.dir) if args.dir else None, console=not args.no_console, keep=args.keep
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(
        prog="castgate",
        description="Access gateway that masks card data and records every session.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a working directory with config, keys, identity")
    s.add_argument("dir")
    s.set_defaults(func=_cmd_init)

    s = sub.add_parser("rec", help="record a local command in a PTY, masked")
    s.add_argument("-o", "--output", required=True, help="cast file to create")
    s.add_argument("-c", "--config", help="castgate.toml (default: ./castgate.toml if present)")
    s.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    s.set_defaults(func=_cmd_rec)

    s = sub.add_parser(
        "verify",
        help="check casts: exit 0 intact, 1 tampered, truncated (also truncated-authentic) "
        "or unsealed, 2 unreadable",
    )
    s.add_argument("files", nargs="+", metavar="FILE|DIR")
    s.add_argument("--key", help="relay public key (PEM) to pin the signature to")
    s.add_argument("-c", "--config", help="take the relay public key from this config")
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser("relay", help="run the relay (SSH, PostgreSQL and API listeners)")
    s.add_argument("-c", "--config", help="castgate.toml (default: ./castgate.toml)")
    s.add_argument(
        "--workers",
        type=int,
        choices=range(1, 65),
        metavar="N",
        help="relay processes sharing the listeners (default: listen.workers, 1)",
    )
    s.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    s.set_defaults(func=_cmd_relay)

    def client(name: str, text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=text)
        sp.add_argument("-c", "--config", help="castgate.toml of the relay (or CASTGATE_API)")
        sp.add_argument("--token", help="bearer token (default: CASTGATE_TOKEN)")
        return sp

    s = client("sessions", "list sessions (control API)")
    s.add_argument("--live", action="store_true", help="only live sessions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_sessions)

    s = client("runs", "list pipeline runs: initiator, repository, sessions, counts (control API)")
    s.add_argument("--since", type=parse_when, metavar="T", help="runs with a session since T")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_runs)

    s = client("watch", "render a live session in this terminal")
    s.add_argument("session")
    s.set_defaults(func=_cmd_watch)

    s = client("approvals", "list pending approval requests; 'show ID': one in full")
    s.add_argument("action", nargs="?", choices=["show"], help="show one request in full")
    s.add_argument("id", nargs="?", type=int)
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="decided ones too")
    s.set_defaults(func=_cmd_approvals)

    for name, text in (("approve", "approve a held command"), ("deny", "deny a held command")):
        s = client(name, text)
        s.add_argument("id", type=int)
        s.add_argument("--reason", "-r")
        s.set_defaults(func=_cmd_decide)

    s = client("console", "the operator console (Textual): sessions, live watch, approvals")
    s.add_argument("--api", help="control API URL, e.g. http://127.0.0.1:8420 (or CASTGATE_API)")
    s.set_defaults(func=_cmd_console)

    s = sub.add_parser("kubeconfig", help="print a kubeconfig for a kubernetes target")
    s.add_argument("-c", "--config", help="castgate.toml of the relay (default: ./castgate.toml)")
    s.add_argument("--target", required=True, help="the kubernetes target")
    s.add_argument("--server", help="https://HOST:PORT agents reach the relay at")
    s.add_argument("--token-env", default="CASTGATE_TOKEN", help="variable with the token")
    s.add_argument("--namespace", "-n", help="default namespace of the context")
    s.set_defaults(func=_cmd_kubeconfig)

    s = sub.add_parser("demo", help="run the embedded default end to end")
    s.add_argument("--dir", help="working directory (default: a new temporary one)")
    s.add_argument("--no-console", action="store_true", help="do not open the console at the end")
    s.add_argument(
        "--keep",
        action="store_true",
        help="keep the relay and its targets running after the script, until Ctrl-C",
    )
    s.set_defaults(func=_cmd_demo)

    add_replay_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; known errors become one line on stderr."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except (CastgateError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        print(f"castgate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
