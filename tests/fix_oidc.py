"""OIDC issuers for the tests: a JWKS served over real HTTPS (a test CA, a thread with
``http.server``), signing keys that rotate, and tokens with the claim sets GitHub
Actions and GitLab CI really issue (as their documentation shows them)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(workdir: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 it signed: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("castgate test CA"))
        .issuer_name(_name("castgate test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (workdir / "ca.pem", workdir / "jwks-cert.pem", workdir / "jwks-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class Issuer:
    """One test OIDC issuer: RSA signing keys by kid, the newest signs."""

    def __init__(self, issuer: str, audience: str = "castgate") -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.kid = ""
        self.rotate()

    def rotate(self, *, drop_old: bool = False) -> str:
        """A new signing key with a new kid (the old ones stay published unless dropped)."""
        if drop_old:
            self.keys.clear()
        self.kid = f"k-{uuid.uuid4().hex[:8]}"
        self.keys[self.kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.kid

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
            out.append(jwk)
        return {"keys": out}

    def mint(
        self, claims: dict[str, Any], *, kid: str | None = None, key: Any = None, ttl: int = 300
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now - 5,
            "exp": now + ttl,
            "jti": str(uuid.uuid4()),
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        use = kid or self.kid
        return jwt.encode(
            body, key if key is not None else self.keys[use], algorithm="RS256",
            headers={"kid": use},
        )  # fmt: skip


def github_claims(
    *,
    repository: str = "acme/payments",
    ref: str = "refs/heads/main",
    run_id: str = "9876543210",
    run_attempt: str = "1",
    workflow: str = "deploy",
    actor: str = "octocat",
    environment: str | None = "prod",
    sha: str = "8f2e4c1d0b7a6e5f4c3b2a19080706050403abcd",
) -> dict[str, Any]:
    """A GitHub Actions id-token's claims (docs.github.com, "About security hardening
    with OpenID Connect"), for a job in ``environment``."""
    owner = repository.split("/")[0]
    sub = f"repo:{repository}:" + (f"environment:{environment}" if environment else f"ref:{ref}")
    claims: dict[str, Any] = {
        "sub": sub,
        "ref": ref,
        "sha": sha,
        "repository": repository,
        "repository_owner": owner,
        "repository_owner_id": "65",
        "repository_id": "74",
        "repository_visibility": "private",
        "actor_id": "12",
        "actor": actor,
        "triggering_actor": actor,
        "run_id": run_id,
        "run_number": "10",
        "run_attempt": run_attempt,
        "runner_environment": "github-hosted",
        "workflow": workflow,
        "workflow_ref": f"{repository}/.github/workflows/{workflow}.yml@{ref}",
        "workflow_sha": sha,
        "job_workflow_ref": f"{repository}/.github/workflows/{workflow}.yml@{ref}",
        "job_workflow_sha": sha,
        "head_ref": "",
        "base_ref": "",
        "event_name": "push",
        "ref_type": "branch",
        "ref_protected": "true",
    }
    if environment:
        claims["environment"] = environment
    return claims


def gitlab_claims(
    *,
    project_path: str = "acme/ledger",
    ref: str = "main",
    pipeline_id: str = "574",
    job_id: str = "302",
    user_login: str = "jdoe",
    environment: str | None = "production",
    sha: str = "714a629c0b401fdce83e847fc9589983fc6f46bc",
) -> dict[str, Any]:
    """A GitLab CI ``id_tokens`` token's claims (docs.gitlab.com, "OpenID Connect (OIDC)
    Authentication Using ID Tokens"); ``groups_direct`` is there as GitLab sends it."""
    namespace = project_path.split("/")[0]
    claims: dict[str, Any] = {
        "sub": f"project_path:{project_path}:ref_type:branch:ref:{ref}",
        "namespace_id": "72",
        "namespace_path": namespace,
        "project_id": "20",
        "project_path": project_path,
        "user_id": "1",
        "user_login": user_login,
        "user_email": f"{user_login}@example.com",
        "user_access_level": "developer",
        "groups_direct": [namespace, "sre"],
        "pipeline_id": pipeline_id,
        "pipeline_source": "push",
        "job_id": job_id,
        "ref": ref,
        "ref_type": "branch",
        "ref_path": f"refs/heads/{ref}",
        "ref_protected": "true",
        "runner_id": 1,
        "runner_environment": "gitlab-hosted",
        "sha": sha,
        "project_visibility": "private",
        "ci_config_ref_uri": f"gitlab.example.com/{project_path}//.gitlab-ci.yml@refs/heads/{ref}",
        "ci_config_sha": sha,
    }
    if environment:
        claims.update(
            environment=environment,
            environment_protected="true",
            deployment_tier="production",
            environment_action="start",
        )
    return claims


class JwksServer:
    """HTTPS server of issuers' JWKS at ``/NAME/jwks``; counts the fetches."""

    def __init__(self, workdir: Path) -> None:
        self.ca, cert, key = make_tls(workdir)
        self.issuers: dict[str, Issuer] = {}
        self.fetches: dict[str, int] = {}
        self.redirect_to: str | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.strip("/").removesuffix("/jwks")
                if server.redirect_to is not None and name == "redirect":
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                issuer = server.issuers.get(name)
                if issuer is None:
                    self.send_error(404)
                    return
                server.fetches[name] = server.fetches.get(name, 0) + 1
                body = json.dumps(issuer.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, name: str, issuer: Issuer) -> str:
        """Serve ``issuer``'s keys; returns its JWKS URL."""
        self.issuers[name] = issuer
        return f"{self.base}/{name}/jwks"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def jwks_server(tmp_path: Path) -> Iterator[JwksServer]:
    """A JWKS over HTTPS with its own test CA (``.ca``)."""
    server = JwksServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def jwks_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwksServer]:
    """The same, shared by a module's tests."""
    server = JwksServer(tmp_path_factory.mktemp("jwks"))
    try:
        yield server
    finally:
        server.stop()
