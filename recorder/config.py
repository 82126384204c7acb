"""The castgate configuration file (``castgate.toml``).

One TOML file configures the relay, the recorder and the client commands; its shape is
the contract in DESIGN.md. Unknown keys are errors: in a security gateway a misspelt
``groups`` must not silently open a target to nobody or everybody.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from recorder.errors import CastgateError
from recorder.masking import CustomPattern, MaskPolicy, PatternError, compile_check

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, None: 1}


def parse_size(value: str | int) -> int:
    """Turn ``"64KiB"``, ``"1MiB"`` or a number of bytes into bytes."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a size: {value!r} (use e.g. 65536, '64KiB', '1MiB')")
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 65536, '64KiB', '1MiB')")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


class ConfigError(CastgateError):
    """A configuration problem, phrased as one line that names the file and the key."""


def parse_duration(value: str | float | int) -> float:
    """Turn ``"10m"``, ``"30s"``, ``"250ms"`` or a number of seconds into seconds."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. '30s', '10m', '1h')")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class ListenConfig(_Section):
    ssh: str | None = "127.0.0.1:2222"
    """host:port of the SSH listener (agents, Git, operators); empty to disable."""
    postgres: str | None = "127.0.0.1:6432"
    """host:port of the PostgreSQL wire listener; empty to disable."""
    api: str | None = "127.0.0.1:8420"
    """host:port of the HTTP control API; empty to disable."""
    workers: int = Field(default=1, ge=1, le=64)
    """Relay processes sharing these listeners (SO_REUSEPORT), one event loop and one
    core each; above one they work as nodes of one deployment (see ``[cluster]``)."""
    postgres_tls_cert: str | None = None
    """PEM certificate for the PostgreSQL listener (default: generated in keys/)."""
    postgres_tls_key: str | None = None
    """PEM private key for ``postgres_tls_cert``."""
    postgres_require_tls: bool | None = None
    """Refuse passwords (tokens) sent without TLS; default: required unless the
    PostgreSQL listener is on a loopback address."""
    kubernetes: str | None = None
    """host:port of the Kubernetes API listener (always TLS); unset: no listener."""
    kubernetes_tls_cert: str | None = None
    """PEM certificate for the Kubernetes listener (default: generated in keys/); its
    SANs must name the address kubeconfigs use."""
    kubernetes_tls_key: str | None = None
    """PEM private key for ``kubernetes_tls_cert``."""

    @model_validator(mode="after")
    def _kubernetes_tls_pair(self) -> ListenConfig:
        if (self.kubernetes_tls_cert is None) != (self.kubernetes_tls_key is None):
            raise ValueError("kubernetes_tls_cert and kubernetes_tls_key go together")
        return self


class SecurityConfig(_Section):
    auth_failure_limit: int = Field(default=10, ge=1, le=100_000)
    """Failed authentications from one address within ``auth_window`` that lock it out."""
    auth_window: float = Field(default=60.0, gt=0)
    """Seconds over which failures are counted."""
    auth_lockout: float = Field(default=60.0, ge=0)
    """Seconds an address is refused after too many failures."""

    @field_validator("auth_window", "auth_lockout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class LimitsConfig(_Section):
    connections: int = Field(default=4096, ge=1, le=1_000_000)
    """Connections all peers together may hold open (SSH, PostgreSQL and API together);
    lowered further to what the open-file limit leaves room for, less ``fd_reserve``."""
    connections_per_source: int = Field(default=1024, ge=1, le=1_000_000)
    """Connections one source address may hold open."""
    fd_reserve: int = Field(default=64, ge=8, le=100_000)
    """Open-file descriptors kept back for sessions already open (casts, the store)."""
    api_idle_timeout: float = Field(default=15.0, gt=0, le=3600)
    """Seconds an API connection may take to send a whole request (also the idle time
    allowed between two requests on one connection)."""
    report_interval: float = Field(default=10.0, gt=0, le=3600)
    """Refused connections, and failed accepts, are logged and audited at most once in
    this many seconds."""
    ssh_max_command: int = Field(default=131_071, ge=256, le=262_144)
    """Bytes of one SSH exec command (UTF-8). The default is the longest a Linux target
    runs at all: sshd hands the command to ``sh -c`` as one argument, and the kernel
    caps one argument at 128 KiB with its NUL (MAX_ARG_STRLEN)."""
    ssh_max_env_vars: int = Field(default=128, ge=0, le=10_000)
    """Environment variables (``env`` requests, ``SendEnv``/``SetEnv``) one SSH channel
    may send; OpenSSH's sshd takes no more than 128 either."""
    ssh_max_env_bytes: int = Field(default=65_536, ge=0, le=16 << 20)
    """Bytes of names and values of all environment variables of one SSH channel."""
    ssh_max_subsystem: int = Field(default=256, ge=4, le=65_536)
    """Bytes of an SSH subsystem name (``sftp`` is four)."""
    pg_max_startup: int = Field(default=10_000, ge=256, le=10_000)
    """Bytes of a PostgreSQL startup packet; PostgreSQL itself refuses longer ones
    (MAX_STARTUP_PACKET_LENGTH)."""
    pg_max_message: int = Field(default=(1 << 30) - 1, ge=65_536, le=(1 << 30) - 1)
    """Bytes of one PostgreSQL client message (Query, Parse, Bind, CopyData,
    FunctionCall...), refused from its length field before it is buffered. The default
    is PostgreSQL's own limit (1 GiB less a byte): a Bind is as large as the values it
    carries (a bytea up to 1 GB), while COPY tools send small chunks (pg_restore 4 KiB,
    psql 8 KiB); lower it to bound what one connection may make the relay hold."""

    @field_validator("api_idle_timeout", "report_interval", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator(
        "ssh_max_command",
        "ssh_max_env_bytes",
        "ssh_max_subsystem",
        "pg_max_startup",
        "pg_max_message",
        mode="before",
    )
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)


