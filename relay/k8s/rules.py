"""``k8s`` rule patterns: ``verb:resource[.group][/subresource][@namespace][#name]``.

Each part is a glob (``*``, ``?``) or a ``,`` list of globs; a part left out matches
anything. The shape is RBAC's vocabulary (verbs, ``resource/subresource``, namespace,
resource names) written the way kubectl names things (``deployments.apps``), so a rule
reads like the Role an operator would otherwise write.

A rule that restricts (block, approve) is read widely, because the agent it governs will
try the next way round:

- ``get`` also matches ``list`` and ``watch`` (both return whole objects: a list of
  Secrets is a read of every one), ``list`` also matches ``watch``;
- ``delete`` also matches ``deletecollection``; ``update`` and ``patch`` match each
  other; ``create`` also matches a server-side apply (a patch that creates);
- ``@namespace`` and ``#name`` also match a request that names none (a list across all
  namespaces includes that namespace; a list includes that name).

An allow rule is read exactly as written: it never lets more through than it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

from recorder.config import K8S_PATTERN
from relay.k8s.request import K8sRequest

_WIDER = {
    "get": ("list", "watch"),
    "list": ("watch",),
    "delete": ("deletecollection",),
    "update": ("patch",),
    "patch": ("update",),
}


def _globs(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value.split(","))


def _any(globs: tuple[str, ...] | None, value: str) -> bool:
    return globs is None or any(fnmatchcase(value, g) for g in globs)


@dataclass(frozen=True)
class K8sPattern:
    """One parsed pattern; ``None`` parts match anything."""

    verbs: tuple[str, ...]
    resources: tuple[tuple[str, str | None], ...]
    """(resource glob, group glob or None for any group)."""
    subresources: tuple[str, ...] | None
    namespaces: tuple[str, ...] | None
    names: tuple[str, ...] | None

    def matches(self, req: K8sRequest, *, restricts: bool) -> bool:
        """Whether the request is one this pattern names (read widely when the rule
        ``restricts``)."""
        if req.kind != "resource" or req.verb is None or req.resource is None:
            return False
        if not self._verb(req, restricts):
            return False
        if not any(
            fnmatchcase(req.resource, res) and (group is None or fnmatchcase(req.group, group))
            for res, group in self.resources
        ):
            return False
        if self.subresources is not None:
            sub = req.subresource or ""
            if not _any(self.subresources, sub):
                return False
        elif req.subresource not in (None, req.verb) and not restricts:
            # `allow update:deployments` is not `update:deployments/scale`; a rule that
            # restricts is: scaling a deployment changes the deployment.
            return False
        if self.namespaces is not None:
            if req.namespace is None:
                if not restricts:
                    return False
            elif not _any(self.namespaces, req.namespace):
                return False
        if self.names is not None:
            if req.name is None:
                if not restricts:
                    return False
            elif not _any(self.names, req.name):
                return False
        return True

    def _verb(self, req: K8sRequest, restricts: bool) -> bool:
        assert req.verb is not None
        if _any(self.verbs, req.verb):
            return True
        if not restricts:
            return False
        for verb in self.verbs:
            if any(fnmatchcase(req.verb, w) for w in _WIDER.get(verb, ())):
                return True
            if verb == "create" and req.server_side_apply:
                return True
        return False


@lru_cache(maxsize=1024)
def parse_pattern(text: str) -> K8sPattern:
    """Parse a pattern the config already validated (recorder.config.K8S_PATTERN)."""
    m = K8S_PATTERN.fullmatch(text)
    if m is None:
        raise ValueError(f"not a k8s rule pattern: {text!r}")
    verbs = _globs(m.group("verbs"))
    assert verbs is not None
    resources = tuple(
        (res, group or None)
        for res, _dot, group in (item.partition(".") for item in m.group("resources").split(","))
    )
    return K8sPattern(
        verbs=verbs,
        resources=resources,
        subresources=_globs(m.group("subresource")),
        namespaces=_globs(m.group("namespaces")),
        names=_globs(m.group("names")),
    )


def matches_any(patterns: tuple[str, ...], req: K8sRequest, *, restricts: bool) -> bool:
    """Whether any of a rule's patterns names the request."""
    return any(parse_pattern(p).matches(req, restricts=restricts) for p in patterns)
