"""A real S3-compatible server for the tests: moto's server mode in its own process on a
free port, stopped at the end (it can be stopped and started again mid-test, like
psycopg's proxy fixture, to test an unreachable object store)."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# moto accepts any credentials; the relay reads them from the variables these name.
KEY_ENV, SECRET_ENV = "CASTGATE_TEST_S3_KEY", "CASTGATE_TEST_S3_SECRET"
CREDENTIALS = {KEY_ENV: "testing-key-id", SECRET_ENV: "testing-secret"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class S3Server:
    """A moto server process; ``bucket()`` makes a fresh bucket per test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """Endpoint URL for clients and the ``[s3]`` config."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (again) on the same port and wait until it answers."""
        log = (self.workdir / "moto.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"moto server exited: {(self.workdir / 'moto.log').read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail("moto server did not start listening")

    def stop(self) -> None:
        """Stop the server (its buckets are gone with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> S3Client:
        """A boto3 client for the test's own checks."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS[KEY_ENV],
            aws_secret_access_key=CREDENTIALS[SECRET_ENV],
        )

    @staticmethod
    def bucket_name() -> str:
        """A fresh bucket name (not created)."""
        return f"cg-test-{secrets.token_hex(6)}"

    def bucket(self, *, lock: bool = False, name: str | None = None) -> str:
        """Create a bucket (with Object Lock enabled when ``lock``); returns its name."""
        name = name or self.bucket_name()
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
        return name

    def section(self, bucket: str, **extra: object) -> str:
        """The ``[s3]`` TOML section pointing at this server."""
        lines = [
            "[s3]",
            f'bucket = "{bucket}"',
            'prefix = "rec/"',
            f'endpoint_url = "{self.endpoint}"',
            'region = "us-east-1"',
            f'access_key_id_env = "{KEY_ENV}"',
            f'secret_access_key_env = "{SECRET_ENV}"',
        ]
        for key, value in extra.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto server for the test session."""
    server = S3Server(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
