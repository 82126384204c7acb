"""What names the relay's own credential for a target in the audit trail."""

from __future__ import annotations

from typing import Any

import asyncssh

from recorder.config import Config, TargetConfig


class Credentials:
    """The relay's credentials for its targets, as the audit trail names them."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._ids: dict[str, dict[str, Any]] = {}

    def detail(self, target: TargetConfig) -> dict[str, Any]:
        """The environment variable's name, the key file and its public key's SHA-256
        fingerprint. Never the value (PCI DSS 8.6.2: the pipeline holds no static
        credential; the relay's is named where it is used). ``{"target": name}`` alone
        when the relay holds none for it."""
        cached = self._ids.get(target.name)
        if cached is not None:
            return cached
        detail: dict[str, Any] = {"target": target.name}
        if target.password_env:
            detail["env"] = target.password_env
        if target.key_file:
            path = self.cfg.resolve(target.key_file)
            detail["key_file"] = str(path)
            try:
                detail["fingerprint"] = asyncssh.read_private_key(path).get_fingerprint()
            except (OSError, ValueError, asyncssh.KeyImportError) as exc:
                detail["fingerprint"] = None
                detail["fingerprint_error"] = type(exc).__name__
        self._ids[target.name] = detail
        return detail
