"""A real ``castgate relay`` process in front of the real sshd target, with identities,
targets and rules for the integration tests."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from tests.fix_sshd import SshTarget

BIN = Path(sys.executable).parent
CASTGATE = str(BIN / "castgate")

TOKENS = {
    "ci-agent": "cgt_agent_token_for_tests_only_0001",
    "alice": "cgt_alice_token_for_tests_only_0002",
    "bob": "cgt_bob_token_for_tests_only_0003",
    "outsider": "cgt_outsider_token_for_tests_0004",
}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Relay:
    """A running relay process."""

    workdir: Path
    config: Path
    port: int
    host_key_line: str
    agent_key: Path
    known_hosts: Path
    target: SshTarget
    proc: subprocess.Popen[bytes]
    jwt_key: bytes
    logs: list[dict[str, object]] = field(default_factory=list)
    pg_port: int = 0
    api_port: int = 0
    operator_key: Path | None = None

    @property
    def api(self) -> str:
        """Base URL of the control API."""
        return f"http://127.0.0.1:{self.api_port}"

    def pg_dsn(
        self, target: str = "appdb", user: str = "ci-agent", token: str | None = None
    ) -> str:
        """libpq connection string through the relay's PostgreSQL listener."""
        secret = TOKENS.get(user, "") if token is None else token
        return (
            f"host=127.0.0.1 port={self.pg_port} dbname={target} user={user} "
            f"password={secret} sslmode=disable connect_timeout=10"
        )

    def ssh_args(self, key: Path | None = None) -> list[str]:
        """OpenSSH client arguments for an agent connecting to the relay with its key."""
        return [
            "-p",
            str(self.port),
            "-i",
            str(key or self.agent_key),
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

    def ssh(
        self, target: str, command: str, *, timeout: float = 30, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``ssh TARGET@relay COMMAND`` with the real OpenSSH client."""
        return subprocess.run(
            ["ssh", *self.ssh_args(), f"{target}@127.0.0.1", command],
            capture_output=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def castgate(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a castgate client command against this relay's config."""
        return subprocess.run(
            [CASTGATE, *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def known_hosts_obj(
        self,
    ) -> tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]]:
        """known_hosts for asyncssh clients, pinned to the relay's host key."""
        return ([asyncssh.import_public_key(self.host_key_line)], [], [])

    def recordings(self) -> Path:
        """The relay's recordings directory."""
        return self.workdir / "data" / "recordings"

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def write_jwks(workdir: Path) -> bytes:
    """An RSA signing key for the test IdP; its JWKS goes to workdir/jwks.json."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "test-1", "alg": "RS256", "use": "sig"})
    (workdir / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_TEST_IDP = """[oidc]
issuer = "https://idp.test"
audience = "castgate"
jwks = "file:jwks.json"
groups_claim = "groups"
"""


def write_config(
    workdir: Path,
    target: SshTarget,
    agent_pub: str,
    extra: str = "",
    listen_extra: str = "",
    alice_pub: str = "",
    auth_limit: int = 10_000,
    pg_listen: str = "127.0.0.1:0",
    oidc: str | None = None,
) -> Path:
    """castgate.toml for the tests (``oidc``: the OIDC section instead of the test IdP's
    single ``[oidc]`` table)."""
    wrong_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    cfg = f"""
data_dir = "data"
[listen]
ssh = "127.0.0.1:0"
postgres = "{pg_listen}"
api = "127.0.0.1:0"
{listen_extra}
[security]
auth_failure_limit = {auth_limit}
[recording]
fsync_interval = 0.2
input = "commands"
[masking]
patterns = [{{ name = "stripe-key", regex = "sk_live_[A-Za-z0-9]{{24}}" }}]
[roles]
approver = ["sre"]
auditor = ["sre"]
{oidc if oidc is not None else _TEST_IDP}
[[identities]]
name = "ci-agent"
groups = ["agents"]
ssh_keys = ["{agent_pub}"]
token_sha256 = "{_sha(TOKENS["ci-agent"])}"
[[identities]]
name = "alice"
groups = ["sre"]
token_sha256 = "{_sha(TOKENS["alice"])}"
ssh_keys = {json.dumps([alice_pub] if alice_pub else [])}
[[identities]]
name = "bob"
groups = ["sre"]
token_sha256 = "{_sha(TOKENS["bob"])}"
[[identities]]
name = "outsider"
groups = ["contractors"]
token_sha256 = "{_sha(TOKENS["outsider"])}"
[[targets]]
name = "web"
kind = "ssh"
address = "{target.host}:{target.port}"
user = "{target.user}"
key_file = "{target.client_key}"
host_key = "{target.host_key_line}"
groups = ["agents", "sre"]
[[targets]]
name = "gitsrv"
kind = "ssh"
address = "{target.host}:{target.port}"
user = "{target.user}"
key_file = "{target.client_key}"
host_key = "{target.host_key_line}"
groups = ["agents"]
[[targets]]
name = "moved"
kind = "ssh"
address = "{target.host}:{target.port}"
user = "{target.user}"
key_file = "{target.client_key}"
host_key = "{wrong_key}"
groups = ["agents"]
[[rules]]
name = "no-rm-rf"
command = '^rm -rf'
action = "block"
[[rules]]
name = "stop-needs-two"
command = '^systemctl stop'
action = "approve"
approvers = ["sre"]
min_approvals = 2
timeout = "20s"
[[rules]]
name = "restart-needs-approval"
command = '^systemctl restart'
action = "approve"
approvers = ["sre"]
timeout = "20s"
[[rules]]
name = "push-needs-approval"
command = '^git-receive-pack'
targets = ["gitsrv"]
groups = ["agents"]
action = "approve"
approvers = ["sre"]
timeout = "30s"
{extra}
"""
    path = workdir / "castgate.toml"
    path.write_text(cfg)
    return path


def start_relay(
    workdir: Path,
    target: SshTarget,
    extra: str = "",
    env: dict[str, str] | None = None,
    listen_extra: str = "",
    auth_limit: int = 10_000,
    pg_listen: str = "127.0.0.1:0",
    nofile: int | None = None,
    oidc: str | None = None,
) -> Relay:
    """Init keys, write the config, start ``castgate relay`` and wait until it listens
    (with its open-file limit, soft and hard, at ``nofile`` when given)."""
    workdir.mkdir(parents=True, exist_ok=True)
    agent_key = workdir / "agent_ed25519"
    key = asyncssh.generate_private_key("ssh-ed25519")
    agent_key.write_bytes(key.export_private_key())
    agent_key.chmod(0o600)
    agent_pub = key.export_public_key().decode().strip()
    operator_key = workdir / "alice_ed25519"
    okey = asyncssh.generate_private_key("ssh-ed25519")
    operator_key.write_bytes(okey.export_private_key())
    operator_key.chmod(0o600)
    alice_pub = okey.export_public_key().decode().strip()
    jwt_key = write_jwks(workdir)
    config = write_config(
        workdir, target, agent_pub, extra, listen_extra, alice_pub, auth_limit, pg_listen, oidc
    )
    relay = Relay(workdir, config, 0, "", agent_key, workdir / "known_hosts", target, None, jwt_key)  # type: ignore[arg-type]
    relay.operator_key = operator_key
    return launch(relay, env, nofile)


def launch(relay: Relay, env: dict[str, str] | None = None, nofile: int | None = None) -> Relay:
    """Start ``castgate relay`` on ``relay``'s config (again, after a stop or a kill)
    and wait until it listens; fills in the ports, host key and known_hosts."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [CASTGATE, "relay", "-c", str(relay.config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=limit if nofile is not None else None,
    )
    logs: list[dict[str, object]] = []
    ready = threading.Event()
    assert proc.stderr is not None
    stderr = proc.stderr

    def pump() -> None:
        for raw in stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"raw": raw.decode(errors="replace")}
            logs.append(entry)
            if entry.get("msg") == "relay.listening":
                ready.set()
        stderr.close()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(30):
        proc.kill()
        proc.wait()
        pytest.fail(f"relay did not start: {logs[-10:]}")
    listening = next(e for e in logs if e.get("msg") == "relay.listening")

    def port(name: str) -> int:
        return int(str(listening.get(name, ":0")).rsplit(":", 1)[1])

    host_pub = (relay.workdir / "data" / "keys" / "ssh_host_ed25519.pub").read_text().split()
    relay.host_key_line = f"{host_pub[0]} {host_pub[1]}"
    relay.port, relay.pg_port, relay.api_port = port("ssh"), port("postgres"), port("api")
    relay.known_hosts.write_text(f"[127.0.0.1]:{relay.port} {relay.host_key_line}\n")
    relay.proc, relay.logs = proc, logs
    return relay


