"""Find the configuration, signing key and store a client command works with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from castgate.paths import find_config as find_config
from recorder.config import Config, load_config, mask_policy
from recorder.masking import Masker
from recorder.signing import SigningKey
from recorder.store import Store


def default_home() -> Path:
    """Where ``castgate rec`` keeps its signing key when no config is given."""
    env = os.environ.get("CASTGATE_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "castgate"


@dataclass
class Runtime:
    """Config, masker and signing key for a client command; the store opens lazily."""

    config: Config
    config_path: Path | None
    masker: Masker
    signing_key: SigningKey
    keys_dir: Path
    _store: Store | None = None

    @property
    def store(self) -> Store | None:
        """The audit store, when running from a config file."""
        if self.config_path is None:
            return None
        if self._store is None:
            self._store = Store.open(self.config.store_url())
        return self._store

    def close(self) -> None:
        """Close the store if it was opened."""
        if self._store is not None:
            self._store.close()
            self._store = None


def load_runtime(config: str | None) -> Runtime:
    """Build the runtime from ``-c`` / ./castgate.toml, or defaults without a store."""
    path = find_config(config)
    if path is not None:
        cfg = load_config(path)
        keys = cfg.keys_dir
    else:
        cfg = Config(base_dir=Path.cwd())
        keys = default_home() / "keys"
    return Runtime(
        config=cfg,
        config_path=path,
        masker=Masker(mask_policy(cfg)),
        signing_key=SigningKey.load_or_create(keys),
        keys_dir=keys,
    )
