"""The operator console inside an SSH session: the real OpenSSH client in tmux, driven
with send-keys and read with capture-pane."""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from pathlib import Path

from tests.fix_relay import Held, Relay, wait_for


def tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], capture_output=True, text=True, timeout=15, check=True
    ).stdout


def test_console_over_ssh_lists_sessions_and_approves(relay: Relay) -> None:
    assert relay.ssh("web", "echo before-console").returncode == 0
    held = Held(relay, "systemctl restart app 2>/dev/null; echo console-approved")
    held.approval_id()
    name = f"cg-{uuid.uuid4().hex[:8]}"
    ssh = " ".join(
        shlex.quote(a)
        for a in [
            "ssh",
            "-tt",
            *relay.ssh_args(relay.operator_key),
            "castgate@127.0.0.1",
            "console",
        ]
    )
    wanted = f"castgate.cli\0console\0--api\0{relay.api}\0".encode()

    def consoles() -> list[str]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:1]
                if wanted in (proc / "cmdline").read_bytes() and state != ["Z"]:
                    found.append(proc.name)
            except (OSError, IndexError):
                pass  # gone meanwhile
        return found

    tmux("new-session", "-d", "-s", name, "-x", "140", "-y", "40", ssh)
    try:

        def screen() -> str:
            return tmux("capture-pane", "-p", "-t", name)

        wait_for(lambda: "ci-agent" in screen() and "web" in screen(), 30)
        assert consoles(), "the relay's console process is not where the test looks"
        assert "ssh" in screen()
        tmux("send-keys", "-t", name, "F3")
        wait_for(lambda: "systemctl restart app" in screen(), 20)
        time.sleep(0.5)
        tmux("send-keys", "-t", name, "a")
        assert held.finish() == 0, held.err
        assert b"console-approved" in held.out
        assert b"granted by alice" in held.err
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True, timeout=15)

    # The ssh client is gone: the console the relay ran for it ends too (SIGHUP, or
    # SIGKILL after a grace period if it ignores that, as under nohup).
    wait_for(lambda: not consoles(), 20)
