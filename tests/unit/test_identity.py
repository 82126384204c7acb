"""relay.identity: SSH keys, static tokens and OIDC JWTs, with real keys and real PyJWT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from recorder.config import Config, ConfigError, parse_config
from recorder.masking import Masker, MaskPolicy
from relay.identity import Authenticator, AuthError, Identity, _JwksUrl
from tests.fix_oidc import GITHUB_ISSUER, Issuer, JwksServer, github_claims, gitlab_claims

ISSUER = "https://idp.example"
AUDIENCE = "castgate"
STATIC_TOKEN = "st-0123456789abcdef-secret"
STATIC_SHA = hashlib.sha256(STATIC_TOKEN.encode()).hexdigest()

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class Keys:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    ed_key: ed25519.Ed25519PrivateKey
    rogue: rsa.RSAPrivateKey  # never published in the JWKS


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_key=ec.generate_private_key(ec.SECP256R1()),
        ed_key=ed25519.Ed25519PrivateKey.generate(),
        rogue=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        data = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid, "use": "sig"}


def jwks(keys: Keys) -> dict[str, Any]:
    return {
        "keys": [
            jwk(keys.rsa_key, "rsa-1"),
            jwk(keys.ec_key, "ec-1"),
            jwk(keys.ed_key, "ed-1"),
        ]
    }


OIDC = f"""
[oidc]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks = "file:jwks.json"
"""

IDENTITIES = f"""
[[identities]]
name = "ci-agent"
groups = ["agents"]
token_sha256 = "{STATIC_SHA}"