@pytest.fixture(scope="module")
def relay(sshd_target: SshTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay shared by the tests of a module."""
    r = start_relay(tmp_path_factory.mktemp("relay"), sshd_target)
    try:
        yield r
    finally:
        r.stop()


def mint_jwt(relay: Relay, **claims: object) -> str:
    """A token from the test IdP; claims override sane defaults."""
    import jwt

    now = int(time.time())
    body: dict[str, object] = {
        "iss": "https://idp.test",
        "aud": "castgate",
        "sub": "agent-7",
        "preferred_username": "oidc-agent",
        "groups": ["agents"],
        "iat": now,
        "exp": now + 300,
    }
    body.update(claims)
    return jwt.encode(body, relay.jwt_key, algorithm="RS256", headers={"kid": "test-1"})


def wait_for(predicate: object, timeout: float = 10, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until true or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    pytest.fail("condition not met in time")


class Held:
    """An agent command held for approval, run with the real ssh client."""

    def __init__(self, relay: Relay, command: str, key: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            ["ssh", *relay.ssh_args(key), "web@127.0.0.1", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.err = b""
        self.out = b""
        self.first_out: float | None = None
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()
        self._reader = threading.Thread(target=self._read_out, daemon=True)
        self._reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(4096):  # type: ignore[attr-defined]
            self.err += chunk

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            if self.first_out is None:
                self.first_out = time.monotonic()
            self.out += chunk

    def approval_id(self) -> int:
        wait_for(lambda: re.search(rb"approval #(\d+) required", self.err) is not None, 20)
        m = re.search(rb"approval #(\d+) required", self.err)
        assert m is not None
        return int(m.group(1))

    def finish(self) -> int:
        code = self.proc.wait(30)
        self._reader.join(10)
        self._err_reader.join(10)  # closing stderr under a reading thread fails it
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


class Streamer:
    """``ssh web@relay`` printing a line every 20 ms until the relay goes away."""

    def __init__(self, relay: Relay, marker: str) -> None:
        loop = f"while :; do echo tick-{marker}; sleep 0.02; done"
        self.proc = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web@127.0.0.1", loop],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.ticks = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for _line in self.proc.stdout:
            self.ticks += 1

    def finish(self) -> int:
        code = self.proc.wait(30)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code
