"""The control API against its own OpenAPI document, on a real relay.

- schemathesis (CLI, every check, every phase, deterministic generation, bounded
  examples) with an auditor + approver token: no 5xx, no response that violates the
  document, no status code the document does not declare, schema-valid requests
  accepted and schema-invalid ones rejected. A finished session, a live one (held for
  approval) and that pending approval are fed to it as ``id`` values, so the 200 paths
  of the per-session and per-approval operations are exercised too, not only their 404s.
- Every operation the document marks as protected answers 401 without a token, with a
  garbage token and with a forged JWT, and 403 to identities lacking the role.
- The served document has exactly the routes registered on the aiohttp app, and real
  answers (real ids) validate against the schemas it gives them.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator

from recorder.config import parse_config
from recorder.signing import SigningKey
from recorder.store import Store
from relay.api import build_app
from relay.context import RelayContext
from relay.openapi import Undocumented, declared
from tests.fix_relay import BIN, TOKENS, Relay, mint_jwt, wait_for, write_jwks

SCHEMATHESIS = str(BIN / "schemathesis")
MAX_EXAMPLES = 30
HARD_TIMEOUT_S = 120


def call(
    relay: Relay, path: str, token: str | None = None, method: str = "GET", body: Any = None
) -> tuple[int, Any]:
    """One API request; the status and the decoded JSON body (raw bytes otherwise)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        relay.api + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers=headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, json.loads(raw) if "json" in ctype else raw
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw


class HeldCommand:
    """``ssh web@relay 'systemctl restart ...'`` (real OpenSSH client) held for approval."""

    def __init__(self, relay: Relay, command: str) -> None:
        self.proc = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web@127.0.0.1", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.err = b""
        self._reader = threading.Thread(target=self._read_err, daemon=True)
        self._reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(4096):  # type: ignore[attr-defined]
            self.err += chunk

    def approval_id(self) -> int:
        pattern = rb"approval #(\d+) required"
        wait_for(lambda: re.search(pattern, self.err) is not None, 20)
        m = re.search(pattern, self.err)
        assert m is not None
        return int(m.group(1))

    def close(self) -> None:
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def fixtures(relay: Relay) -> Iterator[dict[str, Any]]:
    """A finished session, a live session held for approval, and its pending approval."""
    token = TOKENS["alice"]
    assert relay.ssh("web", "echo contract-finished").returncode == 0
    finished: list[str] = []

    def sealed() -> bool:
        rows = call(relay, "/api/v1/sessions?limit=50", token)[1]["sessions"]
        finished[:] = [
            r["id"]
            for r in rows
            if "contract-finished" in (r.get("title") or "") and r["status"] != "live"
        ]
        return bool(finished)

    wait_for(sealed, 15)
    held = HeldCommand(relay, "systemctl restart contract 2>/dev/null; echo released")
    try:
        aid = held.approval_id()
        rows = call(relay, "/api/v1/sessions?live=true", token)[1]["sessions"]
        live = [r["id"] for r in rows if "systemctl restart contract" in (r.get("title") or "")]
        assert live, rows
        yield {"finished": finished[0], "live": live[0], "approval": aid}
    finally:
        # schemathesis may have approved or denied it already; otherwise release it.
        call(relay, f"/api/v1/approvals/{aid}/deny", token, "POST", {"reason": "test over"})
        held.close()


def _config(tmp_path: Path, sessions: list[str], approvals: list[str]) -> Path:
    """Real ids for the ``{id}`` operations (half of the cases; the rest are generated)
    and, for the WebSocket route only, 400 as an accepted answer to a schema-valid
    request: a plain GET cannot upgrade (OpenAPI 3.0 cannot describe the handshake)."""

    def ids(values: list[str]) -> str:
        return ", ".join(json.dumps(v) for v in values)

    path = tmp_path / "schemathesis.toml"
    path.write_text(
        f"""
[cache]
enabled = false

[dictionaries.sessions]
values = [{ids(sessions)}]

[dictionaries.approvals]
values = [{ids(approvals)}]

[[operations]]
include-path-regex = '^/api/v1/sessions/[{{]id[}}](/cast)?$'
parameters = {{ "path.id" = {{ dictionary = "sessions", probability = 0.5 }} }}

[[operations]]
include-path = "/api/v1/sessions/{{id}}/live"
parameters = {{ "path.id" = {{ dictionary = "sessions", probability = 0.5 }} }}
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403, 404]

[[operations]]
include-path-regex = '^/api/v1/approvals/[{{]id[}}]'
parameters = {{ "path.id" = {{ dictionary = "approvals", probability = 0.5 }} }}
"""
    )
    return path