[[identities]]
name = "alice"
groups = ["sre", "approvers"]
"""


def make_config(tmp_path: Path, text: str, jwks_data: dict[str, Any] | None = None) -> Config:
    if jwks_data is not None:
        (tmp_path / "jwks.json").write_text(json.dumps(jwks_data), encoding="utf-8")
    path = tmp_path / "castgate.toml"
    path.write_text(text, encoding="utf-8")
    return parse_config(text, path)


@pytest.fixture
def auth(tmp_path: Path, keys: Keys) -> Authenticator:
    return Authenticator(make_config(tmp_path, OIDC + IDENTITIES, jwks(keys)))


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-42",
        "exp": now + 600,
        "iat": now,
        "groups": ["agents", "sre"],
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(keys: Keys, alg: str = "RS256", kid: str | None = "default", **over: Any) -> str:
    keyset: dict[str, PrivateKey] = {
        "RS256": keys.rsa_key,
        "ES256": keys.ec_key,
        "EdDSA": keys.ed_key,
    }
    key = keyset[alg]
    if kid == "default":
        kid = {"RS256": "rsa-1", "ES256": "ec-1", "EdDSA": "ed-1"}[alg]
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**over), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def refused(auth: Authenticator, token: str, reason: str) -> None:
    with pytest.raises(AuthError) as info:
        auth.by_token(token)
    assert str(info.value) == reason
    assert token not in str(info.value)
    # No chained PyJWT exception either: a traceback in a log must not carry details.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


# --- OIDC: accepted tokens ------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_valid_token_per_algorithm(auth: Authenticator, keys: Keys, alg: str) -> None:
    exp = int(time.time()) + 600
    ident = auth.by_token(sign(keys, alg, exp=exp))
    assert ident == Identity(
        name="user-42",
        groups=("agents", "sre"),
        method="oidc",
        subject="user-42",
        expires_at=float(exp),
        provider="oidc",
        leeway=30.0,
    )


def test_preferred_username_names_the_identity(auth: Authenticator, keys: Keys) -> None:
    ident = auth.by_token(sign(keys, preferred_username="bob"))
    assert (ident.name, ident.subject) == ("bob", "user-42")


def test_oidc_identity_gets_only_claim_groups(auth: Authenticator, keys: Keys) -> None:
    # "alice" is also a static identity with groups sre/approvers; the token says agents.
    ident = auth.by_token(sign(keys, preferred_username="alice", groups=["agents"]))
    assert (ident.name, ident.groups, ident.method) == ("alice", ("agents",), "oidc")


@pytest.mark.parametrize(
    ("value", "groups"),
    [
        ("sre", ("sre",)),
        (["a", "b", "a"], ("a", "b")),
        (["a", 7], ()),
        ({"a": 1}, ()),
        (42, ()),
        (None, ()),
    ],
)
def test_groups_claim_shapes(
    auth: Authenticator, keys: Keys, value: object, groups: tuple[str, ...]
) -> None:
    assert auth.by_token(sign(keys, groups=value)).groups == groups


def test_custom_groups_claim(tmp_path: Path, keys: Keys) -> None:
    cfg = make_config(tmp_path, OIDC + 'groups_claim = "roles"\n', jwks(keys))
    ident = Authenticator(cfg).by_token(sign(keys, roles=["dba"]))
    assert ident.groups == ("dba",)


def test_audience_list_containing_ours(auth: Authenticator, keys: Keys) -> None:
    assert auth.by_token(sign(keys, aud=["other", AUDIENCE])).name == "user-42"


def test_expiry_within_leeway_is_accepted(auth: Authenticator, keys: Keys) -> None:
    assert auth.by_token(sign(keys, exp=int(time.time()) - 10)).method == "oidc"


def test_token_without_kid_uses_a_single_key_set(tmp_path: Path, keys: Keys) -> None:
    cfg = make_config(tmp_path, OIDC, {"keys": [jwk(keys.ed_key, "only")]})
    assert Authenticator(cfg).by_token(sign(keys, "EdDSA", kid=None)).name == "user-42"


# --- OIDC: refused tokens -------------------------------------------------------------


def test_expired_beyond_leeway(auth: Authenticator, keys: Keys) -> None:
    refused(auth, sign(keys, exp=int(time.time()) - 120), "token expired")


def test_not_yet_valid(auth: Authenticator, keys: Keys) -> None:
    refused(auth, sign(keys, nbf=int(time.time()) + 300), "token not yet valid")


def test_wrong_audience(auth: Authenticator, keys: Keys) -> None:
    refused(auth, sign(keys, aud="someone-else"), "wrong audience")


def test_wrong_issuer(auth: Authenticator, keys: Keys) -> None:
    refused(auth, sign(keys, iss="https://evil.example"), "wrong issuer")


@pytest.mark.parametrize("missing", ["exp", "iss", "aud"])
def test_required_claims(auth: Authenticator, keys: Keys, missing: str) -> None:
    dropped: dict[str, Any] = {missing: None}
    refused(auth, sign(keys, **dropped), "malformed token")


def test_no_name_at_all(auth: Authenticator, keys: Keys) -> None:
    refused(auth, sign(keys, sub=None), "malformed token")


def alg_none_token(kid: str | None = "rsa-1") -> str:
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}."


def hs256_with_public_pem(keys: Keys) -> str:
    # The classic confusion attack: HMAC keyed with the RSA public key an attacker can
    # download. Built by hand because PyJWT itself refuses a PEM as an HMAC secret.
    pem = keys.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def test_alg_none_refused(auth: Authenticator) -> None:
    refused(auth, alg_none_token(), "algorithm not allowed")
    refused(auth, alg_none_token(kid=None), "algorithm not allowed")


def test_hs256_with_rsa_public_key_refused(auth: Authenticator, keys: Keys) -> None:
    refused(auth, hs256_with_public_pem(keys), "algorithm not allowed")


def test_none_and_hs_refused_even_if_configured(tmp_path: Path, keys: Keys) -> None:
    text = OIDC + 'algorithms = ["RS256", "HS256", "none"]\n'
    auth = Authenticator(make_config(tmp_path, text, jwks(keys)))
    refused(auth, alg_none_token(), "algorithm not allowed")
    refused(auth, hs256_with_public_pem(keys), "algorithm not allowed")
    assert auth.by_token(sign(keys)).method == "oidc"


def test_algorithm_outside_configured_list(tmp_path: Path, keys: Keys) -> None:
    auth = Authenticator(make_config(tmp_path, OIDC + 'algorithms = ["ES256"]\n', jwks(keys)))
    refused(auth, sign(keys, "RS256"), "algorithm not allowed")


def test_key_type_must_match_algorithm(auth: Authenticator, keys: Keys) -> None:
    # An ES256 token that points at the RSA key's kid.
    token = jwt.encode(claims(), keys.ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
    refused(auth, token, "algorithm not allowed")


def test_unknown_key_refused(auth: Authenticator, keys: Keys) -> None:
    unknown_kid = jwt.encode(claims(), keys.rogue, algorithm="RS256", headers={"kid": "nope"})
    refused(auth, unknown_kid, "unknown signing key")
    # A rogue key claiming a published kid fails on the signature itself.
    stolen_kid = jwt.encode(claims(), keys.rogue, algorithm="RS256", headers={"kid": "rsa-1"})
    refused(auth, stolen_kid, "bad signature")


def test_no_kid_with_several_keys_refused(auth: Authenticator, keys: Keys) -> None:
    refused(auth, sign(keys, kid=None), "unknown signing key")


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_tampered_payload(auth: Authenticator, keys: Keys, alg: str) -> None:
    header, _, signature = sign(keys, alg).split(".")
    forged = b64(json.dumps(claims(groups=["platform"])).encode())
    refused(auth, f"{header}.{forged}.{signature}", "bad signature")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("abc.def.ghi", "malformed token"),  # header is not JSON
        (f"{b64(b'[1]')}.e30.sig", "malformed token"),  # header is not an object
        ("e30.e30.", "algorithm not allowed"),  # header without alg
        ("x" * 20000 + ".a.b", "malformed token"),  # refused before any decoding
    ],
)
def test_malformed_tokens(auth: Authenticator, token: str, reason: str) -> None:
    refused(auth, token, reason)


# --- static tokens --------------------------------------------------------------------


def test_static_token(auth: Authenticator) -> None:
    assert auth.by_token(STATIC_TOKEN) == Identity(
        name="ci-agent", groups=("agents",), method="token"
    )


@pytest.mark.parametrize("secret", ["wrong-token", STATIC_TOKEN + "x", "", "a.b.c"])
def test_wrong_static_token(auth: Authenticator, secret: str) -> None:
    with pytest.raises(AuthError) as info:
        auth.by_token(secret)
    assert str(info.value) in {"unknown token", "malformed token"}
    if secret:
        assert secret not in str(info.value)


def test_jwt_shaped_static_token_without_oidc(tmp_path: Path) -> None:
    secret = "aaaa.bbbb.cccc"
    text = f'[[identities]]\nname = "dotted"\ntoken_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
    auth = Authenticator(make_config(tmp_path, text))
    assert auth.by_token(secret).name == "dotted"
    refused(auth, "aaaa.bbbb.cccd", "unknown token")


def test_shared_token_hash_is_a_config_error(tmp_path: Path) -> None:
    text = "".join(
        f'[[identities]]\nname = "{n}"\ntoken_sha256 = "{STATIC_SHA}"\n' for n in ("a", "b")
    )
    with pytest.raises(ConfigError, match="same token"):
        Authenticator(make_config(tmp_path, text))


# --- SSH public keys ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_keys() -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    return (
        asyncssh.generate_private_key("ssh-ed25519", comment="laptop"),
        asyncssh.generate_private_key("ssh-ed25519"),
    )


def key_config(tmp_path: Path, *lines: str, name: str = "ops") -> Config:
    listed = ", ".join(json.dumps(line) for line in lines)
    text = f'[[identities]]\nname = "{name}"\ngroups = ["sre"]\nssh_keys = [{listed}]\n'
    return make_config(tmp_path, text)


def test_public_key_lookup(
    tmp_path: Path, ssh_keys: tuple[asyncssh.SSHKey, asyncssh.SSHKey]
) -> None:
    listed, unlisted = ssh_keys
    line = listed.export_public_key().decode().strip()
    assert line.endswith(" laptop")
    auth = Authenticator(key_config(tmp_path, line))
    expected = Identity(name="ops", groups=("sre",), method="publickey")
    assert auth.by_public_key(listed) == expected
    assert auth.by_public_key(listed.convert_to_public()) == expected
    # The same key data under another comment (as a client presents it) still matches.
    presented = asyncssh.import_public_key(line.rsplit(" ", 1)[0] + " other-host")
    assert auth.by_public_key(presented) == expected
    assert auth.by_public_key(unlisted) is None


def test_bad_key_line_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ops.*ssh_keys\[0\]"):
        Authenticator(key_config(tmp_path, "ssh-ed25519 AAAAnotakey"))


def test_key_shared_by_two_identities_is_a_config_error(
    tmp_path: Path, ssh_keys: tuple[asyncssh.SSHKey, asyncssh.SSHKey]
) -> None:
    line = ssh_keys[0].export_public_key().decode().strip()
    text = "".join(f'[[identities]]\nname = "{n}"\nssh_keys = ["{line}"]\n' for n in ("a", "b"))
    with pytest.raises(ConfigError, match="also listed"):
        Authenticator(make_config(tmp_path, text))


# --- JWKS source ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "no such JWKS file"), ("{not json", "not valid JSON"), ('{"keys": []}', "keys")],
)
def test_jwks_file_errors_name_the_file(tmp_path: Path, content: str | None, match: str) -> None:
    if content is not None:
        (tmp_path / "jwks.json").write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as info:
        Authenticator(make_config(tmp_path, OIDC))
    assert str(tmp_path / "jwks.json") in str(info.value)


def test_reload_jwks(tmp_path: Path, keys: Keys) -> None:
    auth = Authenticator(make_config(tmp_path, OIDC, {"keys": [jwk(keys.rsa_key, "rsa-1")]}))
    token = sign(keys, "ES256")
    refused(auth, token, "unknown signing key")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(keys)), encoding="utf-8")
    auth.reload_jwks()
    assert auth.by_token(token).method == "oidc"
    # A broken file on reload is reported and the keys in use stay.
    jwks_file.write_text("{broken", encoding="utf-8")
    with pytest.raises(ConfigError):
        auth.reload_jwks()
    assert auth.by_token(token).method == "oidc"


@pytest.mark.parametrize(
    ("jwks_spec", "error"),
    [
        ("https://idp.example/jwks", None),
        ("http://idp.example/jwks", "https"),
        ("ftp://x", "https"),
    ],
)
def test_jwks_url(tmp_path: Path, jwks_spec: str, error: str | None) -> None:
    cfg = make_config(tmp_path, OIDC.replace("file:jwks.json", jwks_spec))
    check: Callable[[], object] = lambda: Authenticator(cfg)  # noqa: E731
    if error is None:
        check()  # constructing never fetches: no network here
    else:
        with pytest.raises(ConfigError, match=error):
            check()


def test_unreachable_jwks_url_refuses(tmp_path: Path, keys: Keys) -> None:
    # Nothing listens on port 1: a real, fast connection failure, no mocks.
    cfg = make_config(tmp_path, OIDC.replace("file:jwks.json", "https://127.0.0.1:1/jwks"))
    auth = Authenticator(cfg)
    refused(auth, sign(keys), "signing keys unavailable")
    refused(auth, sign(keys, kid=None), "signing keys unavailable")


def test_unknown_algorithm_name_is_a_config_error(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError, match="RS265"):
        Authenticator(make_config(tmp_path, OIDC + 'algorithms = ["RS265"]\n', jwks(keys)))


def test_only_hmac_configured_is_a_config_error(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError, match="no usable algorithm"):
        Authenticator(make_config(tmp_path, OIDC + 'algorithms = ["HS256"]\n', jwks(keys)))


# --- several providers, claim-bound identities (pipelines) ----------------------------

PEOPLE = "https://idp.example"
GITLAB = "https://gitlab.example.com"


def pipelines_config(tmp_path: Path, server: JwksServer, extra: str = "") -> Config:
    people = Issuer(PEOPLE)
    github = Issuer(GITHUB_ISSUER)
    gitlab = Issuer(GITLAB)
    text = f"""
