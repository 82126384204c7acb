"""A protocol-faithful Kubernetes API server for tests (no registry this project can reach
ships kube-apiserver, k3s, kind, kwok or envtest).

It speaks what kubectl and the official Python client use, over TLS with a CA made per
test session and bearer-token auth:

- discovery: ``/version``, ``/api``, ``/apis`` (aggregated discovery,
  ``apidiscovery.k8s.io/v2`` and ``v2beta1``, when the Accept header asks for it, the
  legacy APIVersions/APIGroupList otherwise), ``/api/v1``, ``/apis/GROUP/VERSION``;
  ``/openapi/v2`` and ``/openapi/v3`` answer 404 as a server without OpenAPI does
  (kubectl then validates nothing client-side and builds strategic merge patches from
  its compiled-in types);
- pods, secrets, configmaps, events, namespaces (core), deployments and replicasets
  (apps/v1): get, list, watch (``?watch=true``, a chunked stream of JSON event lines,
  also as Table rows), create, update, delete, deletecollection, patch (JSON merge,
  strategic merge as far as lists merged by ``name`` go, server-side apply as a merge
  that creates), the Table form ``kubectl get`` asks for, Status objects for errors,
  ``labelSelector`` (equality) and ``fieldSelector`` (``metadata.name``/``namespace``);
- a kubelet of sorts: a pod's first container runs as a real local process
  (``command`` + ``args``, default ``sleep``); ``log`` (``follow=true`` streams until the
  process ends), ``exec`` (a real local command, in a PTY for ``tty=true``) and
  ``attach`` (the pod's process: its output from now on, stdin when ``stdin: true``)
  over WebSocket ``v5.channel.k8s.io`` / ``v4.channel.k8s.io``: stdin 0, stdout 1,
  stderr 2, a metav1.Status on 3, resize on 4, v5 close 255;
- SPDY (``Upgrade: SPDY/3.1``) is refused with a 400 Status saying so, and so is
  port-forward (403): kubectl >= 1.30 uses WebSocket for exec/attach and falls back to
  SPDY only when the WebSocket upgrade fails.

Deployments do not create pods (no controllers); deleting a pod kills its process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import fcntl
import itertools
import os
import pty
import signal
import socket
import ssl
import struct
import termios
import threading
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.k8s import channel as ch

TABLE_ACCEPT = "as=Table"
DISCOVERY_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
DISCOVERY_V2BETA1 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
VERSION_INFO = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.1-castgate-fixture",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.24",
    "compiler": "gc",
    "platform": "linux/amd64",
}


# ---------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class Pki:
    """A CA and a server certificate it signed for 127.0.0.1 / localhost."""

    ca_pem: bytes
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def make_pki(directory: Path) -> Pki:
    """A fresh CA and server certificate in ``directory``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fix_kube test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "apiserver.crt", directory / "apiserver.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


# ---------------------------------------------------------------- resources


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    name: str
    kind: str
    namespaced: bool = True
    short: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()


_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
RESOURCES = (
    Resource(
        "",
        "v1",
        "pods",
        "Pod",
        short=("po",),
        subresources=("log", "exec", "attach", "portforward", "status"),
    ),
    Resource("", "v1", "secrets", "Secret"),
    Resource("", "v1", "configmaps", "ConfigMap", short=("cm",)),
    Resource("", "v1", "events", "Event", short=("ev",)),
    Resource("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",)),
    Resource(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        short=("deploy",),
        subresources=("scale", "status"),
    ),
    Resource("apps", "v1", "replicasets", "ReplicaSet", short=("rs",)),
)
_BY_PATH = {(r.group, r.version, r.name): r for r in RESOURCES}