def test_schemathesis_all_checks(relay: Relay, fixtures: dict[str, Any], tmp_path: Path) -> None:
    config = _config(
        tmp_path, [fixtures["finished"], fixtures["live"]], [str(fixtures["approval"])]
    )
    argv = [
        SCHEMATHESIS,
        "--config-file",
        str(config),
        "run",
        f"{relay.api}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKENS['alice']}",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",  # derandomized; implies no example database
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
    ]
    started = time.monotonic()
    res = subprocess.run(
        argv,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HARD_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    report = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"schemathesis exit {res.returncode} after {elapsed:.1f}s\n{report}"
    assert "Tested: 13" in res.stdout, report  # every operation of the document
    assert not [e for e in relay.logs if e.get("msg") == "api.error"], "500s logged"


def _protected(doc: dict[str, Any]) -> list[tuple[str, str]]:
    ops = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if op.get("security", doc.get("security")):
                ops.append((method.upper(), path))
    return ops


def test_protected_routes_refuse_without_the_role(relay: Relay, fixtures: dict[str, Any]) -> None:
    status, doc = call(relay, "/openapi.json")
    assert status == 200
    # The token exchange is for any OIDC identity (no role): checked on its own below.
    exchange = ("POST", "/api/v1/token/exchange")
    ops = [op for op in _protected(doc) if op != exchange]
    public = {p for p, item in doc["paths"].items() for op in item.values() if "security" in op}
    assert public == {"/healthz", "/openapi.json"}
    assert len(ops) == 11
    forger = relay.workdir / "forger"
    forger.mkdir(exist_ok=True)
    forged = Relay.__new__(Relay)
    forged.jwt_key = write_jwks(forger)
    unauthenticated = {
        "no token": None,
        "garbage token": "not-a-token",
        "forged JWT": mint_jwt(forged, groups=["sre"]),
        "expired JWT": mint_jwt(relay, groups=["sre"], exp=int(time.time()) - 60),
    }
    lacking = {
        "ci-agent": TOKENS["ci-agent"],
        "outsider": TOKENS["outsider"],
        "agent JWT": mint_jwt(relay, groups=["agents"]),
    }
    wrong: list[str] = []
    for method, template in ops:
        # Real ids: a refusal must not depend on the resource being missing.
        sid = fixtures["live"] if "live" in template else fixtures["finished"]
        aid = str(fixtures["approval"])
        path = template.replace("{id}", aid if "approvals" in template else sid)
        body = {"reason": "contract"} if method == "POST" else None
        for expected, tokens in ((401, unauthenticated), (403, lacking)):
            for who, token in tokens.items():
                status, answer = call(relay, path, token, method, body)
                ok = (
                    status == expected
                    and isinstance(answer, dict)
                    and isinstance(answer.get("error"), str)
                )
                if not ok:
                    wrong.append(f"{method} {path} as {who}: {status} {answer!r:.200}")
    for who, token in {**unauthenticated, "static token": TOKENS["ci-agent"]}.items():
        status, answer = call(relay, exchange[1], token, "POST", None)
        if status != (403 if who == "static token" else 401) or "token" in (answer or {}):
            wrong.append(f"POST {exchange[1]} as {who}: {status} {answer!r:.200}")
    assert not wrong, "\n".join(wrong)
    # The pending approval survived all of that.
    status, row = call(relay, f"/api/v1/approvals/{fixtures['approval']}", TOKENS["bob"])
    assert status == 200 and row["status"] in ("pending", "approved", "denied")


def _app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(METHOD, path) of every route registered on the control API's aiohttp app, but
    those declared undocumented (relay to relay), built in this process."""
    cfg = parse_config('data_dir = "data"\n', tmp_path / "castgate.toml")
    store = Store.open(cfg.store_url())
    try:
        app = build_app(RelayContext(cfg, store, SigningKey.generate()))
    finally:
        store.close()
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and not isinstance(declared(route.handler), Undocumented)
    }


def test_every_route_is_in_the_served_document_and_back(relay: Relay, tmp_path: Path) -> None:
    status, doc = call(relay, "/openapi.json")
    assert status == 200
    served = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert served == _app_routes(tmp_path)


def _response_schema(doc: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    content = doc["paths"][path][method]["responses"]["200"]["content"]
    schema: dict[str, Any] = content["application/json"]["schema"]
    return {**schema, "components": doc["components"]}  # so its $refs resolve


def test_real_responses_validate_against_their_schema(
    relay: Relay, fixtures: dict[str, Any]
) -> None:
    """Each JSON operation's real 200 answer (with real ids: a finished session, a live
    one, its pending approval, a run) against the schema the served document gives it."""
    token = TOKENS["alice"]
    status, doc = call(relay, "/openapi.json")
    assert status == 200
    runs = call(relay, "/api/v1/runs", token)[1]["runs"]
    gets = {
        "/healthz": ["/healthz"],
        "/openapi.json": ["/openapi.json"],
        "/api/v1/sessions": ["/api/v1/sessions", "/api/v1/sessions?live=true&limit=5"],
        "/api/v1/sessions/{id}": [
            f"/api/v1/sessions/{fixtures['finished']}",
            f"/api/v1/sessions/{fixtures['live']}",
        ],
        "/api/v1/runs": ["/api/v1/runs"],
        "/api/v1/runs/{id}": [f"/api/v1/runs/{r['run_id']}" for r in runs[:2]],
        "/api/v1/approvals": ["/api/v1/approvals", "/api/v1/approvals?status=all"],
        "/api/v1/approvals/{id}": [f"/api/v1/approvals/{fixtures['approval']}"],
    }
    json_gets = {
        path
        for path, item in doc["paths"].items()
        if "get" in item and "application/json" in item["get"]["responses"]["200"]["content"]
    }
    # every JSON GET but the WebSocket upgrade is exercised here
    assert json_gets - set(gets) == {"/api/v1/sessions/{id}/live"}
    checked = 0
    for template, urls in gets.items():
        validator = OAS30Validator(
            _response_schema(doc, template), format_checker=OAS30Validator.FORMAT_CHECKER
        )
        for url in urls:
            status, body = call(relay, url, token)
            assert status == 200, (url, body)
            errors = [f"{url}: {e.json_path}: {e.message}" for e in validator.iter_errors(body)]
            assert not errors, "\n".join(errors)
            checked += 1
    assert checked >= 10
    # and an error answer against the Error schema
    error = OAS30Validator({"$ref": "#/components/schemas/Error", "components": doc["components"]})
    status, body = call(relay, "/api/v1/sessions/nope", token)
    assert status == 404 and not list(error.iter_errors(body))
