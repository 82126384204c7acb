"""The ``[cluster]`` section: node ids, timeouts and the peer secret (issue 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recorder.config import ConfigError, load_config, parse_config
from relay.cluster import default_node_id, peer_token


def test_durations_and_defaults() -> None:
    cfg = parse_config('[cluster]\nheartbeat = "2s"\nnode_timeout = "1m"\n')
    assert (cfg.cluster.heartbeat, cfg.cluster.node_timeout) == (2.0, 60.0)
    default = parse_config("").cluster
    assert (default.heartbeat, default.node_timeout, default.peer_token_env) == (5.0, 20.0, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("heartbeat = 5\nnode_timeout = 6", "at least twice the heartbeat"),
        ('node = "two words"', "cluster.node"),
        ('advertise_api = "10.0.0.1:8420"', "cluster.advertise_api"),
        ("nodes = 3", "unknown key"),
    ],
)
def test_bad_cluster_keys_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(f"[cluster]\n{text}\n", Path("castgate.toml"))


def test_configured_node_id_wins(tmp_path: Path) -> None:
    cfg = parse_config('[cluster]\nnode = "relay-7"\n', tmp_path / "castgate.toml")
    assert default_node_id(cfg) == "relay-7"


def test_peer_token_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config('[cluster]\npeer_token_env = "TEST_PEER"\n')
    assert peer_token(parse_config("")) is None
    monkeypatch.delenv("TEST_PEER", raising=False)
    with pytest.raises(ConfigError, match="TEST_PEER is not set"):
        peer_token(cfg)
    monkeypatch.setenv("TEST_PEER", "short")
    with pytest.raises(ConfigError, match="shorter than 16"):
        peer_token(cfg)
    monkeypatch.setenv("TEST_PEER", "a-long-enough-shared-secret")
    assert peer_token(cfg) == "a-long-enough-shared-secret"


def test_default_node_ids_are_stable_and_distinct_per_data_dir(tmp_path: Path) -> None:
    ids = []
    for name in ("one", "two", "one"):
        (tmp_path / name).mkdir(exist_ok=True)
        cfg_path = tmp_path / name / "castgate.toml"
        cfg_path.write_text('data_dir = "data"\n')
        ids.append(default_node_id(load_config(cfg_path)))
    assert ids[0] == ids[2] and ids[0] != ids[1]
