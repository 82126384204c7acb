"""A real OpenSSH server as an SSH *target* for the integration tests, and a bare git repo.

``sshd_target`` (session scope) runs ``/usr/sbin/sshd`` on 127.0.0.1 with a throwaway
ed25519 host key and an authorised ed25519 client key for the current user (root in the
test environment, allowed with ``PermitRootLogin prohibit-password``: key auth only).
The server is required, never optional: scripts/setup installs openssh-server, and a
missing binary fails the run rather than skipping the tests that would have caught a bug.

``git_bare_repo`` (function scope) gives a bare repository with one commit on ``main``,
built without reading or touching the developer's global or system git config.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SshTarget", "git_bare_repo", "sshd_target"]

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
_HOST = "127.0.0.1"
_START_ATTEMPTS = 3
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)


@dataclass(frozen=True)
class SshTarget:
    """Where the test sshd listens, whom to log in as, and the keys to do it with."""

    host: str
    port: int
    user: str
    client_key: Path
    host_key_line: str
    known_hosts: Path

    def ssh_args(self) -> list[str]:
        """OpenSSH client arguments for a direct, non-interactive, host-key-pinned login."""
        return [
            "-p",
            str(self.port),
            "-i",
            str(self.client_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _keygen(path: Path) -> str:
    """Generate an ed25519 key pair at ``path``; return the public line without comment."""
    subprocess.run(
        ["ssh-keygen", "-t", "ed25519", "-N", "", "-q", "-C", "", "-f", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=30,
    )
    key_type, blob = path.with_name(path.name + ".pub").read_text().split()[:2]
    return f"{key_type} {blob}"


def _write_config(base: Path, port: int, host_key: Path, authorized_keys: Path) -> Path:
    settings = [
        f"ListenAddress {_HOST}:{port}",
        f'HostKey "{host_key}"',
        f'PidFile "{base / "sshd.pid"}"',
        f'AuthorizedKeysFile "{authorized_keys}"',
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "AcceptEnv LANG LC_* CASTGATE_TEST_*",
        "Subsystem sftp internal-sftp",
        "AllowTcpForwarding yes",
        "X11Forwarding no",
        "MaxSessions 100",
        "MaxStartups 200",
        "ClientAliveInterval 0",
        "LogLevel ERROR",
        f"Ciphers {','.join(_CIPHERS)}",
    ]
    config = base / "sshd_config"
    config.write_text("\n".join(settings) + "\n")
    return config


def _log_tail(logfile: Path, lines: int = 20) -> str:
    try:
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no sshd log)"


def _answers_banner(port: int) -> bool:
    """True once the port accepts a connection and sends an SSH identification line."""
    try:
        with socket.create_connection((_HOST, port), timeout=1.0) as sock:
            data = b""
            while b"\n" not in data and len(data) < 1024:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return data.startswith(b"SSH-")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _start(config: Path, port: int, logfile: Path) -> subprocess.Popen[bytes] | None:
    """Start sshd and wait until it answers; None if it exited (e.g. port taken)."""
    with logfile.open("ab") as log:
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                proc.wait()
                return None
            if _answers_banner(port):
                return proc
            time.sleep(0.02)
    except BaseException:
        _stop(proc)
        raise
    _stop(proc)
    pytest.fail(
        f"sshd did not answer on {_HOST}:{port} within {_START_TIMEOUT_S}s:\n{_log_tail(logfile)}"
    )


@pytest.fixture(scope="session")
def sshd_target() -> Iterator[SshTarget]:
    """Run a real OpenSSH sshd for the test session; stop it at the end."""
    if not SSHD.is_file():
        pytest.fail("openssh-server is not installed: run scripts/setup")
    # The privilege separation directory; the package normally creates it at boot.
    PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    base = Path(tempfile.mkdtemp(prefix="castgate-sshd-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        host_key = base / "ssh_host_ed25519_key"
        host_key_line = _keygen(host_key)
        client_key = base / "id_ed25519"
        authorized_keys = base / "authorized_keys"
        authorized_keys.write_text(_keygen(client_key) + "\n")
        logfile = base / "sshd.log"
        for _attempt in range(_START_ATTEMPTS):
            port = _free_port()
            config = _write_config(base, port, host_key, authorized_keys)
            proc = _start(config, port, logfile)
            if proc is not None:
                break
        if proc is None:
            pytest.fail(f"sshd exited on start ({_START_ATTEMPTS} attempts):\n{_log_tail(logfile)}")
        known_hosts = base / "known_hosts"
        known_hosts.write_text(f"[{_HOST}]:{port} {host_key_line}\n")
        yield SshTarget(
            host=_HOST,
            port=port,
            user=user,
            client_key=client_key,
            host_key_line=host_key_line,
            known_hosts=known_hosts,
        )
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def _git_env() -> dict[str, str]:
    """The environment for git: no global/system config, a fixed author and committer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Castgate Test",
        GIT_AUTHOR_EMAIL="test@castgate.invalid",
        GIT_COMMITTER_NAME="Castgate Test",
        GIT_COMMITTER_EMAIL="test@castgate.invalid",
        GIT_TERMINAL_PROMPT="0",
    )
    return env


def _git(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [
            "git",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "user.name=Castgate Test",
            "-c",
            "user.email=test@castgate.invalid",
            *args,
        ],
        cwd=cwd,
        env=_git_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0:
        pytest.fail(f"git {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")


@pytest.fixture
def git_bare_repo(tmp_path: Path) -> Path:
    """A bare repository with one commit (a README) on ``main``; its absolute path."""
    bare = (tmp_path / "repo.git").resolve()
    work = tmp_path / "work"
    _git("init", "--bare", "-q", str(bare), cwd=tmp_path)
    _git("clone", "-q", str(bare), str(work), cwd=tmp_path)
    (work / "README").write_text("castgate test repository\n")
    _git("checkout", "-q", "-B", "main", cwd=work)
    _git("add", "README", cwd=work)
    _git("commit", "-q", "-m", "Initial commit", cwd=work)
    _git("push", "-q", "origin", "main", cwd=work)
    shutil.rmtree(work)
    return bare