[[oidc.providers]]
name = "corp"
issuer = "{PEOPLE}"
audience = "castgate"
jwks = "{server.add("corp", people)}"
jwks_ca_file = "{server.ca}"
[[oidc.providers]]
name = "github"
issuer = "{GITHUB_ISSUER}"
audience = "castgate"
jwks = "{server.add("github", github)}"
jwks_ca_file = "{server.ca}"
[[oidc.providers]]
name = "gitlab"
issuer = "{GITLAB}"
audience = "castgate"
jwks = "{server.add("gitlab", gitlab)}"
jwks_ca_file = "{server.ca}"
groups_claim = "groups_direct"
[[identities]]
name = "payments-deploy"
groups = ["agents"]
oidc = {{ provider = "github", bound_claims = {{ repository = "acme/payments", ref = "refs/heads/main" }} }}
[[identities]]
name = "payments-release"
groups = ["agents", "release"]
oidc = {{ provider = "github", bound_claims = {{ repository = "acme/payments", ref = "refs/heads/release-*", workflow = "deploy*" }} }}
[[identities]]
name = "ledger-ci"
groups = ["agents"]
oidc = {{ provider = "gitlab", bound_claims = {{ project_path = "acme/ledger", ref = ["main", "stable"] }} }}
{extra}
"""
    return make_config(tmp_path, text)


@pytest.fixture
def pipes(tmp_path: Path, jwks_server: JwksServer) -> tuple[Authenticator, JwksServer]:
    return Authenticator(pipelines_config(tmp_path, jwks_server)), jwks_server


def test_people_idp_and_ci_issuers_at_once(pipes: tuple[Authenticator, JwksServer]) -> None:
    auth, server = pipes
    person = auth.by_token(
        server.issuers["corp"].mint(
            {"sub": "u-1", "preferred_username": "alice", "groups": ["sre"]}
        )
    )
    assert (person.name, person.groups, person.provider) == ("alice", ("sre",), "corp")
    assert person.run_id is None and person.attributes == ()

    gh = auth.by_token(server.issuers["github"].mint(github_claims()))
    assert (gh.name, gh.groups, gh.provider) == ("payments-deploy", ("agents",), "github")
    assert gh.subject == "repo:acme/payments:environment:prod"
    assert gh.attrs == {
        "actor": "octocat",
        "triggering_actor": "octocat",
        "repository": "acme/payments",
        "workflow": "deploy",
        "job_workflow_ref": "acme/payments/.github/workflows/deploy.yml@refs/heads/main",
        "run_id": "9876543210",
        "run_attempt": "1",
        "sha": "8f2e4c1d0b7a6e5f4c3b2a19080706050403abcd",
        "ref": "refs/heads/main",
        "environment": "prod",
    }
    assert gh.run_id == "github:9876543210:1"
    assert gh.detail()["run_id"] == "github:9876543210:1"

    gl = auth.by_token(server.issuers["gitlab"].mint(gitlab_claims()))
    # groups_direct is GitLab's groups claim: a bound identity's groups are its own.
    assert (gl.name, gl.groups, gl.provider) == ("ledger-ci", ("agents",), "gitlab")
    assert gl.attrs["user_login"] == "jdoe" and gl.attrs["project_path"] == "acme/ledger"
    assert gl.attrs["pipeline_id"] == "574" and gl.attrs["job_id"] == "302"
    assert gl.run_id == "gitlab:574"


def test_groups_in_a_ci_token_grant_nothing(pipes: tuple[Authenticator, JwksServer]) -> None:
    auth, server = pipes
    token = server.issuers["github"].mint({**github_claims(), "groups": ["sre", "platform"]})
    assert auth.by_token(token).groups == ("agents",)


@pytest.mark.parametrize(
    ("over", "shown"),
    [
        ({"repository": "acme/other"}, "repository='acme/other'"),
        ({"ref": "refs/heads/feature-x"}, "ref='refs/heads/feature-x'"),
        # The release identity also wants workflow deploy*: a release branch alone is not it.
        ({"ref": "refs/heads/release-2", "workflow": "lint"}, "workflow='lint'"),
        ({"repository": "acme/payments-fork"}, "repository='acme/payments-fork'"),
        ({"repository": None}, "repository='-'"),
    ],
)
def test_token_for_another_repository_or_branch_is_refused(
    pipes: tuple[Authenticator, JwksServer], over: dict[str, Any], shown: str
) -> None:
    auth, server = pipes
    claims = {**github_claims(), **over}
    token = server.issuers["github"].mint(claims)
    with pytest.raises(AuthError) as info:
        auth.by_token(token)
    assert str(info.value).startswith("no identity bound to these claims (provider github: ")
    assert shown in str(info.value)


def test_glob_and_list_bindings(pipes: tuple[Authenticator, JwksServer]) -> None:
    auth, server = pipes
    gh = server.issuers["github"]
    release = auth.by_token(
        gh.mint(github_claims(ref="refs/heads/release-7", workflow="deploy-prod"))
    )
    assert release.name == "payments-release"
    assert release.groups == ("agents", "release")
    gl = server.issuers["gitlab"]
    assert auth.by_token(gl.mint(gitlab_claims(ref="stable"))).name == "ledger-ci"
    with pytest.raises(AuthError, match="provider gitlab: project_path='acme/ledger', ref='dev'"):
        auth.by_token(gl.mint(gitlab_claims(ref="dev")))


def test_a_token_matching_two_identities_is_refused(
    tmp_path: Path, jwks_server: JwksServer
) -> None:
    extra = """
