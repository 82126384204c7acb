"""``k8s`` rules: the pattern shape, wide reading for rules that restrict, exact reading
for allow rules, first match wins, exec commands through the shell rules, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from recorder.config import ConfigError, parse_config
from relay.k8s.request import K8sRequest, classify
from relay.k8s.rules import matches_any
from relay.policy import Policy

TARGETS = """
[[targets]]
name = "prod-k8s"
kind = "kubernetes"
address = "https://10.0.0.7:6443"
token_env = "PROD_K8S_TOKEN"
groups = ["agents"]
[[targets]]
name = "strict-k8s"
kind = "kubernetes"
address = "https://10.0.0.8:6443"
token_env = "T"
groups = ["agents"]
default = "block"
[[targets]]
name = "web"
kind = "ssh"
address = "10.0.0.5:22"
groups = ["agents"]
"""

RULES = """
[[rules]]
name = "prod-deletes"
k8s = ["delete:deployments@prod"]
action = "approve"
[[rules]]
name = "no-secrets"
k8s = ["get:secrets"]
targets = ["prod-k8s"]
action = "block"
[[rules]]
name = "no-exec-payments"
k8s = ["exec:*@payments"]
action = "block"
[[rules]]
name = "no-rm"
command = '^rm -rf'
action = "block"
[[rules]]
name = "dev-reads"
k8s = ["get,list,watch:pods,deployments.apps@dev", "exec:pods@dev", "log:pods@dev"]
targets = ["strict-k8s"]
action = "allow"
"""


def policy(rules: str = RULES) -> Policy:
    return Policy(parse_config(TARGETS + rules, Path("/etc/castgate/castgate.toml")))


def req(method: str, path: str, query: str = "", ctype: str | None = None) -> K8sRequest:
    return classify(method, path, query, ctype)


def decide(p: Policy, target: str, r: K8sRequest) -> tuple[str, str | None]:
    d = p.decide_k8s(target=target, groups=["agents"], request=r)
    return d.action, d.rule_name


def test_brief_examples() -> None:
    p = policy()
    delete = req("DELETE", "/apis/apps/v1/namespaces/prod/deployments/web")
    assert decide(p, "prod-k8s", delete) == ("approve", "prod-deletes")
    staging = req("DELETE", "/apis/apps/v1/namespaces/staging/deployments/web")
    assert decide(p, "prod-k8s", staging) == ("allow", None)
    secret = req("GET", "/api/v1/namespaces/prod/secrets/db")
    assert decide(p, "prod-k8s", secret) == ("block", "no-secrets")
    exec_ = req("POST", "/api/v1/namespaces/payments/pods/api/exec", "command=ls")
    assert decide(p, "prod-k8s", exec_) == ("block", "no-exec-payments")


@pytest.mark.parametrize(
    ("method", "path", "query", "ctype", "rule"),
    [
        # A list or watch returns whole Secrets: a rule about reading them covers both.
        ("GET", "/api/v1/namespaces/prod/secrets", "", None, "no-secrets"),
        ("GET", "/api/v1/secrets", "watch=true", None, "no-secrets"),
        # All namespaces include prod; a deletecollection deletes the named kind too.
        ("DELETE", "/apis/apps/v1/namespaces/prod/deployments", "", None, "prod-deletes"),
        # The namespace of a namespaces/prod request is prod (deleting the namespace is
        # not a deployment delete, so no rule: allow).
    ],
)
def test_rules_that_restrict_are_read_widely(
    method: str, path: str, query: str, ctype: str | None, rule: str
) -> None:
    assert decide(policy(), "prod-k8s", req(method, path, query, ctype))[1] == rule


def test_wide_reading_namespace_name_and_verbs() -> None:
    lst = req("GET", "/apis/apps/v1/deployments")  # all namespaces
    assert matches_any(("delete,list:deployments@prod",), lst, restricts=True)
    assert not matches_any(("list:deployments@prod",), lst, restricts=False)
    named = ("get:secrets#db-*",)
    assert matches_any(named, req("GET", "/api/v1/namespaces/a/secrets"), restricts=True)
    assert not matches_any(named, req("GET", "/api/v1/namespaces/a/secrets"), restricts=False)
    assert matches_any(named, req("GET", "/api/v1/namespaces/a/secrets/db-main"), restricts=False)
    assert not matches_any(named, req("GET", "/api/v1/namespaces/a/secrets/app"), restricts=True)
    ssa = req(
        "PATCH", "/apis/apps/v1/namespaces/prod/deployments/web", "", "application/apply-patch+yaml"
    )
    assert matches_any(("create:deployments",), ssa, restricts=True)
    assert not matches_any(("create:deployments",), ssa, restricts=False)
    put = req("PUT", "/apis/apps/v1/namespaces/prod/deployments/web")
    assert matches_any(("patch:deployments",), put, restricts=True)
    scale = req("PATCH", "/apis/apps/v1/namespaces/prod/deployments/web/scale")
    assert matches_any(("patch:deployments",), scale, restricts=True)
    assert not matches_any(("patch:deployments",), scale, restricts=False)
    assert matches_any(("patch:deployments/scale",), scale, restricts=False)


def test_group_suffix() -> None:
    apps = req("GET", "/apis/apps/v1/namespaces/a/deployments/x")
    ext = req("GET", "/apis/extensions/v1beta1/namespaces/a/deployments/x")
    assert matches_any(("get:deployments.apps",), apps, restricts=False)
    assert not matches_any(("get:deployments.apps",), ext, restricts=False)
    assert matches_any(("get:deployments",), ext, restricts=False)
    ing = req("GET", "/apis/networking.k8s.io/v1/namespaces/a/ingresses/x")
    assert matches_any(("get:ingresses.networking.k8s.io",), ing, restricts=False)


def test_allowlist_target() -> None:
    p = policy()
    assert decide(p, "strict-k8s", req("GET", "/api/v1/namespaces/dev/pods")) == (
        "allow",
        "dev-reads",
    )
    assert decide(p, "strict-k8s", req("GET", "/api/v1/pods"))[0] == "block"  # all namespaces
    assert decide(p, "strict-k8s", req("GET", "/api/v1/namespaces/dev/secrets"))[0] == "block"
    assert decide(p, "strict-k8s", req("DELETE", "/api/v1/namespaces/dev/pods/a"))[0] == "block"
    # An allowed exec is not undone by the default of the command check...
    ls = req("GET", "/api/v1/namespaces/dev/pods/a/exec", "command=ls&command=-l")
    assert decide(p, "strict-k8s", ls) == ("allow", "dev-reads")
    # ...but a command rule that matches still counts, anywhere in the command.
    rm = req(
        "GET", "/api/v1/namespaces/dev/pods/a/exec", "command=sh&command=-c&command=cd+/;rm+-rf+x"
    )
    assert decide(p, "strict-k8s", rm) == ("block", "no-rm")
    # What the shell parser cannot follow is opaque (approve on an enforcing target).
    ev = req("GET", "/api/v1/namespaces/dev/pods/a/exec", "command=sh&command=-c&command=$X")
    assert decide(p, "strict-k8s", ev)[0] in ("approve", "block")
    assert decide(p, "strict-k8s", ev)[1] == "castgate:opaque"


def test_exec_command_rules_on_a_permissive_target() -> None:
    p = policy()
    rm = req("POST", "/api/v1/namespaces/web/pods/a/exec", "command=rm&command=-fr&command=/data")
    assert decide(p, "prod-k8s", rm) == ("block", "no-rm")
    ok = req("POST", "/api/v1/namespaces/web/pods/a/exec", "command=ls")
    assert decide(p, "prod-k8s", ok) == ("allow", None)


def test_discovery_opaque_and_refused() -> None:
    p = policy()
    assert decide(p, "strict-k8s", req("GET", "/apis")) == ("allow", None)
    assert decide(p, "prod-k8s", req("GET", "/metrics")) == ("approve", "castgate:opaque")
    pf = req("POST", "/api/v1/namespaces/dev/pods/a/portforward")
    assert decide(p, "prod-k8s", pf) == ("block", "castgate:refused")
    proxy = req("GET", "/api/v1/namespaces/dev/services/a:80/proxy/")
    d = p.decide_k8s(target="prod-k8s", groups=["agents"], request=proxy)
    assert (d.action, d.reason) == (
        "block",
        "the proxy subresource is off for this target (allow_proxy)",
    )
    allowed = Policy(
        parse_config(
            TARGETS.replace('token_env = "T"', 'token_env = "T"\nallow_port_forward = true'),
            Path("/x.toml"),
        )
    )
    assert decide(allowed, "strict-k8s", pf) == ("block", "castgate:default")
    assert decide(allowed, "prod-k8s", pf) == ("block", "castgate:refused")


def test_catch_all_rule_and_first_match() -> None:
    p = policy(
        """