def _status(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> web.Response:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(obj: dict[str, Any]) -> str:
    created = obj.get("metadata", {}).get("creationTimestamp")
    if not created:
        return "<unknown>"
    t = dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    secs = max(0, int((dt.datetime.now(dt.UTC) - t).total_seconds()))
    return f"{secs}s" if secs < 120 else f"{secs // 60}m"


def _merge(target: Any, patch: Any, strategic: bool) -> Any:
    """RFC 7386 merge; ``strategic`` adds what kubectl's strategic merge patches use:
    lists of objects merged by ``name``, ``$patch`` and ``$setElementOrder`` directives."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if strategic and patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            out.pop(key, None)
        elif (
            strategic
            and isinstance(value, list)
            and isinstance(out.get(key), list)
            and all(isinstance(v, dict) and "name" in v for v in value + out[key])
        ):
            merged = {v["name"]: v for v in out[key]}
            for item in value:
                if item.get("$patch") == "delete":
                    merged.pop(item["name"], None)
                else:
                    merged[item["name"]] = _merge(merged.get(item["name"], {}), item, True)
            out[key] = list(merged.values())
        else:
            out[key] = _merge(out.get(key), value, strategic)
    return out


def _labels_match(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term and term not in labels:
            return False
    return True


def _fields_match(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    meta = obj.get("metadata", {})
    for term in selector.split(","):
        k, _, v = term.replace("==", "=").partition("=")
        k = k.strip()
        if k == "metadata.name" and meta.get("name") != v:
            return False
        if k == "metadata.namespace" and meta.get("namespace") != v:
            return False
        if k.startswith("involvedObject."):
            inv = obj.get("involvedObject") or {}
            if str(inv.get(k.split(".", 1)[1])) != v:
                return False
    return True


# ---------------------------------------------------------------- kubelet


@dataclass
class PodProcess:
    """The local process standing in for a pod's first container."""

    proc: asyncio.subprocess.Process
    log: Path
    output: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (and replaced) whenever output is appended: followers wake on it."""
    subscribers: list[asyncio.Queue[bytes | None]] = field(default_factory=list)
    done: bool = False


# ---------------------------------------------------------------- the server


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


class _Reply(Exception):
    """Answer the request with this response (from deep inside a handler)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass
class _Watcher:
    resource: Resource
    namespace: str | None
    labels: str | None
    fields: str | None
    queue: asyncio.Queue[dict[str, Any] | None]


class KubeApiServer:
    """The fixture server; ``start()`` runs it in a thread with its own event loop."""

    def __init__(
        self,
        workdir: Path,
        pki: Pki,
        token: str,
        *,
        prefix: str = "",
        aggregated_discovery: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.workdir = workdir
        self.pki = pki
        self.token = token
        self.prefix = prefix.rstrip("/")
        self.aggregated_discovery = aggregated_discovery
        self._ssl = ssl_context or pki.server_context()
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.rv = itertools.count(100)
        self.watchers: list[_Watcher] = []
        self.history: list[tuple[int, Resource, str, dict[str, Any]]] = []
        """Every event, so that a watch from a resourceVersion misses none since."""
        self.pods: dict[tuple[str, str], PodProcess] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        """(method, path with query, selected headers) of every request, for tests."""
        self.url = ""
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        for ns in ("default", "kube-system"):
            self._put(
                _BY_PATH[("", "v1", "namespaces")],
                "",
                ns,
                {"metadata": {"name": ns}, "status": {"phase": "Active"}},
            )

    # -- lifecycle

    def start(self) -> KubeApiServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="fix_kube", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop from a test thread."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock, ssl_context=self._ssl)
        await site.start()
        port = sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{port}{self.prefix}"

    async def _shutdown(self) -> None:
        for w in self.watchers:
            w.queue.put_nowait(None)
        for pp in self.pods.values():
            if pp.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pp.proc.pid, signal.SIGKILL)
                await pp.proc.wait()
        # A TLS close waits for the peer's close_notify (30 s by default); a client that
        # was killed never sends it.
        for transport in list(self._transports):
            transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        # Closed TLS transports finish closing their sockets on the next turns of the loop.
        for _ in range(5):
            await asyncio.sleep(0)

    # -- store

    def _key(self, res: Resource, ns: str, name: str) -> tuple[str, str, str, str]:
        return (res.group, res.name, ns if res.namespaced else "", name)

    def _put(
        self, res: Resource, ns: str, name: str, obj: dict[str, Any], event: str | None = None
    ) -> dict[str, Any]:
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        meta = obj.setdefault("metadata", {})
        meta["name"] = name
        if res.namespaced:
            meta["namespace"] = ns
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(next(self.rv))
        self.objects[self._key(res, ns, name)] = obj
        if event:
            self._notify(res, event, obj)
        return obj

    def _notify(self, res: Resource, event: str, obj: dict[str, Any]) -> None:
        snapshot = copy.deepcopy(obj)
        self.history.append((int(obj["metadata"]["resourceVersion"]), res, event, snapshot))
        for w in self.watchers:
            self._offer(w, res, event, snapshot)

    def _offer(self, w: _Watcher, res: Resource, event: str, obj: dict[str, Any]) -> None:
        if w.resource is not res:
            return
        if w.namespace is not None and obj["metadata"].get("namespace") != w.namespace:
            return
        if _labels_match(obj, w.labels) and _fields_match(obj, w.fields):
            w.queue.put_nowait({"type": event, "object": copy.deepcopy(obj)})

    def _list(
        self, res: Resource, ns: str | None, labels: str | None, fields: str | None
    ) -> list[dict[str, Any]]:
        return [
            obj
            for (g, r, o_ns, _n), obj in sorted(self.objects.items())
            if (g, r) == (res.group, res.name)
            and (ns is None or not res.namespaced or o_ns == ns)
            and _labels_match(obj, labels)
            and _fields_match(obj, fields)
        ]

    # -- dispatch

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.transport is not None:
            self._transports.add(request.transport)
        self.requests.append(
            (
                request.method,
                request.path_qs,
                {
                    k: request.headers.get(k, "")
                    for k in ("Accept", "Content-Type", "Upgrade", "Sec-WebSocket-Protocol")
                },
            )
        )
        if self.prefix:
            if not path.startswith(self.prefix + "/") and path != self.prefix:
                return _status(
                    404, "NotFound", f"the server could not find the requested resource ({path})"
                )
            path = path[len(self.prefix) :] or "/"
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        upgrade = request.headers.get("Upgrade", "").lower()
        if upgrade.startswith("spdy/"):
            return _status(
                400,
                "BadRequest",
                "SPDY is not supported by this server: use WebSocket (v5.channel.k8s.io or v4.channel.k8s.io)",
            )
        parts = [p for p in path.split("/") if p]
        if request.method == "GET":
            found = self._discovery(request, parts)
            if found is not None:
                return found
        if parts[:2] == ["openapi", "v3"] and request.method == "GET":
            return self._openapi_v3(parts[2:])
        if parts and parts[0] == "openapi":
            return _status(404, "NotFound", "the server could not find the requested resource")
        try:
            return await self._resource(request, parts)
        except _Reply as reply:
            return reply.response

    def _discovery(self, request: web.Request, parts: list[str]) -> web.StreamResponse | None:
        accept = request.headers.get("Accept", "")
        if parts == ["version"]:
            return web.json_response(VERSION_INFO)
        if parts in (["api"], ["apis"]):
            for ctype, ver in ((DISCOVERY_V2, "v2"), (DISCOVERY_V2BETA1, "v2beta1")):
                if (
                    self.aggregated_discovery
                    and f"v={ver};as=APIGroupDiscoveryList" in accept.replace(" ", "")
                ):
                    body = self._aggregated(core=parts == ["api"], version=ver)
                    return web.Response(body=orjson.dumps(body), headers={"Content-Type": ctype})
            if parts == ["api"]:
                return web.json_response(
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}
                        ],
                    }
                )
            groups = sorted({r.group for r in RESOURCES if r.group})
            return web.json_response(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": g,
                            "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                            "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"},
                        }
                        for g in groups
                    ],
                }
            )
        gv: tuple[str, str] | None = None
        if len(parts) == 2 and parts[0] == "api":
            gv = ("", parts[1])
        elif len(parts) == 3 and parts[0] == "apis":
            gv = (parts[1], parts[2])
        elif len(parts) == 2 and parts[0] == "apis":
            group = parts[1]
            if not any(r.group == group for r in RESOURCES):
                return _status(404, "NotFound", "the server could not find the requested resource")
            return web.json_response(
                {
                    "kind": "APIGroup",
                    "apiVersion": "v1",
                    "name": group,
                    "versions": [{"groupVersion": f"{group}/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": f"{group}/v1", "version": "v1"},
                }
            )
        if gv is None:
            return None
        res = [r for r in RESOURCES if (r.group, r.version) == gv]
        if not res:
            return _status(404, "NotFound", "the server could not find the requested resource")
        items: list[dict[str, Any]] = []
        for r in res:
            items.append(
                {
                    "name": r.name,
                    "singularName": r.singular,
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": _VERBS,
                    **({"shortNames": list(r.short)} if r.short else {}),
                }
            )
            for sub in r.subresources:
                items.append(
                    {
                        "name": f"{r.name}/{sub}",
                        "singularName": "",
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": ["get", "create"],
                    }
                )
        return web.json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": res[0].api_version,
                "resources": items,
            }
        )

    def _openapi_v3(self, gv: list[str]) -> web.Response:
        """Just enough OpenAPI v3 for kubectl: each group-version's PATCH operations,
        tagged with their kind, take ``fieldValidation`` (kubectl then leaves validation
        to the server, as against a real one). No schemas: kubectl builds strategic merge
        patches from its compiled-in types, as it does for a server without them."""
        gvs = sorted({(r.group, r.version) for r in RESOURCES})
        if not gv:
            return web.json_response(
                {
                    "paths": {
                        _gv_path(g, v): {
                            "serverRelativeURL": f"/openapi/v3/{_gv_path(g, v)}?hash=fixture{i}"
                        }
                        for i, (g, v) in enumerate(gvs)
                    }
                }
            )
        paths: dict[str, Any] = {}
        for r in RESOURCES:
            if _gv_path(r.group, r.version) != "/".join(gv):
                continue
            ns = "/namespaces/{namespace}" if r.namespaced else ""
            paths[f"/{_gv_path(r.group, r.version)}{ns}/{r.name}/{{name}}"] = {
                "patch": {
                    "operationId": f"patch{r.kind}",
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {
                        "group": r.group,
                        "version": r.version,
                        "kind": r.kind,
                    },
                    "responses": {"200": {"description": "OK"}},
                    # On the operation, where kubectl's QueryParamVerifierV3 looks.
                    "parameters": [
                        {
                            "name": name,
                            "in": "query",
                            "schema": {"type": "string", "uniqueItems": True},
                        }
                        for name in ("dryRun", "fieldManager", "fieldValidation", "force", "pretty")
                    ],
                },
            }
        if not paths:
            return _status(404, "NotFound", "the server could not find the requested resource")
        return web.json_response(
            {
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": VERSION_INFO["gitVersion"]},
                "paths": paths,
                "components": {"schemas": {}},
            }
        )

    def _aggregated(self, *, core: bool, version: str) -> dict[str, Any]:
        groups: dict[str, list[Resource]] = {}
        for r in RESOURCES:
            if (r.group == "") == core:
                groups.setdefault(r.group, []).append(r)
        items = []
        for group, res in groups.items():
            items.append(
                {
                    "metadata": {"name": group} if group else {},
                    "versions": [
                        {
                            "version": "v1",
                            "freshness": "Current",
                            "resources": [
                                {
                                    "resource": r.name,
                                    "responseKind": {
                                        "group": r.group,
                                        "version": r.version,
                                        "kind": r.kind,
                                    },
                                    "scope": "Namespaced" if r.namespaced else "Cluster",
                                    "singularResource": r.singular,
                                    "verbs": _VERBS,
                                    **({"shortNames": list(r.short)} if r.short else {}),
                                    "subresources": [
                                        {
                                            "subresource": s,
                                            "responseKind": {
                                                "group": r.group,
                                                "version": r.version,
                                                "kind": r.kind,
                                            },
                                            "verbs": ["get", "create"],
                                        }
                                        for s in r.subresources
                                    ],
                                }
                                for r in res
                            ],
                        }
                    ],
                }
            )
        return {
            "kind": "APIGroupDiscoveryList",
            "apiVersion": f"apidiscovery.k8s.io/{version}",
            "metadata": {},
            "items": items,
        }

    # -- resources

    async def _resource(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return _status(404, "NotFound", "the server could not find the requested resource")
        watch = False
        if rest[0] == "watch":
            watch, rest = True, rest[1:]
        ns: str | None = None
        if rest[:1] == ["namespaces"] and len(rest) > 2:
            ns, rest = rest[1], rest[2:]
        res = _BY_PATH.get((group, version, rest[0])) if rest else None
        if res is None:
            return _status(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        q = request.query
        watch = watch or (q.get("watch") or "").lower() in ("true", "1")
        if res.namespaced and ns is None and name is not None:
            return _status(404, "NotFound", "the server could not find the requested resource")
        if sub is not None:
            return await self._subresource(request, res, ns or "", name or "", sub)
        method = request.method
        if method == "GET" and name is None:
            if watch:
                return await self._watch(request, res, ns)
            return self._respond(
                request,
                res,
                self._list(res, ns, q.get("labelSelector"), q.get("fieldSelector")),
                listing=True,
            )
        if method == "GET":
            obj = self.objects.get(self._key(res, ns or "", name or ""))
            if obj is None:
                return self._not_found(res, name or "")
            return self._respond(request, res, [obj], listing=False)
        if method == "POST" and name is None:
            body = await self._body(request)
            if body is None:
                return _status(400, "BadRequest", "the request body is not JSON or YAML")
            meta = body.setdefault("metadata", {})
            new_name = meta.get("name") or (meta.get("generateName", "") + uuid.uuid4().hex[:5])
            if not new_name:
                return _status(
                    422, "Invalid", f'{res.kind} "" is invalid: metadata.name: Required value'
                )
            if self._key(res, ns or "", new_name) in self.objects:
                return _status(
                    409,
                    "AlreadyExists",
                    f'{res.name} "{new_name}" already exists',
                    {"name": new_name, "kind": res.name},
                )
            if q.get("dryRun"):
                return web.json_response(body, status=201)
            obj = self._create(res, ns or "", new_name, body)
            if res.name == "pods":
                await self._start_pod(obj)
            return web.json_response(obj, status=201)
        if method == "DELETE" and name is None:
            gone = self._list(res, ns, q.get("labelSelector"), q.get("fieldSelector"))
            for obj in gone:
                await self._delete(res, obj)
            return web.json_response(
                {
                    "kind": f"{res.kind}List",
                    "apiVersion": res.api_version,
                    "metadata": {},
                    "items": gone,
                }
            )
        key = self._key(res, ns or "", name or "")
        if method == "DELETE":
            obj = self.objects.get(key)
            if obj is None:
                return self._not_found(res, name or "")
            await self._delete(res, obj)
            return web.json_response(obj)
        if method == "PUT":
            body = await self._body(request)
            if body is None:
                return _status(400, "BadRequest", "the request body is not JSON or YAML")
            old = self.objects.get(key)
            if old is None:
                return self._not_found(res, name or "")
            want_rv = body.get("metadata", {}).get("resourceVersion")
            if want_rv and want_rv != old["metadata"]["resourceVersion"]:
                return _status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {res.name} "{name}": the object has been modified',
                )
            body.setdefault("metadata", {})["uid"] = old["metadata"]["uid"]
            body["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            return web.json_response(self._update(res, ns or "", name or "", body))
        if method == "PATCH":
            return await self._patch(request, res, ns or "", name or "", key)
        return _status(405, "MethodNotAllowed", f"method {method} not allowed")

    def _not_found(self, res: Resource, name: str) -> web.Response:
        group = f".{res.group}" if res.group else ""
        return _status(
            404,
            "NotFound",
            f'{res.name}{group} "{name}" not found',
            {"name": name, "group": res.group, "kind": res.name},
        )

    async def _body(self, request: web.Request) -> dict[str, Any] | None:
        raw = await request.read()
        if raw.startswith(b"k8s\x00"):
            raise _Reply(
                _status(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types "
                    "include: application/json, application/yaml",
                )
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            try:
                body = yaml.safe_load(raw)
            except yaml.YAMLError:
                return None
        return body if isinstance(body, dict) else None

    def _create(self, res: Resource, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        body["metadata"].pop("resourceVersion", None)
        body["metadata"]["generation"] = 1
        self._fill_status(res, body)
        return self._put(res, ns, name, body, "ADDED")

    def _update(self, res: Resource, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        old = self.objects.get(self._key(res, ns, name), {})
        gen = int(old.get("metadata", {}).get("generation", 1))
        if old.get("spec") != body.get("spec"):
            gen += 1
        body.setdefault("metadata", {})["generation"] = gen
        if res.name == "pods" and "status" in old:
            body["status"] = old["status"]
        self._fill_status(res, body)
        return self._put(res, ns, name, body, "MODIFIED")

    def _fill_status(self, res: Resource, obj: dict[str, Any]) -> None:
        if res.name == "deployments":
            n = int((obj.get("spec") or {}).get("replicas", 1))
            obj["status"] = {
                "observedGeneration": obj["metadata"].get("generation", 1),
                "replicas": n,
                "updatedReplicas": n,
                "readyReplicas": n,
                "availableReplicas": n,
                "conditions": [
                    {
                        "type": "Available",
                        "status": "True",
                        "reason": "MinimumReplicasAvailable",
                        "lastUpdateTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
            }
            obj.setdefault("spec", {}).setdefault("replicas", n)
        elif res.name == "namespaces":
            obj["status"] = {"phase": "Active"}

    async def _patch(
        self,
        request: web.Request,
        res: Resource,
        ns: str,
        name: str,
        key: tuple[str, str, str, str],
    ) -> web.StreamResponse:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        patch = await self._body(request)
        if patch is None:
            return _status(400, "BadRequest", "the patch is not JSON or YAML")
        old = self.objects.get(key)
        if ctype == "application/apply-patch+yaml":
            if old is None:
                patch.setdefault("metadata", {})["name"] = name
                obj = self._create(res, ns, name, patch)
                if res.name == "pods":
                    await self._start_pod(obj)
                return web.json_response(obj, status=201)
            merged = _merge(old, patch, strategic=True)
        elif old is None:
            return self._not_found(res, name)
        elif ctype == "application/merge-patch+json":
            merged = _merge(old, patch, strategic=False)
        elif ctype == "application/strategic-merge-patch+json":
            merged = _merge(old, patch, strategic=True)
        else:
            return _status(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {ctype})",
            )
        return web.json_response(self._update(res, ns, name, merged))

    async def _delete(self, res: Resource, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects.pop(self._key(res, meta.get("namespace", ""), meta["name"]), None)
        meta["resourceVersion"] = str(next(self.rv))
        if res.name == "pods":
            pp = self.pods.pop((meta.get("namespace", ""), meta["name"]), None)
            if pp is not None and pp.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pp.proc.pid, signal.SIGKILL)
                await pp.proc.wait()
        self._notify(res, "DELETED", obj)

    # -- responses (JSON or Table)

    def _respond(
        self, request: web.Request, res: Resource, objs: list[dict[str, Any]], *, listing: bool
    ) -> web.Response:
        if TABLE_ACCEPT in request.headers.get("Accept", "").replace(" ", ""):
            return web.json_response(
                self._table(res, objs, request.query.get("includeObject", "Metadata"))
            )
        if not listing:
            return web.json_response(objs[0])
        items = []
        for o in objs:
            item = {k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
            items.append(item)
        return web.json_response(
            {
                "kind": f"{res.kind}List",
                "apiVersion": res.api_version,
                "metadata": {"resourceVersion": str(next(self.rv))},
                "items": items,
            }
        )

    def _table(self, res: Resource, objs: list[dict[str, Any]], include: str) -> dict[str, Any]:
        cols, cells = _columns(res)
        rows = []
        for o in objs:
            row: dict[str, Any] = {"cells": cells(o)}
            if include == "Object":
                row["object"] = o
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(next(self.rv))},
            "columnDefinitions": [
                {
                    "name": c,
                    "type": "string",
                    "format": "name" if c == "Name" else "",
                    "description": c,
                    "priority": 0,
                }
                for c in cols
            ],
            "rows": rows,
        }

    async def _watch(
        self, request: web.Request, res: Resource, ns: str | None
    ) -> web.StreamResponse:
        q = request.query
        w = _Watcher(res, ns, q.get("labelSelector"), q.get("fieldSelector"), asyncio.Queue())
        table = TABLE_ACCEPT in request.headers.get("Accept", "").replace(" ", "")
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        await resp.prepare(request)
        rv = q.get("resourceVersion") or ""
        if q.get("sendInitialEvents") == "true" or rv in ("", "0"):
            # A watch without a resourceVersion starts with the current state.
            for obj in self._list(res, ns, w.labels, w.fields):
                w.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(obj)})
        else:
            # From a list's resourceVersion: every change since, as the real server does
            # from its watch cache (no await between this replay and subscribing).
            since = int(rv) if rv.isdigit() else 0
            for ev_rv, ev_res, event, obj in self.history:
                if ev_rv > since:
                    self._offer(w, ev_res, event, obj)
        self.watchers.append(w)
        timeout = float(q.get("timeoutSeconds") or 1800)
        try:
            async with asyncio.timeout(timeout):
                while (event := await w.queue.get()) is not None:
                    if table:
                        event = {
                            "type": event["type"],
                            "object": self._table(
                                res, [event["object"]], q.get("includeObject", "Metadata")
                            ),
                        }
                    await resp.write(orjson.dumps(event) + b"\n")
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            self.watchers.remove(w)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    # -- kubelet

    async def start_pod(self, name: str, argv: list[str], ns: str = "default") -> None:
        """Create a pod running ``argv`` (what a test would otherwise apply)."""
        res = _BY_PATH[("", "v1", "pods")]
        body: dict[str, Any] = {
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "command": argv}]},
        }
        await self._start_pod(self._create(res, ns, name, body))

    async def _start_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        first = containers[0]
        argv = list(first.get("command") or ["sleep", "3600"]) + list(first.get("args") or [])
        log = self.workdir / f"pod-{meta['namespace']}-{meta['name']}.log"
        cwd = self.workdir / f"pod-{meta['namespace']}-{meta['name']}"
        cwd.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(cwd),
            "HOSTNAME": meta["name"],
        }
        for e in first.get("env") or []:
            env[e["name"]] = str(e.get("value", ""))
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if first.get("stdin") else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        pp = PodProcess(proc, log)
        log.write_bytes(b"")
        self.pods[(meta["namespace"], meta["name"])] = pp
        name = first.get("name", "main")
        started = _now()
        pod["status"] = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "hostIP": "127.0.0.1",
            "startTime": started,
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {
                    "name": name,
                    "ready": True,
                    "restartCount": 0,
                    "image": first.get("image", "local"),
                    "imageID": "",
                    "started": True,
                    "state": {"running": {"startedAt": started}},
                }
            ],
        }
        asyncio.get_running_loop().create_task(self._pump(pod, pp, name))

    async def _pump(self, pod: dict[str, Any], pp: PodProcess, cname: str) -> None:
        assert pp.proc.stdout is not None
        with pp.log.open("ab") as fh:
            while chunk := await pp.proc.stdout.read(65536):
                fh.write(chunk)
                fh.flush()
                for q in pp.subscribers:
                    q.put_nowait(chunk)
                pp.output.set()
                pp.output = asyncio.Event()
        code = await pp.proc.wait()
        pp.done = True
        for q in pp.subscribers:
            q.put_nowait(None)
        pp.output.set()
        meta = pod["metadata"]
        key = self._key(_BY_PATH[("", "v1", "pods")], meta["namespace"], meta["name"])
        if self.objects.get(key) is pod:
            pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            pod["status"]["containerStatuses"][0].update(
                ready=False,
                state={
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if code == 0 else "Error",
                        "finishedAt": _now(),
                    }
                },
            )
            self._put(
                _BY_PATH[("", "v1", "pods")], meta["namespace"], meta["name"], pod, "MODIFIED"
            )

    async def _subresource(
        self, request: web.Request, res: Resource, ns: str, name: str, sub: str
    ) -> web.StreamResponse:
        obj = self.objects.get(self._key(res, ns, name))
        if obj is None:
            return self._not_found(res, name)
        if res.name == "deployments" and sub == "scale":
            return await self._scale(request, res, ns, name, obj)
        if res.name != "pods" or sub not in ("log", "exec", "attach", "portforward"):
            return _status(404, "NotFound", "the server could not find the requested resource")
        if sub == "portforward":
            return _status(403, "Forbidden", "port-forward is not supported by this test server")
        pp = self.pods.get((ns, name))
        if pp is None:
            return _status(400, "BadRequest", f"pod {name} has no running container")
        if sub == "log":
            return await self._log(request, pp)
        offered = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        proto = ch.negotiate(offered)
        if request.headers.get("Upgrade", "").lower() != "websocket" or proto is None:
            return _status(
                400,
                "BadRequest",
                f"{sub} needs a WebSocket upgrade with subprotocol {ch.V5} or {ch.V4}",
            )
        if sub == "attach":
            return await self._attach(request, pp, proto)
        command = request.query.getall("command", [])
        if not command:
            return _status(400, "BadRequest", "you must specify at least 1 command")
        return await self._exec(request, pp, proto, command)

    async def _scale(
        self, request: web.Request, res: Resource, ns: str, name: str, obj: dict[str, Any]
    ) -> web.StreamResponse:
        if request.method in ("PATCH", "PUT"):
            body = await self._body(request) or {}
            replicas = (body.get("spec") or {}).get("replicas")
            if isinstance(replicas, int):
                new = copy.deepcopy(obj)
                new["spec"]["replicas"] = replicas
                obj = self._update(res, ns, name, new)
        return web.json_response(
            {
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "resourceVersion": obj["metadata"]["resourceVersion"],
                },
                "spec": {"replicas": obj["spec"]["replicas"]},
                "status": {"replicas": obj["spec"]["replicas"]},
            }
        )

    async def _log(self, request: web.Request, pp: PodProcess) -> web.StreamResponse:
        follow = request.query.get("follow") in ("true", "1")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        offset = 0
        while True:
            waiter = pp.output
            done = pp.done
            data = pp.log.read_bytes()[offset:]
            if data:
                offset += len(data)
                try:
                    await resp.write(data)
                except ConnectionResetError:
                    return resp
            if not follow or (done and not data):
                break
            if not data:
                await waiter.wait()
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def _exec(
        self, request: web.Request, pp: PodProcess, proto: str, command: list[str]
    ) -> web.StreamResponse:
        q = request.query
        tty = q.get("tty") in ("true", "1")
        want_stdin = q.get("stdin") in ("true", "1")
        ws = web.WebSocketResponse(protocols=(proto,), max_msg_size=16 << 20)
        await ws.prepare(request)
        cwd = pp.log.with_suffix("")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(cwd),
            "TERM": "xterm",
            "PS1": "$ ",
        }
        master: int | None = None
        try:
            if tty:
                master, slave = pty.openpty()
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_controlling_tty,
                )
                os.close(slave)
            else:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.PIPE if want_stdin else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            await ws.send_bytes(
                ch.encode(
                    ch.Channel.ERROR,
                    orjson.dumps(
                        {
                            "metadata": {},
                            "status": "Failure",
                            "message": f"exec failed: {exc}",
                            "reason": "InternalError",
                        }
                    ),
                )
            )
            await ws.close()
            return ws
        session = _ExecSession(ws, proto, proc, master)
        await session.run()
        return ws

    async def _attach(self, request: web.Request, pp: PodProcess, proto: str) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(proto,), max_msg_size=16 << 20)
        await ws.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        pp.subscribers.append(queue)

        async def output() -> None:
            while (chunk := await queue.get()) is not None:
                await ws.send_bytes(ch.encode(ch.Channel.STDOUT, chunk))

        out = asyncio.get_running_loop().create_task(output())
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                frame = ch.decode(msg.data, proto)
                if frame.channel is ch.Channel.STDIN and pp.proc.stdin is not None:
                    pp.proc.stdin.write(frame.data)
                    await pp.proc.stdin.drain()
                if frame.channel is ch.Channel.CLOSE:
                    break
                if pp.done:
                    break
        finally:
            pp.subscribers.remove(queue)
            out.cancel()
        if pp.done:
            await ws.send_bytes(
                ch.encode(ch.Channel.ERROR, ch.status_json(pp.proc.returncode or 0))
            )
        await ws.close()
        return ws


