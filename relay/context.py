"""The composition root of one relay process: config, policy, identities, the store,
the masker and the signing key, and the services the listeners share (audit,
checkpoints, shipping, spool replay, tokens, roles, credentials), each a class of its
own that callers use directly."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from recorder.config import Config, mask_policy
from recorder.masking import Masker
from recorder.signing import SigningKey
from recorder.store import Store
from recorder.store.spool import StoreSpool
from relay.approvals import Broker
from relay.audit import AuditTrail, Background
from relay.cluster import Cluster, default_node_id, peer_token
from relay.connlimit import ConnectionLimits, fd_budget
from relay.credentials import Credentials
from relay.identity import Authenticator
from relay.live import LiveHub
from relay.policy import Policy
from relay.ratelimit import AuthLimiter
from relay.shipping import Shipping
from relay.store_tasks import Checkpoints, SpoolReplay
from relay.tokens import Roles, Tokens

if TYPE_CHECKING:
    from relay.session_core import SessionCore

log = logging.getLogger("castgate.relay")


def new_session_id() -> str:
    """Time-sortable, unguessable session id."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


# More than ~20 fields: this is the composition root, and each field is one service
# (or one of the process's own values) that callers use directly; none of the work is
# done here.
@dataclass
class RelayContext:
    """Shared state of one relay process."""

    cfg: Config
    store: Store
    signing_key: SigningKey
    spool_dir: InitVar[Path | None] = None
    """Where store writes are spooled during an outage (default data_dir/spool)."""
    api_url: str | None = None
    node: str = ""
    peer_token: str | None = field(default=None, repr=False)
    cluster: Cluster | None = None
    hub: LiveHub = field(default_factory=LiveHub)
    live: dict[str, SessionCore] = field(default_factory=dict)
    """Open sessions (their SessionCore) by id."""
    policy: Policy = field(init=False)
    masker: Masker = field(init=False)
    auth: Authenticator = field(init=False)
    broker: Broker = field(init=False)
    limiter: AuthLimiter = field(init=False)
    connections: ConnectionLimits = field(init=False)
    """Open connections by source and in total, every listener of this process."""
    spool: StoreSpool = field(init=False)
    background: Background = field(init=False)
    audit: AuditTrail = field(init=False)
    checkpoints: Checkpoints = field(init=False)
    shipping: Shipping = field(init=False)
    spool_replay: SpoolReplay = field(init=False)
    tokens: Tokens = field(init=False)
    roles: Roles = field(init=False)
    credentials: Credentials = field(init=False)

    def __post_init__(self, spool_dir: Path | None) -> None:
        cfg = self.cfg
        self.policy = Policy(cfg)
        self.masker = Masker(mask_policy(cfg))
        self.auth = Authenticator(cfg, mask=self.masker.mask)
        sec = cfg.security
        self.limiter = AuthLimiter(sec.auth_failure_limit, sec.auth_window, sec.auth_lockout)
        lim = cfg.limits
        self.connections = ConnectionLimits(
            min(lim.connections, fd_budget(lim.fd_reserve)),
            lim.connections_per_source,
            report=self._report_refusals,
            report_interval=lim.report_interval,
        )
        self.node = self.node or default_node_id(cfg)
        if self.peer_token is None:
            self.peer_token = peer_token(cfg)
        # Every store write of the relay goes through the spool (see recorder/store/spool.py).
        self.spool = StoreSpool(self.store, spool_dir or cfg.data_path / "spool")
        self.broker = Broker(cfg, self.store, self.masker)
        self.broker.spool = self.spool
        self.background = Background()
        self.audit = AuditTrail(self.spool, self.background)
        self.checkpoints = Checkpoints(self.spool)
        self.shipping = Shipping(cfg, self.spool, self.checkpoints, self.audit)
        self.shipping.node = self.node
        self.spool_replay = SpoolReplay(self.spool)
        self.tokens = Tokens(self.store, self.auth)
        self.roles = Roles(cfg)
        self.credentials = Credentials(cfg)

    def _report_refusals(self, refused: dict[str, int]) -> None:
        # One log line and one audit event for a batch of refusals, never one each.
        log.warning("relay.connections_refused", extra={"refused": refused})
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # outside the relay's loop (tests): the log line has it
            return
        self.audit.emit("connection.refused", None, "failure", None, "relay", {"refused": refused})

    @property
    def hold_deadline(self) -> float:
        """Seconds output that could still become a match may be held."""
        return self.cfg.masking.hold_deadline_ms / 1000
