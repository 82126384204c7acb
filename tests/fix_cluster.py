"""Several real ``castgate relay`` processes on this machine forming one deployment:
separate data directories, one PostgreSQL store (a database of its own on the test
server of tests/fix_postgres.py), the sshd target of tests/fix_sshd.py, a shared peer
secret, and short heartbeat/node_timeout so a lost relay is noticed quickly.

``start_deployment`` takes extra TOML for every relay (a string) or per relay (a dict
name -> string), appended after the cluster's own keys, so later tests can add
sections such as ``[s3]``.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from recorder.store import Store
from tests.fix_postgres import PostgresServer
from tests.fix_relay import TOKENS, Relay, launch, start_relay
from tests.fix_sshd import SshTarget

PEER_ENV = "CASTGATE_TEST_PEER_TOKEN"
PEER_TOKEN = "cgt_peer_secret_for_tests_only_0005"
HEARTBEAT = 0.5
NODE_TIMEOUT = 8.0


def node_name(name: str) -> str:
    """The cluster.node of relay ``name`` in a deployment."""
    return f"relay-{name}"


def cluster_toml(
    store_url: str,
    name: str,
    *,
    heartbeat: float = HEARTBEAT,
    node_timeout: float = NODE_TIMEOUT,
    peer: bool = True,
) -> str:
    """The store and ``[cluster]`` keys of one relay of a deployment."""
    lines = [
        "[store]",
        f"url = {json.dumps(store_url)}",
        "[cluster]",
        f"node = {json.dumps(node_name(name))}",
        f"heartbeat = {heartbeat}",
        f"node_timeout = {node_timeout}",
    ]
    if peer:
        lines.append(f"peer_token_env = {json.dumps(PEER_ENV)}")
    return "\n".join(lines) + "\n"


@dataclass
class Deployment:
    """Relays sharing one store, by short name (``a``, ``b``, ...)."""

    relays: dict[str, Relay]
    store_url: str
    env: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Relay:
        return self.relays[name]

    def store(self) -> Store:
        """The shared store, opened for assertions; close it after use."""
        return Store.open(self.store_url)

    def relaunch(self, name: str) -> Relay:
        """Start relay ``name`` again after a stop or a kill (same config, data dir)."""
        relay = launch(self.relays[name], self.env)
        self.relays[name] = relay
        return relay

    def stop(self) -> None:
        """SIGTERM every relay still running."""
        for relay in self.relays.values():
            relay.stop()


def start_deployment(
    base: Path,
    target: SshTarget,
    store_url: str,
    names: tuple[str, ...] = ("a", "b"),
    extra: str | Mapping[str, str] = "",
    *,
    heartbeat: float = HEARTBEAT,
    node_timeout: float = NODE_TIMEOUT,
    peer: bool = True,
) -> Deployment:
    """Start one relay per name, one after another (the first migrates the store)."""
    env = {PEER_ENV: PEER_TOKEN} if peer else {}
    deployment = Deployment({}, store_url, env)
    try:
        for name in names:
            own = extra.get(name, "") if isinstance(extra, Mapping) else extra
            toml = cluster_toml(
                store_url, name, heartbeat=heartbeat, node_timeout=node_timeout, peer=peer
            )
            deployment.relays[name] = start_relay(base / name, target, toml + own, env=env)
    except BaseException:
        deployment.stop()
        raise
    return deployment


@pytest.fixture(scope="module")
def cluster_db(postgres_server: PostgresServer) -> Iterator[str]:
    """A database of its own for a module's deployment; dropped at the end."""
    name = f"cluster_{uuid.uuid4().hex[:12]}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


@pytest.fixture(scope="module")
def deployment(
    sshd_target: SshTarget, cluster_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Three relays (a, b, c) sharing one PostgreSQL store, for the tests of a module."""
    d = start_deployment(
        tmp_path_factory.mktemp("cluster"), sshd_target, cluster_db, ("a", "b", "c")
    )
    try:
        yield d
    finally:
        d.stop()


def api(relay: Relay, path: str, token: str = TOKENS["alice"], body: Any = None) -> Any:
    """One JSON request to a relay's control API (POST when ``body`` is given)."""
    req = urllib.request.Request(
        relay.api + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def metric(relay: Relay, name: str) -> float:
    """One unlabelled figure from a relay's /metrics."""
    req = urllib.request.Request(
        relay.api + "/metrics", headers={"Authorization": f"Bearer {TOKENS['alice']}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return float(value)
    raise AssertionError(f"{name} not in the metrics of {relay.api}")