def _controlling_tty() -> None:
    # The child's new session takes its stdin (the PTY's slave) as controlling terminal,
    # so that a shell gets job control and SIGWINCH like under kubelet's runc.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class _ExecSession:
    """One exec: the process's output to the channels, the channels to the process."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        proto: str,
        proc: asyncio.subprocess.Process,
        master: int | None,
    ) -> None:
        self.ws, self.proto, self.proc, self.master = ws, proto, proc, master

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        readers: list[asyncio.Task[None]] = []
        if self.master is not None:
            readers.append(loop.create_task(self._pty_out()))
        else:
            assert self.proc.stdout is not None and self.proc.stderr is not None
            readers.append(loop.create_task(self._pipe_out(self.proc.stdout, ch.Channel.STDOUT)))
            readers.append(loop.create_task(self._pipe_out(self.proc.stderr, ch.Channel.STDERR)))
        inbound = loop.create_task(self._inbound())
        code = await self.proc.wait()
        await asyncio.gather(*readers)
        inbound.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await inbound
        if self.master is not None:
            os.close(self.master)
        if not self.ws.closed:
            with contextlib.suppress(ConnectionResetError):
                await self.ws.send_bytes(ch.encode(ch.Channel.ERROR, ch.status_json(code)))
                await self.ws.close()

    async def _pipe_out(self, stream: asyncio.StreamReader, channel: ch.Channel) -> None:
        while chunk := await stream.read(65536):
            with contextlib.suppress(ConnectionResetError):
                await self.ws.send_bytes(ch.encode(channel, chunk))

    async def _pty_out(self) -> None:
        assert self.master is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        fd = self.master

        def readable() -> None:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            queue.put_nowait(data)
            if not data:
                loop.remove_reader(fd)

        loop.add_reader(fd, readable)
        try:
            while chunk := await queue.get():
                with contextlib.suppress(ConnectionResetError):
                    await self.ws.send_bytes(ch.encode(ch.Channel.STDOUT, chunk))
        finally:
            loop.remove_reader(fd)

    async def _inbound(self) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.BINARY:
                continue
            try:
                frame = ch.decode(msg.data, self.proto)
            except ch.ChannelError:
                await self.ws.close(code=1002)
                return
            if frame.channel is ch.Channel.STDIN:
                await self._stdin(frame.data)
            elif frame.channel is ch.Channel.RESIZE and self.master is not None:
                width, height = ch.parse_resize(frame.data)
                fcntl.ioctl(
                    self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0)
                )
            elif frame.channel is ch.Channel.CLOSE and frame.data == b"\x00":
                self._close_stdin()
        # The client went away: the command does not outlive its session.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGHUP)

    async def _stdin(self, data: bytes) -> None:
        if self.master is not None:
            os.write(self.master, data)
        elif self.proc.stdin is not None:
            self.proc.stdin.write(data)
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                await self.proc.stdin.drain()

    def _close_stdin(self) -> None:
        if self.master is not None:
            os.write(self.master, b"\x04")
        elif self.proc.stdin is not None:
            self.proc.stdin.close()


def _columns(res: Resource) -> tuple[list[str], Any]:
    def age(o: dict[str, Any]) -> str:
        return _age(o)

    def name(o: dict[str, Any]) -> str:
        return str(o["metadata"]["name"])

    if res.name == "pods":

        def pod(o: dict[str, Any]) -> list[Any]:
            st = o.get("status") or {}
            cs = st.get("containerStatuses") or []
            ready = sum(1 for c in cs if c.get("ready"))
            return [name(o), f"{ready}/{len(cs) or 1}", st.get("phase", "Pending"), 0, age(o)]

        return ["Name", "Ready", "Status", "Restarts", "Age"], pod
    if res.name == "deployments":

        def deploy(o: dict[str, Any]) -> list[Any]:
            st = o.get("status") or {}
            return [
                name(o),
                f"{st.get('readyReplicas', 0)}/{(o.get('spec') or {}).get('replicas', 0)}",
                st.get("updatedReplicas", 0),
                st.get("availableReplicas", 0),
                age(o),
            ]

        return ["Name", "Ready", "Up-to-date", "Available", "Age"], deploy
    if res.name == "secrets":
        return ["Name", "Type", "Data", "Age"], lambda o: [
            name(o),
            o.get("type", "Opaque"),
            len(o.get("data") or {}),
            age(o),
        ]
    if res.name == "configmaps":
        return ["Name", "Data", "Age"], lambda o: [name(o), len(o.get("data") or {}), age(o)]
    if res.name == "namespaces":
        return ["Name", "Status", "Age"], lambda o: [
            name(o),
            (o.get("status") or {}).get("phase", "Active"),
            age(o),
        ]
    return ["Name", "Age"], lambda o: [name(o), age(o)]


# ---------------------------------------------------------------- pytest fixtures


def kubeconfig_text(server: str, ca_pem: bytes, token: str, namespace: str = "default") -> str:
    """A kubeconfig for the fixture (JSON is YAML)."""
    return orjson.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fix",
                    "cluster": {
                        "server": server,
                        "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "fix", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "fix",
                    "context": {"cluster": "fix", "user": "fix", "namespace": namespace},
                }
            ],
            "current-context": "fix",
        }
    ).decode()


@dataclass
class KubeFixture:
    server: KubeApiServer
    kubeconfig: Path
    token: str

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def kube_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and API server certificate for this test session."""
    return make_pki(tmp_path_factory.mktemp("kube-pki"))