[[rules]]
name = "hold-all"
targets = ["prod-k8s"]
action = "approve"
[[rules]]
name = "never"
k8s = ["*:*"]
action = "block"
"""
    )
    assert decide(p, "prod-k8s", req("GET", "/api/v1/namespaces/a/pods")) == ("approve", "hold-all")
    assert decide(p, "strict-k8s", req("GET", "/api/v1/namespaces/a/pods")) == ("block", "never")


def test_k8s_rules_stay_out_of_ssh_and_sql() -> None:
    p = policy()
    # Without the filter, a k8s-only rule would be a catch-all for SSH commands.
    assert p.decide_shell(target="web", groups=["agents"], command="uptime").action == "allow"
    assert (
        p.decide(
            target="web", groups=["agents"], command="SELECT 1", sql_nodes=["SelectStmt"]
        ).action
        == "allow"
    )
    assert p.rule("no-secrets") is not None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("delete", "expected verb:resource"),
        ("remove:pods", "unknown verb 'remove'"),
        ("get:Pods", "expected verb:resource"),
        ("get:pods@", "expected verb:resource"),
        ("get,:pods", "empty verb"),
        ("get:pods,", "empty item in resources"),
        ("get:pods@prod#", "expected verb:resource"),
    ],
)
def test_bad_patterns_are_one_line_errors(pattern: str, message: str) -> None:
    text = TARGETS + f"[[rules]]\nname = 'r'\nk8s = ['{pattern}']\naction = 'block'\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, Path("/etc/castgate/castgate.toml"))
    assert "rules[0] (r).k8s" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_k8s_does_not_mix_with_command() -> None:
    text = TARGETS + "[[rules]]\nname = 'r'\nk8s = ['get:pods']\ncommand = 'ls'\naction = 'block'\n"
    with pytest.raises(ConfigError, match="do not combine"):
        parse_config(text)