[[identities]]
name = "payments-any"
groups = ["agents"]
oidc = { provider = "github", bound_claims = { repository = "acme/*" } }
"""
    auth = Authenticator(pipelines_config(tmp_path, jwks_server, extra))
    gh = jwks_server.issuers["github"]
    with pytest.raises(AuthError) as info:
        auth.by_token(gh.mint(github_claims()))
    assert str(info.value) == (
        "claims match more than one identity (payments-deploy, payments-any); refused"
    )
    assert auth.by_token(gh.mint(github_claims(repository="acme/web"))).name == "payments-any"


def test_another_issuers_token_is_not_a_pipeline(pipes: tuple[Authenticator, JwksServer]) -> None:
    auth, server = pipes
    # The people IdP signs a token with GitHub's claims: it is a person named by sub,
    # with the people IdP's groups claim, never the pipeline identity.
    fake = server.issuers["corp"].mint(github_claims())
    ident = auth.by_token(fake)
    assert ident.name == "repo:acme/payments:environment:prod"
    assert ident.groups == () and ident.provider == "corp"
    # GitHub's issuer with the people IdP's key: bad signature / unknown key.
    corp = server.issuers["corp"]
    forged = corp.mint(
        {**github_claims(), "iss": GITHUB_ISSUER},
        kid=server.issuers["github"].kid,
        key=corp.keys[corp.kid],
    )
    refused(auth, forged, "bad signature")
    refused(auth, Issuer("https://evil.example").mint(github_claims()), "wrong issuer")
    refused(
        auth,
        server.issuers["github"].mint({**github_claims(), "aud": "someone-else"}),
        "wrong audience",
    )


def test_a_person_cannot_take_a_pipelines_name(pipes: tuple[Authenticator, JwksServer]) -> None:
    auth, server = pipes
    corp = server.issuers["corp"]
    for claims in (
        {"sub": "u-9", "preferred_username": "payments-deploy", "groups": ["agents"]},
        {"sub": "ledger-ci", "groups": ["agents"]},
    ):
        with pytest.raises(AuthError, match=r"an identity bound to provider (github|gitlab)"):
            auth.by_token(corp.mint(claims))
    # Positive control: the same person under their own name.
    assert auth.by_token(corp.mint({"sub": "u-9", "preferred_username": "dana"})).name == "dana"


def test_runs_are_told_apart(pipes: tuple[Authenticator, JwksServer]) -> None:
    auth, server = pipes
    gh = server.issuers["github"]
    first = auth.by_token(gh.mint(github_claims(run_id="100")))
    retry = auth.by_token(gh.mint(github_claims(run_id="100", run_attempt="2")))
    other = auth.by_token(gh.mint(github_claims(run_id="101")))
    assert [first.run_id, retry.run_id, other.run_id] == [
        "github:100:1",
        "github:100:2",
        "github:101:1",
    ]


def test_claims_with_a_card_number_are_masked(tmp_path: Path, jwks_server: JwksServer) -> None:
    masker = Masker(MaskPolicy())
    auth = Authenticator(pipelines_config(tmp_path, jwks_server), mask=masker.mask)
    gh = jwks_server.issuers["github"]
    ok = auth.by_token(gh.mint(github_claims(sha="4111111111111111", workflow="deploy")))
    assert "4111111111111111" not in json.dumps(ok.detail())
    with pytest.raises(AuthError) as info:
        auth.by_token(gh.mint(github_claims(ref="refs/heads/4111111111111111")))
    assert "4111111111111111" not in str(info.value)
    assert "411111******1111" in str(info.value)


def test_key_rotation_over_https_and_the_refetch_limit(
    tmp_path: Path, jwks_server: JwksServer
) -> None:
    auth = Authenticator(pipelines_config(tmp_path, jwks_server))
    gh = jwks_server.issuers["github"]
    assert auth.by_token(gh.mint(github_claims())).name == "payments-deploy"
    assert jwks_server.fetches["github"] == 1
    assert auth.by_token(gh.mint(github_claims())).name == "payments-deploy"
    assert jwks_server.fetches["github"] == 1  # cached
    gh.rotate(drop_old=True)
    # The new kid is unknown to the cache: fetched again at once, and accepted.
    assert auth.by_token(gh.mint(github_claims())).name == "payments-deploy"
    assert jwks_server.fetches["github"] == 2
    # More unknown kids right after: no fetch (at most one per jwks_refresh).
    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for i in range(5):
        refused(auth, gh.mint(github_claims(), kid=f"forged-{i}", key=rogue), "unknown signing key")
    assert jwks_server.fetches["github"] == 2


def test_refetch_limit_follows_the_clock(tmp_path: Path, jwks_server: JwksServer) -> None:
    cfg = pipelines_config(tmp_path, jwks_server)
    auth = Authenticator(cfg)
    gh = jwks_server.issuers["github"]
    prov = auth.provider("github")
    assert prov is not None and isinstance(prov.jwks, _JwksUrl)
    now = [1000.0]
    prov.jwks._clock = lambda: now[0]
    assert auth.by_token(gh.mint(github_claims())).name == "payments-deploy"
    gh.rotate()
    now[0] += 1
    assert auth.by_token(gh.mint(github_claims())).name == "payments-deploy"  # refetched
    gh.rotate()
    now[0] += 1
    refused(auth, gh.mint(github_claims()), "unknown signing key")  # within jwks_refresh
    now[0] += 10
    assert auth.by_token(gh.mint(github_claims())).name == "payments-deploy"
    assert jwks_server.fetches["github"] == 3


def test_jwks_redirect_and_wrong_ca_are_refused(tmp_path: Path, jwks_server: JwksServer) -> None:
    gh = Issuer(GITHUB_ISSUER)
    jwks_server.redirect_to = jwks_server.add("github", gh)
    base = f"""