@contextlib.contextmanager
def running_kube(workdir: Path, pki: Pki, **kwargs: Any) -> Iterator[KubeFixture]:
    token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    server = KubeApiServer(workdir, pki, token, **kwargs).start()
    try:
        kc = workdir / "kubeconfig"
        kc.write_text(kubeconfig_text(server.url, pki.ca_pem, token))
        yield KubeFixture(server, kc, token)
    finally:
        server.stop()


@pytest.fixture
def kube_api(tmp_path: Path, kube_pki: Pki) -> Iterator[KubeFixture]:
    """A fresh fixture API server and a kubeconfig for it."""
    with running_kube(tmp_path, kube_pki) as fx:
        yield fx


def kubectl_binary() -> tuple[str, tuple[int, int]]:
    """The kubectl to test with and its client version: the newest versioned binary of a
    Cloud SDK install (its ``kubectl`` is a dispatcher that asks the server's version
    first), else ``kubectl`` on PATH."""
    import re
    import shutil
    import subprocess

    sdk = Path("/usr/lib/google-cloud-sdk/bin")
    found = sorted(
        (tuple(int(x) for x in m.groups()), p)
        for p in (sdk.glob("kubectl.1.*") if sdk.is_dir() else [])
        if (m := re.fullmatch(r"kubectl\.(\d+)\.(\d+)", p.name))
    )
    path = str(found[-1][1]) if found else shutil.which("kubectl")
    if path is None:
        pytest.skip("no kubectl (scripts/setup installs one)")
    out = subprocess.run(
        [path, "version", "--client", "-o", "json"], capture_output=True, text=True, check=True
    )
    info = orjson.loads(out.stdout)["clientVersion"]
    minor = int(re.match(r"\d+", info["minor"]).group())  # type: ignore[union-attr]
    return path, (int(info["major"]), minor)
