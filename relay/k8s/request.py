"""What a Kubernetes API request does: method, path and query in, a ``K8sRequest`` out.

The classification follows the API server's own (k8s.io/apiserver
``pkg/endpoints/request/requestinfo.go``): the verb comes from the HTTP method, a
nameless GET is a list (or a watch with ``watch=true`` or under the legacy ``/watch/``
prefix), a nameless DELETE is a deletecollection, the namespace of a ``namespaces/NAME``
request is NAME, and ``fieldSelector=metadata.name=X`` names X. The subresources that are
protocols of their own (exec, attach, portforward, proxy, log) are verbs here, so that a
rule and the command log say ``exec`` rather than ``create pods/exec``.

What it cannot place (an unknown prefix, a malformed segment, an unknown method) is
opaque, with the reason: the relay holds or refuses it, never forwards it unclassified.
Discovery (``/version``, ``/api``, ``/apis``, ``/openapi/...``) is its own kind: kubectl
asks for it before every command and it carries no cluster data.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, unquote

Kind = Literal["resource", "discovery", "opaque"]

_METHOD_VERBS = {
    "GET": "get",
    "HEAD": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
_PROTOCOL_SUBRESOURCES = frozenset({"exec", "attach", "portforward", "proxy", "log"})
# Subresources of a namespace object itself (requestinfo.go's namespaceSubresources).
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_DISCOVERY = re.compile(
    r"/(?:version|api|apis|api/v1|apis/[a-z0-9.-]+(?:/[a-z0-9]+)?|openapi/v2|openapi/v3(?:/.*)?)/?"
)
# A path segment as the API server accepts one after decoding: not empty, no '/', not a
# dot segment (path.IsValidPathSegmentName), and nothing a proxy could read differently.
_SEGMENT = re.compile(r"[A-Za-z0-9._:@~+=-]+")
_GROUP = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_VERSION = re.compile(r"v[0-9]+(?:(?:alpha|beta)[0-9]+)?")

MAX_PATH = 8192
"""Longer paths are opaque (the API server refuses them too)."""


@dataclass(frozen=True)
class K8sRequest:
    """One Kubernetes API request, classified."""

    kind: Kind
    verb: str | None = None
    """get list watch create update patch delete deletecollection exec attach
    portforward proxy log; None for discovery and opaque requests."""
    group: str = ""
    """API group (``""`` is the core group, ``apps``, ``batch`` ...)."""
    version: str = ""
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    """None for cluster-scoped resources and for lists across all namespaces."""
    name: str | None = None
    command: tuple[str, ...] = ()
    """exec: the command, one element per ``command=`` query argument, in order."""
    container: str | None = None
    """exec, attach, log: the ``container=`` query argument."""
    tty: bool = False
    stdin: bool = False
    follow: bool = False
    """log: ``follow=true`` (``kubectl logs -f``)."""
    patch_type: str | None = None
    """patch: the content type (``application/apply-patch+yaml`` is server-side apply,
    which creates what does not exist yet)."""
    path: str = ""
    """The path as classified (after the target prefix)."""
    reason: str | None = None
    """Why an opaque request is opaque."""

    @property
    def server_side_apply(self) -> bool:
        """A server-side apply: a patch that creates the object when it is missing."""
        return self.verb == "patch" and (self.patch_type or "").startswith(
            "application/apply-patch"
        )

    def describe(self) -> str:
        """One line for the command log and approval requests, e.g.
        ``delete deployments.apps/web -n prod`` or ``exec pods/api -n payments -- ls -l``."""
        if self.kind == "discovery":
            return f"discovery {self.path}"
        if self.kind == "opaque":
            return f"opaque {self.path} ({self.reason})"
        text = f"{self.verb} {self.resource}"
        if self.group:
            text += "." + self.group
        if self.name:
            text += "/" + self.name
        if self.subresource and self.subresource != self.verb:
            text += "/" + self.subresource
        if self.namespace:
            text += f" -n {self.namespace}"
        if self.container:
            text += f" -c {self.container}"
        if self.command:
            text += " -- " + shlex.join(self.command)
        return text


def _opaque(path: str, reason: str) -> K8sRequest:
    return K8sRequest(kind="opaque", path=path, reason=reason)


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def classify(
    method: str, path: str, query: str = "", content_type: str | None = None
) -> K8sRequest:
    """Classify one request.

    Args:
        method: the HTTP method.
        path: the raw (still percent-encoded) path, without the target prefix.
        query: the raw query string.
        content_type: the request's Content-Type (tells a server-side apply patch).

    Returns:
        The request; ``kind == "opaque"`` with a reason when it cannot be placed.
    """
    if len(path) > MAX_PATH or len(query) > MAX_PATH:
        return _opaque(path[:200], "path or query too long")
    verb = _METHOD_VERBS.get(method.upper())
    if verb is None:
        return _opaque(path, f"method {method!r}")
    if not path.startswith("/"):
        return _opaque(path, "path does not start with /")
    if method.upper() in ("GET", "HEAD") and _DISCOVERY.fullmatch(path):
        return K8sRequest(kind="discovery", path=path)
    raw = path[1:].rstrip("/").split("/") if path != "/" else []
    parts: list[str] = []
    for seg in raw:
        seg = unquote(seg)
        if not _SEGMENT.fullmatch(seg) or seg in (".", ".."):
            return _opaque(path, f"malformed path segment {seg!r}")
        parts.append(seg)
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        return _opaque(path, "malformed query")
    if not parts:
        return _opaque(path, "not an API path")
    if parts[0] == "api" and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
        if not _GROUP.fullmatch(group):
            return _opaque(path, f"malformed API group {group!r}")
    else:
        return _opaque(path, "not a resource path")
    if not _VERSION.fullmatch(version):
        return _opaque(path, f"malformed API version {version!r}")
    if not rest:
        return _opaque(path, "no resource")
    if rest[0] == "watch":
        verb, rest = "watch", rest[1:]
    elif rest[0] == "proxy" and group == "" and version == "v1":
        # The legacy /api/v1/proxy/... form: still a proxy to something.
        verb, rest = "proxy", rest[1:]
    namespace: str | None = None
    if rest and rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    if not rest:
        return _opaque(path, "no resource")
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) >= 3 else None
    if subresource is not None and len(rest) > 3 and subresource != "proxy":
        return _opaque(path, "path continues past the subresource")
    if resource == "namespaces" and name is not None:
        namespace = name
    if subresource in _PROTOCOL_SUBRESOURCES:
        verb = subresource
    if name is None and verb == "get":
        watch = next((v for k, v in params if k == "watch"), None)
        verb = "watch" if _truthy(watch) else "list"
        selector = next((v for k, v in params if k == "fieldSelector"), None)
        m = re.fullmatch(r"metadata\.name(?:==?)([A-Za-z0-9._:-]+)", selector or "")
        if m:
            name = m.group(1)
    elif verb == "get" and _truthy(next((v for k, v in params if k == "watch"), None)):
        verb = "watch"
    if name is None and verb == "delete":
        verb = "deletecollection"
    if name is None and verb in _PROTOCOL_SUBRESOURCES:
        return _opaque(path, f"{verb} without an object name")
    command = tuple(v for k, v in params if k == "command") if verb == "exec" else ()
    container = next((v for k, v in params if k == "container"), None)
    return K8sRequest(
        kind="resource",
        verb=verb,
        group=group,
        version=version,
        resource=resource,
        subresource=subresource,
        namespace=namespace,
        name=name,
        command=command,
        container=container if verb in ("exec", "attach", "log") else None,
        tty=_truthy(next((v for k, v in params if k == "tty"), None)),
        stdin=_truthy(next((v for k, v in params if k == "stdin"), None)),
        follow=verb == "log" and _truthy(next((v for k, v in params if k == "follow"), None)),
        patch_type=(content_type or "").split(";")[0].strip().lower() or None
        if verb == "patch"
        else None,
        path=path,
    )


def split_target(path: str, prefix: str = "/k8s/") -> tuple[str, str] | None:
    """Split ``/k8s/NAME/api/v1/pods`` into the target name and the API path.

    The kubeconfig's server URL carries the target (``https://relay:6443/k8s/NAME``):
    the cluster name of a kubeconfig never reaches the server, and a path prefix needs
    no DNS name or SNI per target. None when the path has no (well-formed) prefix.
    """
    if not path.startswith(prefix):
        return None
    name, sep, rest = path[len(prefix) :].partition("/")
    if not name or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return None
    return name, "/" + rest if sep else "/"
