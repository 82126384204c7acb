"""Kubernetes request classification: what kubectl and client-go send, placed the way
the API server's RequestInfo places it; what cannot be placed is opaque."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.k8s.request import K8sRequest, classify, split_target


def c(method: str, path: str, query: str = "", content_type: str | None = None) -> K8sRequest:
    return classify(method, path, query, content_type)


@pytest.mark.parametrize(
    ("method", "path", "query", "want"),
    [
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            "limit=500",
            ("list", "", "pods", None, "prod", None),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods/web-1",
            "",
            ("get", "", "pods", None, "prod", "web-1"),
        ),
        ("GET", "/api/v1/pods", "", ("list", "", "pods", None, None, None)),
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            "watch=true&resourceVersion=5",
            ("watch", "", "pods", None, "prod", None),
        ),
        (
            "GET",
            "/api/v1/watch/namespaces/prod/pods/web-1",
            "",
            ("watch", "", "pods", None, "prod", "web-1"),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            "fieldSelector=metadata.name%3Dweb-1&watch=1",
            ("watch", "", "pods", None, "prod", "web-1"),
        ),
        (
            "POST",
            "/apis/apps/v1/namespaces/prod/deployments",
            "fieldManager=kubectl-client-side-apply",
            ("create", "apps", "deployments", None, "prod", None),
        ),
        (
            "PUT",
            "/apis/apps/v1/namespaces/prod/deployments/web",
            "",
            ("update", "apps", "deployments", None, "prod", "web"),
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/prod/deployments/web/scale",
            "",
            ("patch", "apps", "deployments", "scale", "prod", "web"),
        ),
        (
            "DELETE",
            "/apis/apps/v1/namespaces/prod/deployments/web",
            "",
            ("delete", "apps", "deployments", None, "prod", "web"),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/prod/secrets",
            "labelSelector=a%3Db",
            ("deletecollection", "", "secrets", None, "prod", None),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods/web-1/log",
            "follow=true&container=app",
            ("log", "", "pods", "log", "prod", "web-1"),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods/web-1/attach",
            "stdin=true&stdout=true&tty=true",
            ("attach", "", "pods", "attach", "prod", "web-1"),
        ),
        (
            "POST",
            "/api/v1/namespaces/prod/pods/web-1/portforward",
            "",
            ("portforward", "", "pods", "portforward", "prod", "web-1"),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/services/web:80/proxy/admin/x",
            "",
            ("proxy", "", "services", "proxy", "prod", "web:80"),
        ),
        (
            "GET",
            "/api/v1/proxy/namespaces/prod/pods/web-1",
            "",
            ("proxy", "", "pods", None, "prod", "web-1"),
        ),
        # The namespace of a namespaces/NAME request is NAME (RequestInfo does this).
        (
            "DELETE",
            "/api/v1/namespaces/prod",
            "",
            ("delete", "", "namespaces", None, "prod", "prod"),
        ),
        (
            "PUT",
            "/api/v1/namespaces/prod/finalize",
            "",
            ("update", "", "namespaces", "finalize", "prod", "prod"),
        ),
        ("GET", "/api/v1/nodes/n1", "", ("get", "", "nodes", None, None, "n1")),
        (
            "HEAD",
            "/api/v1/namespaces/a/configmaps/b",
            "",
            ("get", "", "configmaps", None, "a", "b"),
        ),
    ],
)
def test_resource_requests(method: str, path: str, query: str, want: tuple[object, ...]) -> None:
    r = c(method, path, query)
    assert r.kind == "resource"
    assert (r.verb, r.group, r.resource, r.subresource, r.namespace, r.name) == want


def test_exec_command_container_and_flags() -> None:
    q = "command=sh&command=-c&command=echo+a%26%26rm+-rf+%2F&container=app&stdin=true&stdout=true&tty=true"
    r = c("GET", "/api/v1/namespaces/payments/pods/api-7/exec", q)
    assert (r.verb, r.namespace, r.name, r.container) == ("exec", "payments", "api-7", "app")
    assert r.command == ("sh", "-c", "echo a&&rm -rf /")
    assert r.tty and r.stdin
    assert r.describe() == "exec pods/api-7 -n payments -c app -- sh -c 'echo a&&rm -rf /'"


def test_describe_and_server_side_apply() -> None:
    r = c(
        "PATCH",
        "/apis/apps/v1/namespaces/prod/deployments/web",
        "fieldManager=kubectl",
        "application/apply-patch+yaml; charset=utf-8",
    )
    assert r.server_side_apply and r.patch_type == "application/apply-patch+yaml"
    assert r.describe() == "patch deployments.apps/web -n prod"
    assert not c(
        "PATCH", "/api/v1/namespaces/a/pods/b", "", "application/merge-patch+json"
    ).server_side_apply
    assert c("GET", "/api/v1/namespaces/a/pods/b/log", "follow=true").follow


@pytest.mark.parametrize(
    "path",
    [
        "/version",
        "/api",
        "/apis",
        "/api/v1",
        "/apis/apps",
        "/apis/apps/v1",
        "/openapi/v2",
        "/openapi/v3",
        "/openapi/v3/apis/apps/v1",
    ],
)
def test_discovery(path: str) -> None:
    assert c("GET", path).kind == "discovery"
    # Discovery is read-only: a POST to it is not discovery.
    assert c("POST", path).kind != "discovery"


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("GET", "/healthz", ""),
        ("GET", "/metrics", ""),
        ("GET", "/logs/kubelet.log", ""),
        ("OPTIONS", "/api/v1/pods", ""),
        ("TRACE", "/api/v1/pods", ""),
        ("GET", "/api/v1/namespaces/a/pods/%2e%2e/exec", ""),
        ("GET", "/api/v1/namespaces/a/pods/x%2Fy/exec", ""),
        ("GET", "/api/v1/namespaces/a//pods", ""),
        ("GET", "/api/v1/namespaces/a/pods/b/exec/more", "command=ls"),
        ("GET", "/apis/Apps/v1/deployments", ""),
        ("GET", "/api/one/pods", ""),
        ("GET", "api/v1/pods", ""),
        ("GET", "/api/v1/namespaces/a/pods/b/../../secrets", ""),
        ("GET", "/api/v1/" + "x/" * 5000, ""),
    ],
)
def test_unclassifiable_is_opaque(method: str, path: str, query: str) -> None:
    r = c(method, path, query)
    assert r.kind == "opaque" and r.verb is None and r.reason


def test_split_target() -> None:
    assert split_target("/k8s/prod-k8s/api/v1/pods") == ("prod-k8s", "/api/v1/pods")
    assert split_target("/k8s/prod-k8s") == ("prod-k8s", "/")
    assert split_target("/api/v1/pods") is None
    assert split_target("/k8s//api") is None
    assert split_target("/k8s/a%2fb/api") is None


@given(
    st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "BREW"]),
    st.text(max_size=120),
    st.text(max_size=120),
)
def test_any_input_classifies_without_raising(method: str, path: str, query: str) -> None:
    r = classify(method, path, query)
    assert r.kind in ("resource", "discovery", "opaque")
    if r.kind == "resource":
        assert r.verb and r.resource
        assert ".." not in (r.resource, r.name, r.namespace)
