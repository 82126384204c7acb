"""Removes the demo's throwaway PostgreSQL cluster once the demo and its server are
both gone, however the demo ended (``python -m castgate.pg_reaper SERVER_PID DIR``).

Started by castgate/localpg.py with a pipe on its standard input whose only writer is
the demo: end of file means the demo has ended (a clean stop closes the pipe after it
removed the cluster itself; a SIGKILL closes it with the process). The server, which
gets SIGINT from the kernel when the demo dies, may still be shutting down: the cluster
is removed after it has exited, since removing a running cluster's files leaves it
serving from deleted ones.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) has stopped serving.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def main(argv: list[str]) -> int:
    """Wait for end of input, then for the server to exit; remove the cluster."""
    server, base = int(argv[0]), Path(argv[1])
    sys.stdin.buffer.read()
    deadline = time.monotonic() + 120  # past it the server is hung: remove anyway
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