[[oidc.providers]]
name = "github"
issuer = "{GITHUB_ISSUER}"
audience = "castgate"
jwks = "{jwks_server.base}/redirect/jwks"
jwks_ca_file = "{jwks_server.ca}"
"""
    refused(
        Authenticator(make_config(tmp_path, base)),
        gh.mint({"sub": "x"}),
        "signing keys unavailable",
    )
    no_ca = base.replace("/redirect/jwks", "/github/jwks").replace(
        f'jwks_ca_file = "{jwks_server.ca}"\n', ""
    )
    refused(
        Authenticator(make_config(tmp_path, no_ca)),
        gh.mint({"sub": "x"}),
        "signing keys unavailable",
    )
    good = base.replace("/redirect/jwks", "/github/jwks")
    assert Authenticator(make_config(tmp_path, good)).by_token(gh.mint({"sub": "x"})).name == "x"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            '[oidc]\nissuer = "a"\naudience = "b"\njwks = "file:j"\n[[oidc.providers]]\n'
            'name = "x"\nissuer = "a"\naudience = "b"\njwks = "file:j"\n',
            "not both",
        ),
        ('[oidc]\nissuer = "a"\n', "needs issuer, audience and jwks"),
        (
            '[[oidc.providers]]\nname = "x"\nissuer = "a"\naudience = "b"\njwks = "file:j"\n'
            '[[oidc.providers]]\nname = "x"\nissuer = "c"\naudience = "b"\njwks = "file:j"\n',
            "duplicate provider name",
        ),
        (
            '[[oidc.providers]]\nname = "x"\nissuer = "a"\naudience = "b"\njwks = "file:j"\n'
            '[[oidc.providers]]\nname = "y"\nissuer = "a"\naudience = "b"\njwks = "file:j"\n',
            "same issuer and audience",
        ),
        (
            '[[identities]]\nname = "p"\noidc = { provider = "github", bound_claims = '
            '{ repository = "a/b" } }\n',
            "no OIDC provider named 'github'",
        ),
        (
            '[oidc]\nissuer = "a"\naudience = "b"\njwks = "file:j"\n[[identities]]\nname = "p"\n'
            'oidc = { provider = "oidc", bound_claims = {} }\n',
            "bound_claims",
        ),
        (
            '[oidc]\nissuer = "a"\naudience = "b"\njwks = "file:j"\n[[identities]]\nname = "p"\n'
            'oidc = { provider = "oidc", bound_claims = { repository = "*", ref = "*" } }\n',
            "not only",
        ),
    ],
)
def test_provider_and_binding_config_errors(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(text)


def test_single_oidc_table_is_one_provider(auth: Authenticator, keys: Keys) -> None:
    ident = auth.by_token(sign(keys))
    assert ident.provider == "oidc" and ident.run_id is None
    prov = auth.provider("oidc")
    assert prov is not None and prov.cfg.issuer == ISSUER


def test_the_pipelines_config_snippet_loads() -> None:
    snippet = Path(__file__).resolve().parents[2] / "assets" / "ci" / "castgate.pipelines.toml"
    cfg = parse_config(snippet.read_text(encoding="utf-8"), snippet)
    auth = Authenticator(cfg)  # https JWKS: nothing is fetched before the first token
    assert [p.name for p in cfg.oidc.all_providers()] == ["corp", "github", "gitlab"]  # type: ignore[union-attr]
    github = auth.provider("github")
    assert github is not None
    assert [i.name for i in github.bound] == ["payments-deploy", "payments-release"]
