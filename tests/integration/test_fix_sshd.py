"""The ``sshd_target`` and ``git_bare_repo`` fixtures work with real SSH clients."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import asyncssh
import paramiko
import pytest

from tests.fix_sshd import SshTarget

BULK_BYTES = 50 * 1024 * 1024


def ssh(target: SshTarget, command: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ssh", *target.ssh_args(), f"{target.user}@{target.host}", command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def test_openssh_client_runs_command_and_returns_exit_status(sshd_target: SshTarget) -> None:
    result = ssh(sshd_target, "echo hello; exit 3")
    assert result.stdout == b"hello\n", result.stderr
    assert result.returncode == 3


async def _asyncssh_run(
    target: SshTarget, pinned: str, command: str
) -> asyncssh.SSHCompletedProcess:
    async with asyncssh.connect(
        target.host,
        target.port,
        username=target.user,
        client_keys=[str(target.client_key)],
        known_hosts=([asyncssh.import_public_key(pinned)], [], []),
        agent_path=None,
        config=[],
    ) as conn:
        return await conn.run(command, check=False)


def test_asyncssh_with_pinned_host_key(sshd_target: SshTarget) -> None:
    result = asyncio.run(_asyncssh_run(sshd_target, sshd_target.host_key_line, "echo $USER"))
    assert result.exit_status == 0
    assert result.stdout == f"{sshd_target.user}\n"


def test_asyncssh_refuses_wrong_pinned_host_key(sshd_target: SshTarget) -> None:
    wrong = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(_asyncssh_run(sshd_target, wrong, "true"))


def test_paramiko_client_runs_command(sshd_target: SshTarget) -> None:
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(str(sshd_target.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            sshd_target.host,
            port=sshd_target.port,
            username=sshd_target.user,
            pkey=paramiko.Ed25519Key.from_private_key_file(str(sshd_target.client_key)),
            allow_agent=False,
            look_for_keys=False,
            timeout=10,
        )
        stdin, stdout, stderr = client.exec_command("echo paramiko; exit 5", timeout=10)
        stdin.close()
        assert stdout.read() == b"paramiko\n"
        assert stdout.channel.recv_exit_status() == 5
        stderr.close()
        stdout.close()
    finally:
        client.close()


def test_git_clone_over_ssh(sshd_target: SshTarget, git_bare_repo: Path, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_SSH_COMMAND=subprocess.list2cmdline(["ssh", *sshd_target.ssh_args()]),
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
    )
    result = subprocess.run(
        [
            "git",
            "clone",
            "-q",
            f"{sshd_target.user}@{sshd_target.host}:{git_bare_repo}",
            str(clone),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (clone / "README").is_file()
    branch = subprocess.run(
        ["git", "-C", str(clone), "branch", "--show-current"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert branch.stdout.strip() == "main"


def test_bulk_transfer(sshd_target: SshTarget) -> None:
    result = ssh(sshd_target, "head -c 50M /dev/zero", timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == BULK_BYTES
