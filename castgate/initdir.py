"""``castgate init DIR``: a working directory with a config, keys and a demo identity."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from castgate.paths import DEFAULT_CONFIG_NAME
from recorder.config import load_config
from recorder.errors import CastgateError
from recorder.signing import PUBLIC_NAME, SigningKey
from recorder.store import Store
from relay.server import load_or_create_host_key

TEMPLATE = """\
# castgate configuration. Every key is documented in README.md ("Configuration").
data_dir = "data"                       # recordings/, keys/, castgate.db

[listen]
ssh = "127.0.0.1:2222"
postgres = "127.0.0.1:6432"
api = "127.0.0.1:8420"

[store]
url = "sqlite:///data/castgate.db"      # or postgresql://user@host/db

[recording]
fsync_interval = 1.0                    # seconds between fsyncs of open casts
on_failure = "terminate"                # fail closed: a session that cannot be recorded ends
input = "commands"                      # none | commands | all (no-echo input is never kept)

[masking]
detectors = ["pan", "track"]
style = "bin6-last4"                    # or "full"; same display width either way
patterns = [{{ name = "stripe-key", regex = "sk_live_[A-Za-z0-9]{{24}}" }}]

[roles]
approver = ["sre"]
auditor = ["audit", "sre"]
admin = ["platform"]

# The demo identity created by 'castgate init'. Its token was printed once and saved
# in {token_file} (mode 0600); only its SHA-256 is kept here.
[[identities]]
name = "ci-agent"
groups = ["agents"]
token_sha256 = "{token_sha256}"

# Targets and rules: see README.md. Example:
# [[targets]]
# name = "web"
# kind = "ssh"
# address = "10.0.0.5:22"
# user = "deploy"
# key_file = "keys/web_ed25519"
# host_key = "ssh-ed25519 AAAA..."
# groups = ["agents", "sre"]
#
# [[rules]]
# name = "no-drop-database"
# sql = ["DropdbStmt"]
# action = "block"
"""


@dataclass(frozen=True)
class InitResult:
    """What ``init`` created."""

    config_path: Path
    token: str
    token_file: Path
    public_key: Path
    host_key_line: str


class InitError(CastgateError):
    """The directory cannot be initialised."""


def init_dir(directory: Path) -> InitResult:
    """Create ``directory`` with castgate.toml, data/keys (signing key), the store and a
    demo identity; refuses to overwrite an existing config."""
    cfg_path = directory / DEFAULT_CONFIG_NAME
    if cfg_path.exists():
        raise InitError(f"{cfg_path} already exists; refusing to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    token = "cgt_" + secrets.token_urlsafe(32)
    token_file = directory / "ci-agent.token"
    cfg_path.write_text(
        TEMPLATE.format(
            token_sha256=hashlib.sha256(token.encode()).hexdigest(),
            token_file=token_file.name,
        ),
        encoding="utf-8",
    )
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    cfg = load_config(cfg_path)
    cfg.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg.recordings_dir.mkdir(mode=0o700, exist_ok=True)
    SigningKey.load_or_create(cfg.keys_dir)
    host_key = load_or_create_host_key(cfg.keys_dir)
    store = Store.open(cfg.store_url())
    store.close()
    host_line = host_key.export_public_key().decode().split()
    return InitResult(
        cfg_path, token, token_file, cfg.keys_dir / PUBLIC_NAME, f"{host_line[0]} {host_line[1]}"
    )