class StoreConfig(_Section):
    url: str = "sqlite:///data/castgate.db"
    """Audit store: ``sqlite:///PATH`` (relative to the config file) or ``postgresql://...``."""


class RecordingConfig(_Section):
    fsync_interval: float = Field(default=1.0, gt=0)
    """Seconds between fsyncs of open casts; a crash loses at most the events after it."""
    on_failure: Literal["terminate", "continue"] = "terminate"
    """What a session does when its recording cannot be written: fail closed or go on."""
    input: Literal["none", "commands", "all"] = "commands"
    """Which input is kept: none, the submitted command lines, or every keystroke."""
    index_max_mb: float = Field(default=64.0, ge=0)
    """Casts up to this size get their seek index built when the session closes (in a
    background thread); larger ones are indexed on demand by ``play`` and ``export``."""
    max_result_rows: int = Field(default=100, ge=0, le=100_000)
    """Rows of each SQL result drawn in a PostgreSQL session's transcript (the row
    count and the query log are always complete)."""
    max_statement_bytes: int = Field(default=1 << 20, ge=1024)
    """SQL statements longer than this (UTF-8 bytes) are forwarded whole but kept in the
    transcript and the query log as a masked prefix of this size, with the statement's
    length and the SHA-256 of its masked text."""


class ClusterConfig(_Section):
    node: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    """Unique id of this relay among those sharing one store; default: the host name and
    a short hash of the data directory (stable across restarts, distinct for two relays
    on one machine)."""
    advertise_api: str | None = Field(default=None, pattern=r"^https?://[^/\s]+/?$")
    """Base URL other relays reach this relay's control API at (watch proxying);
    default: the API listener's own address."""
    heartbeat: float = Field(default=5.0, gt=0, le=3600)
    """Seconds between this relay's heartbeats in the store (and its scans for lost
    relays)."""
    node_timeout: float = Field(default=20.0, gt=0, le=86400)
    """A relay whose last heartbeat is older than this is lost: another relay marks its
    live sessions and pending approvals interrupted."""
    peer_token_env: str | None = Field(default=None, min_length=1)
    """Environment variable holding the secret relays present to each other to proxy a
    live watch; unset: a relay neither proxies nor accepts relay-to-relay watches."""
    trusted_keys: list[str] = []
    """Public signing keys of the other relays of the deployment (their
    ``keys/signing_ed25519.pub.pem``, paths relative to this file): ``castgate verify``
    with this config accepts casts signed by any of them as well as by this relay."""

    @field_validator("heartbeat", "node_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _timeout_spans_heartbeats(self) -> ClusterConfig:
        # One late heartbeat must not get a healthy relay's sessions interrupted.
        if self.node_timeout < 2 * self.heartbeat:
            raise ValueError("node_timeout must be at least twice the heartbeat")
        return self


class S3Config(_Section):
    bucket: str = Field(min_length=3, max_length=63)
    """Bucket that receives sealed casts, their chain, index and manifest."""
    prefix: str = "recordings/"
    """Key prefix; an object's key is the prefix followed by the file name."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph RGW, moto); default: AWS for ``region``."""
    region: str | None = None
    """Region of the bucket (default: boto3's own lookup, then ``us-east-1``)."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path`` for servers without per-bucket host names (many MinIO setups)."""
    access_key_id_env: str | None = None
    """Name of the environment variable holding the access key id; credentials are
    never in this file (default: boto3's chain: AWS_* variables, profile, instance role)."""
    secret_access_key_env: str | None = None
    """Name of the environment variable holding the secret access key."""
    session_token_env: str | None = None
    """Name of the environment variable holding a session token, if any."""
    object_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = None
    """Object Lock mode sent with every upload (the bucket must have Object Lock on)."""
    retention_days: int | None = Field(default=None, ge=1, le=36_500)
    """Days each object is locked from its upload (PCI DSS 10.5.1: 365 or more)."""
    keep_local: bool = True
    """Keep local copies; false deletes them once every file of the session is
    confirmed in the bucket (size and SHA-256 checked with a HEAD)."""
    cache_max_mb: float = Field(default=2048.0, ge=0)
    """Size of ``data/cache/s3``, where casts read back from the bucket are kept; past
    it the least recently used ones are removed (they are fetched again when needed)."""
    retry_initial: float = Field(default=2.0, gt=0)
    """Seconds before the first retry of a failed upload; doubles up to ``retry_max``."""
    retry_max: float = Field(default=300.0, gt=0)
    """Longest wait between retries of a failed upload."""

    @field_validator("retry_initial", "retry_max", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _lock_complete(self) -> S3Config:
        if (self.object_lock_mode is None) != (self.retention_days is None):
            raise ValueError("object_lock_mode and retention_days go together")
        if (self.access_key_id_env is None) != (self.secret_access_key_env is None):
            raise ValueError("access_key_id_env and secret_access_key_env go together")
        return self


class PatternConfig(_Section):
    name: str = Field(min_length=1)
    """Name used in masking counts and markers."""
    regex: str = Field(min_length=1)
    """RE2 syntax regular expression; every match is replaced by ``*`` of the same width."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            compile_check(v)
        except PatternError as exc:
            raise ValueError(str(exc)) from None
        return v


class MaskingConfig(_Section):
    detectors: list[Literal["pan", "track"]] = ["pan", "track"]
    """Built-in detectors: ``pan`` (Luhn-valid 13-19 digits), ``track`` (track 1/2 data)."""
    style: Literal["bin6-last4", "full"] = "bin6-last4"
    """``bin6-last4`` keeps the first six and last four digits of a PAN; ``full`` none."""
    patterns: list[PatternConfig] = []
    """Custom secrets to mask, such as API keys."""
    hold_deadline_ms: float = Field(default=20.0, ge=0, le=1000)
    """How long output that could still become a match may be held back, in ms."""


class OidcProviderConfig(_Section):
    name: str = Field(default="oidc", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Provider name, named by identities' ``oidc.provider`` and kept with each session."""
    issuer: str
    """Expected ``iss`` claim of tokens; a token is verified by the provider of its issuer."""
    audience: str
    """Expected ``aud`` claim of tokens."""
    jwks: str
    """``file:PATH`` (relative to the config file) or an https URL of the issuer's JWKS."""
    jwks_ca_file: str | None = None
    """CA bundle (PEM) trusted for an https ``jwks`` instead of the system's (a private IdP)."""
    jwks_refresh: Annotated[float, Field(ge=1)] = 10.0
    """An https JWKS is fetched again on an unknown ``kid`` at most once per this many
    seconds (``"10s"``): key rotation reaches the relay at once, a flood of forged kids
    does not reach the IdP."""
    groups_claim: str = "groups"
    """Claim holding the list of groups (tokens that match no bound identity; a bound
    identity's groups are its own)."""
    algorithms: list[str] = ["RS256", "ES256", "EdDSA"]
    """Accepted signing algorithms; ``none`` and HMAC algorithms are never accepted."""
    leeway: float = Field(default=30.0, ge=0, le=300)
    """Clock skew allowed on ``exp`` and ``nbf``, in seconds."""

    @field_validator("jwks_refresh", mode="before")
    @classmethod
    def _refresh(cls, v: Any) -> float:
        return parse_duration(v)


class OidcConfig(_Section):
    """``[oidc]``: one provider written as the table itself (the form before several
    providers), or a list of ``[[oidc.providers]]``; not both."""

    providers: list[OidcProviderConfig] = []
    """The OIDC issuers tokens may come from (a people IdP, CI issuers)."""
    issuer: str | None = None
    """Single-provider form: expected ``iss`` (the provider is named ``oidc``)."""
    audience: str | None = None
    """Single-provider form: expected ``aud``."""
    jwks: str | None = None
    """Single-provider form: ``file:PATH`` or an https URL."""
    jwks_ca_file: str | None = None
    """Single-provider form: CA bundle for an https ``jwks``."""
    jwks_refresh: Annotated[float, Field(ge=1)] = 10.0
    """Single-provider form: fewest seconds between refetches on an unknown ``kid``."""
    groups_claim: str = "groups"
    """Single-provider form: claim holding the list of groups."""
    algorithms: list[str] = ["RS256", "ES256", "EdDSA"]
    """Single-provider form: accepted signing algorithms."""
    leeway: float = Field(default=30.0, ge=0, le=300)
    """Single-provider form: clock skew allowed on ``exp`` and ``nbf``, in seconds."""

    @field_validator("jwks_refresh", mode="before")
    @classmethod
    def _refresh(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _one_form(self) -> OidcConfig:
        single = (self.issuer, self.audience, self.jwks)
        if self.providers:
            if any(v is not None for v in single):
                raise ValueError(
                    "use either issuer/audience/jwks in [oidc] or [[oidc.providers]], not both"
                )
        elif any(v is None for v in single):
            raise ValueError("needs issuer, audience and jwks (or [[oidc.providers]])")
        names = [p.name for p in self.all_providers()]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate provider name in {names}")
        issuers = [(p.issuer, p.audience) for p in self.all_providers()]
        if len(set(issuers)) != len(issuers):
            # Two providers for one issuer and audience: which one verified a token, and
            # so which identities it may stand for, would depend on the order.
            raise ValueError("two providers with the same issuer and audience")
        return self

    def all_providers(self) -> list[OidcProviderConfig]:
        """The providers, the single-table form as one named ``oidc``."""
        if self.providers:
            return list(self.providers)
        assert self.issuer is not None and self.audience is not None and self.jwks is not None
        return [
            OidcProviderConfig(
                name="oidc",
                issuer=self.issuer,
                audience=self.audience,
                jwks=self.jwks,
                jwks_ca_file=self.jwks_ca_file,
                jwks_refresh=self.jwks_refresh,
                groups_claim=self.groups_claim,
                algorithms=self.algorithms,
                leeway=self.leeway,
            )
        ]


# A bound claim is matched as a glob; a pattern made only of these matches nearly
# anything, which on a shared CI issuer (every GitHub repository's tokens come from the
# same issuer) would let any repository in.
_GLOB_ONLY = re.compile(r"^[*?]*$")


class OidcBindingConfig(_Section):
    provider: str = Field(min_length=1)
    """Name of the ``[[oidc.providers]]`` entry whose tokens may stand for this identity."""
    bound_claims: dict[str, str | list[str]] = Field(min_length=1)
    """Claim name -> value (exact, or a glob with ``*``/``?``/``[...]``), or a list of
    values any of which may match; every claim listed must match."""

    @field_validator("bound_claims")
    @classmethod
    def _specific(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for claim, want in v.items():
            values = [want] if isinstance(want, str) else want
            if not values or any(not isinstance(x, str) or not x for x in values):
                raise ValueError(f"{claim}: give a non-empty value or list of values")
        if all(
            all(_GLOB_ONLY.match(x) for x in ([w] if isinstance(w, str) else w)) for w in v.values()
        ):
            raise ValueError(
                "at least one bound claim must name a value (not only '*'): the issuer "
                "signs tokens for everyone who uses it"
            )
        return v


class IdentityConfig(_Section):
    name: str = Field(min_length=1)
    """Unique identity name: the PostgreSQL user name and the name in audit records."""
    groups: list[str] = []
    """Groups that grant targets and roles."""
    ssh_keys: list[str] = []
    """OpenSSH public keys (``ssh-ed25519 AAAA... comment``) that authenticate this identity."""
    token_sha256: str | None = None
    """Hex SHA-256 of a static token; the token itself is never stored."""
    oidc: OidcBindingConfig | None = None
    """Tokens of a provider whose claims match ``bound_claims`` stand for this identity
    (a pipeline); its groups are this identity's, never the token's."""

    @field_validator("token_sha256")
    @classmethod
    def _hex64(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be 64 hex digits (sha256 of the token)")
        return v.lower() if v else v


class TargetConfig(_Section):
    name: str = Field(min_length=1)
    """Target name: the SSH user name or the PostgreSQL database name agents connect with."""
    kind: Literal["ssh", "postgres", "kubernetes"]
    """Protocol of the target."""
    address: str
    """host:port of the target (``https://host:port`` for Kubernetes)."""
    user: str | None = None
    """Account the relay logs in as on the target."""
    key_file: str | None = None
    """Private key for the SSH target (relative to the config file)."""
    password_env: str | None = None
    """Environment variable holding the target's password."""
    host_key: str | None = None
    """Pinned SSH host key of the target; a mismatch refuses the connection."""
    database: str | None = None
    """Database name on a PostgreSQL target."""
    groups: list[str] = []
    """Identities in any of these groups may use the target; none means nobody."""
    mask_columns: list[str] = []
    """``table.column`` names masked whatever their content (PostgreSQL)."""
    tls: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    """TLS from the relay to a PostgreSQL target."""
    allow_sftp: bool = False
    """Let agents use the sftp/scp subsystem (recorded as metadata, not content)."""
    allow_scp: bool = False
    """Let agents use the legacy scp protocol (exact ``scp -t``/``scp -f`` exec commands,
    recorded as metadata like sftp). Off: such a command is refused."""
    default: Literal["allow", "approve", "block"] = "allow"
    """What a command or statement no rule matches gets. ``block`` is allowlist mode:
    only what an ``allow`` rule matches runs."""
    opaque: Literal["allow", "approve", "block"] | None = None
    """What a command the relay cannot parse or follow gets (a parse error, ``eval``, a
    variable in command position, a line the echo model lost track of). Unset:
    ``approve`` where any rule applies to the target or ``default`` is not ``allow``,
    else ``allow`` (nothing is enforced there)."""
    shell_without_pty: Literal["check", "refuse"] = "check"
    """SSH shells without a PTY (and exec'd interpreters): check each stdin line before it
    reaches the target, or refuse the channel."""
    interpreters: Literal["check", "refuse"] = "check"
    """SSH exec commands that start an interactive interpreter (``bash -i``, ``python3``,
    ``script``): line-checked like a shell, or refused."""
    unparsed: Literal["block", "approve"] = "block"
    """PostgreSQL: a statement the parser rejects, on a target where rules apply: refused
    (SQLSTATE 42501) or held for approval."""
    allow_function_call: bool = False
    """PostgreSQL: let the FunctionCall protocol message through (policed as a call of
    that function, logged, recorded, result masked). Off: refused with an error."""
    ca_file: str | None = None
    """Kubernetes: PEM CA bundle the API server's certificate is verified against
    (default: the system's)."""
    token_env: str | None = None
    """Kubernetes: environment variable holding the relay's bearer token for the
    cluster; it never reaches the agent."""
    client_cert: str | None = None
    """Kubernetes: PEM client certificate the relay authenticates with (instead of
    ``token_env``)."""
    client_key: str | None = None
    """Kubernetes: PEM private key of ``client_cert``."""
    secrets: Literal["redact", "mask"] = "redact"
    """Kubernetes: what the agent sees of Secret ``data``/``stringData`` values:
    ``redact`` replaces each with a marker; ``mask`` keeps them with card numbers and
    custom patterns masked (a value that is not text is redacted)."""
    allow_port_forward: bool = False
    """Kubernetes: let ``kubectl port-forward`` through (a raw TCP tunnel the relay
    cannot inspect). Off: refused."""
    allow_proxy: bool = False
    """Kubernetes: let the API server's ``proxy`` subresource through (HTTP to pods,
    services and nodes, uninspected). Off: refused."""

    @model_validator(mode="after")
    def _kubernetes_fields(self) -> TargetConfig:
        k8s_only = {
            "ca_file": self.ca_file,
            "token_env": self.token_env,
            "client_cert": self.client_cert,
            "client_key": self.client_key,
        }
        if self.kind != "kubernetes":
            given = [k for k, v in k8s_only.items() if v is not None]
            if given:
                raise ValueError(f"{given[0]} is for kind = 'kubernetes' targets only")
            return self
        if not re.fullmatch(r"https://[^/\s?#]+/?", self.address):
            raise ValueError(
                "a kubernetes address is the API server's https URL (https://host:port)"
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if (self.token_env is None) == (self.client_cert is None):
            raise ValueError(
                "a kubernetes target needs exactly one credential: token_env, or "
                "client_cert with client_key"
            )
        return self


K8S_VERBS = frozenset(
    {
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
        "exec",
        "attach",
        "portforward",
        "proxy",
        "log",
    }
)
"""Verbs a Kubernetes request is classified as (RBAC's, with exec, attach, portforward,
proxy and log standing for those subresources)."""

K8S_PATTERN = re.compile(
    r"(?P<verbs>[a-z*?,]+)"
    r":(?P<resources>[a-z0-9*?,.-]+)"
    r"(?:/(?P<subresource>[a-z*?,-]+))?"
    r"(?:@(?P<namespaces>[a-z0-9*?,-]+))?"
    r"(?:#(?P<names>[A-Za-z0-9*?,.:_-]+))?"
)
"""Shape of one ``k8s`` rule pattern (parsed by relay/k8s/rules.py)."""


def k8s_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid ``k8s`` rule pattern, or None when it is."""
    m = K8S_PATTERN.fullmatch(pattern)
    if m is None:
        return "expected verb:resource[.group][/subresource][@namespace][#name]"
    for item in m.group("resources").split(","):
        if item.startswith(".") or item.endswith("."):
            return f"malformed resource {item!r} (resource or resource.group)"
    for verb in m.group("verbs").split(","):
        if not verb:
            return "empty verb"
        if "*" not in verb and "?" not in verb and verb not in K8S_VERBS:
            return f"unknown verb {verb!r} (one of {', '.join(sorted(K8S_VERBS))})"
    for part in ("resources", "subresource", "namespaces", "names"):
        value = m.group(part)
        if value is not None and "" in value.split(","):
            return f"empty item in {part}"
    return None


class RuleConfig(_Section):
    name: str = Field(min_length=1)
    """Rule name, quoted in refusals, markers and audit records."""
    action: Literal["allow", "approve", "block"]
    """What happens to a matching command."""
    command: str | None = None
    """Regex searched in each simple command of SSH exec commands and shell lines (after
    parsing and unwrapping), and in SQL text."""
    argv: list[str] = []
    """SSH: a simple command whose program (basename) is ``argv[0]`` and whose arguments
    include every further element (option clusters normalised: ``-rf`` = ``-r -f``)."""
    sql: list[str] = []
    """pglast node names (``DropdbStmt``, ``DeleteStmt:no-where``) found anywhere in a statement."""
    k8s: list[str] = []
    """Kubernetes requests, each ``verb:resource[.group][/subresource][@namespace][#name]``
    with ``*`` globs and ``,`` alternatives (``delete:deployments@prod``,
    ``get,list,watch:pods,deployments.apps``, ``exec:*@payments``); see relay/k8s/rules.py. A rule with
    ``k8s`` applies to Kubernetes targets only."""
    targets: list[str] = []
    """Limit the rule to these targets (empty: all)."""
    groups: list[str] = []
    """Limit the rule to identities in these groups (empty: all)."""
    approvers: list[str] = []
    """Groups whose members (with the approver role) may decide this rule's requests."""
    min_approvals: int = Field(default=1, ge=1, le=10)
    """Distinct approvers needed."""
    timeout: Annotated[float, Field(ge=1)] = 600.0
    """How long a request waits before it is denied (``"10m"``)."""
    webhook: str | None = None
    """URL that receives each approval request of this rule as a JSON POST."""

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("k8s")
    @classmethod
    def _k8s_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            problem = k8s_pattern_problem(pattern)
            if problem is not None:
                raise ValueError(f"k8s pattern {pattern!r}: {problem}")
        return v

    @model_validator(mode="after")
    def _k8s_alone(self) -> RuleConfig:
        # A rule is about Kubernetes requests or about commands and statements: mixed,
        # whether the k8s patterns or the command must match would be a guess.
        if self.k8s and (self.command is not None or self.argv or self.sql):
            raise ValueError("k8s patterns do not combine with command, argv or sql in one rule")
        return self

    @field_validator("command")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from None
        return v


class Config(_Section):
    """The whole configuration file."""

    data_dir: str = "data"
    """Directory of recordings/, keys/ and the SQLite store (relative to the config file)."""
    listen: ListenConfig = ListenConfig()
    store: StoreConfig = StoreConfig()
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()
    recording: RecordingConfig = RecordingConfig()
    masking: MaskingConfig = MaskingConfig()
    cluster: ClusterConfig = ClusterConfig()
    s3: S3Config | None = None
    """Ship sealed recordings to S3-compatible object storage (off when absent)."""
    roles: dict[Literal["approver", "auditor", "admin"], list[str]] = {}
    """API and operator roles, each a list of groups."""
    oidc: OidcConfig | None = None
    identities: list[IdentityConfig] = []
    targets: list[TargetConfig] = []
    rules: list[RuleConfig] = []
    base_dir: Path = Path()
    """Directory the relative paths are resolved against (set by the loader, not the file)."""

    def resolve(self, path: str | Path) -> Path:
        """Resolve a path from the file relative to the config file's directory."""
        p = Path(path)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def data_path(self) -> Path:
        """Absolute data directory."""
        return self.resolve(self.data_dir)

    @property
    def recordings_dir(self) -> Path:
        """Where casts and their sidecars are written."""
        return self.data_path / "recordings"

    @property
    def keys_dir(self) -> Path:
        """Where the relay's signing and host keys live."""
        return self.data_path / "keys"

    def store_url(self) -> str:
        """The store URL with a relative SQLite path resolved against the config file."""
        url = self.store.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/"):
            return prefix + str(self.resolve(url[len(prefix) :]))
        return url


def _format_location(loc: tuple[int | str, ...], raw: dict[str, Any]) -> str:
    parts: list[str] = []
    node: Any = raw
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
                if isinstance(name, str):
                    label = f"[{item}] ({name})"
            parts.append(label)
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(("." if parts else "") + item)
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def parse_config(text: str, path: Path | None = None) -> Config:
    """Parse and validate config text; errors are ConfigError naming the file and key."""
    where = str(path) if path else "<config>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    raw.pop("base_dir", None)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        key = _format_location(tuple(first["loc"]), raw)
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{where}: {key}: {msg}{more}") from None
    _check_unique(cfg, where)
    base = path.resolve().parent if path else Path.cwd()
    return cfg.model_copy(update={"base_dir": base})


def _check_unique(cfg: Config, where: str) -> None:
    for kind, items in (("identities", cfg.identities), ("targets", cfg.targets)):
        seen: set[str] = set()
        for item in items:
            if item.name in seen:
                raise ConfigError(f"{where}: {kind}: duplicate name {item.name!r}")
            seen.add(item.name)
    if any(t.name == "castgate" for t in cfg.targets):
        raise ConfigError(f"{where}: targets: 'castgate' is reserved for operators")
    providers = {p.name for p in cfg.oidc.all_providers()} if cfg.oidc else set()
    for ident in cfg.identities:
        if ident.oidc is not None and ident.oidc.provider not in providers:
            raise ConfigError(
                f"{where}: identities ({ident.name}).oidc.provider: no OIDC provider named "
                f"{ident.oidc.provider!r} (have: {', '.join(sorted(providers)) or 'none'})"
            )


def load_config(path: str | Path) -> Config:
    """Read and validate a config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: no such config file (create one with 'castgate init DIR')"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config: {exc}") from None
    return parse_config(text, p)


def mask_policy(cfg: Config) -> MaskPolicy:
    """The masking policy a config describes."""
    return MaskPolicy(
        detectors=tuple(cfg.masking.detectors),
        style=cfg.masking.style,
        patterns=tuple(CustomPattern(p.name, p.regex) for p in cfg.masking.patterns),
    )
