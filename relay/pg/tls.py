"""TLS for the PostgreSQL listener: the configured certificate, or a self-signed one
generated on first start."""

from __future__ import annotations

import socket
import ssl

from recorder.config import Config
from relay.selfsigned import generate

CERT_NAME = "pg_tls.crt"
KEY_NAME = "pg_tls.key"


def server_context(cfg: Config) -> ssl.SSLContext:
    """TLS context of the PostgreSQL listener (TLS 1.2 or newer)."""
    if cfg.listen.postgres_tls_cert and cfg.listen.postgres_tls_key:
        cert = cfg.resolve(cfg.listen.postgres_tls_cert)
        key = cfg.resolve(cfg.listen.postgres_tls_key)
    else:
        cert, key = cfg.keys_dir / CERT_NAME, cfg.keys_dir / KEY_NAME
        if not cert.exists():
            generate(cert, key, f"castgate {socket.gethostname()}", [])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx
