"""``castgate kubeconfig --target NAME``: a kubeconfig that sends kubectl through the
relay.

The server URL is the relay's ``listen.kubernetes`` with the path prefix
``/k8s/NAME``: a kubeconfig's cluster name never reaches the server, and a path
prefix (client-go keeps a server URL's path in front of every API path, as Rancher's
``/k8s/clusters/ID`` URLs rely on) needs no DNS name or SNI per target. The CA data is
the relay's listener certificate. The token is not written into the file: an exec
credential plugin (plain ``sh``) hands kubectl ``$CASTGATE_TOKEN`` (or another
variable) at each call, so the file can be shared and the token stays in the
environment.
"""

from __future__ import annotations

import base64
import re

import orjson

from recorder.config import Config, ConfigError
from relay.k8s.tls import cert_paths, listen_host

PREFIX = "/k8s/"

# POSIX sh: refuses to run without the variable rather than send an empty token, and
# escapes nothing because castgate tokens and JWTs are URL-safe base64 and dots.
_EXEC_API = "client.authentication.k8s.io/v1"
_PLUGIN = "\n".join(
    (
        'v=$(printenv "$1") && [ -n "$v" ] ||'
        ' { echo "castgate: set $1 to your castgate token or OIDC JWT" >&2; exit 1; }',
        'case $v in *[!A-Za-z0-9._~+/=-]*) echo "castgate: $1 is not a token" >&2; exit 1;; esac',
        'printf \'{"apiVersion":"%s","kind":"ExecCredential","status":'
        '{"token":"%s"}}\' ' + _EXEC_API + ' "$v"',
    )
)


def server_url(cfg: Config, target: str, server: str | None = None) -> str:
    """The URL kubectl talks to for ``target``."""
    if server is None:
        host = listen_host(cfg)
        if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard address names no host
            raise ConfigError(
                f"listen.kubernetes is {cfg.listen.kubernetes}: give the address agents "
                "reach the relay at with --server https://HOST:PORT"
            )
        port = (cfg.listen.kubernetes or "").rpartition(":")[2]
        server = f"https://{'[' + host + ']' if ':' in host else host}:{port}"
    if not re.fullmatch(r"https://[^/\s?#]+", server.rstrip("/")):
        raise ConfigError(f"--server: expected https://HOST:PORT, got {server!r}")
    return server.rstrip("/") + PREFIX + target


def kubeconfig(
    cfg: Config,
    target: str,
    *,
    server: str | None = None,
    token_env: str = "CASTGATE_TOKEN",  # noqa: S107 - a variable name, not a token
    namespace: str | None = None,
) -> str:
    """The kubeconfig text (JSON, which is YAML too) for ``target``."""
    found = next((t for t in cfg.targets if t.name == target), None)
    if found is None or found.kind != "kubernetes":
        kinds = [t.name for t in cfg.targets if t.kind == "kubernetes"]
        raise ConfigError(
            f"no kubernetes target named {target!r} (have: {', '.join(kinds) or 'none'})"
        )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token_env):
        raise ConfigError(f"--token-env: not an environment variable name: {token_env!r}")
    url = server_url(cfg, target, server)
    cert, _key = cert_paths(cfg)
    ca = base64.b64encode(cert.read_bytes()).decode()
    name = f"castgate-{target}"
    context: dict[str, str] = {"cluster": name, "user": name}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": url, "certificate-authority-data": ca}}],
        "users": [
            {
                "name": name,
                "user": {
                    "exec": {
                        "apiVersion": _EXEC_API,
                        "command": "sh",
                        "args": ["-c", _PLUGIN, "castgate", token_env],
                        "interactiveMode": "Never",
                        "provideClusterInfo": False,
                    }
                },
            }
        ],
        "contexts": [{"name": name, "context": context}],
        "current-context": name,
        "preferences": {},
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
