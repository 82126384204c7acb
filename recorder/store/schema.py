"""Tables of the audit store, as SQLAlchemy Core metadata.

This module is the model the code queries against; ``migrations/versions`` holds the
DDL history that builds it. The two are kept equal by a test that runs alembic's
autogenerate comparison against a freshly migrated database.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = [
    "APPROVAL_STATUSES",
    "UTCDateTime",
    "approval_decisions",
    "approvals",
    "checkpoints",
    "commands",
    "events",
    "manifests",
    "metadata",
    "nodes",
    "sessions",
]

APPROVAL_STATUSES = ("pending", "approved", "denied", "expired", "interrupted")

# Explicit constraint names let later migrations drop or alter constraints by name, which
# SQLite's batch mode needs and which otherwise differ between backends.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that goes in as aware UTC and always comes back as aware UTC.

    SQLite has no time zone type and hands back naive values, PostgreSQL hands back the
    session time zone; callers of the store see UTC either way. Naive input is refused:
    in an audit trail a time of unknown zone is a wrong time.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC; refuse a naive one."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to SQLite's naive values and convert PostgreSQL's to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# SQLite only makes a column an auto-incrementing rowid alias when it is exactly INTEGER.
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _json() -> sa.JSON:
    # Python None becomes SQL NULL rather than the JSON text 'null'.
    return sa.JSON(none_as_null=True)


# PCI DSS 10.2.2: user (actor), type (kind), date and time (at), success or failure
# (outcome), origination (origin), affected resource (resource). No foreign key to
# sessions: an event must be recordable even when no session row exists, e.g. a failed
# login or a session whose creation itself failed.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("kind", sa.String(), nullable=False),
    sa.Column("actor", sa.String(), nullable=True),
    sa.Column("outcome", sa.String(), nullable=False),
    sa.Column("origin", sa.String(), nullable=True),
    sa.Column("resource", sa.String(), nullable=True),
    sa.Column("detail", _json(), nullable=True),
    sa.Column("session_id", sa.String(), nullable=True),
)
sa.Index(None, events.c.at)
sa.Index(None, events.c.kind, events.c.at)
sa.Index(None, events.c.session_id, events.c.at)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("identity", sa.String(), nullable=False),
    sa.Column("target", sa.String(), nullable=False),
    sa.Column("protocol", sa.String(), nullable=False),
    sa.Column("groups", _json(), nullable=False),
    sa.Column("auth_method", sa.String(), nullable=True),
    sa.Column("source", sa.String(), nullable=True),
    sa.Column("node", sa.String(), nullable=True),
    sa.Column("cast_path", sa.String(), nullable=True),
    sa.Column("title", sa.String(), nullable=True),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("ended_at", UTCDateTime(), nullable=True),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("exit_status", sa.Integer(), nullable=True),
    sa.Column("lines", sa.BigInteger(), nullable=True),
    sa.Column("final_hash", sa.String(), nullable=True),
    sa.Column("masking_counts", _json(), nullable=True),
    # The OIDC identity's provider, subject and run/initiator claims (Identity.detail),
    # and the pipeline run the session belongs to (PROVIDER:RUN[:ATTEMPT]).
    sa.Column("attributes", _json(), nullable=True),
    sa.Column("run_id", sa.String(), nullable=True),
)
sa.Index(None, sessions.c.started_at)
sa.Index(None, sessions.c.run_id, sessions.c.started_at)
sa.Index(None, sessions.c.identity, sessions.c.started_at)
sa.Index(None, sessions.c.target, sessions.c.started_at)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.String(), sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("identity", sa.String(), nullable=False),
    sa.Column("target", sa.String(), nullable=False),
    sa.Column("command", sa.Text(), nullable=False),
    sa.Column("rule", sa.String(), nullable=False),
    sa.Column("min_approvals", sa.Integer(), nullable=False),
    sa.Column("approver_groups", _json(), nullable=False),
    sa.Column("requested_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("resolved_at", UTCDateTime(), nullable=True),
    sa.Column("reason", sa.Text(), nullable=True),
)
sa.Index(None, approvals.c.status)
sa.Index(None, approvals.c.session_id)

approval_decisions = sa.Table(
    "approval_decisions",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("approval_id", _BigId, sa.ForeignKey("approvals.id"), nullable=False),
    sa.Column("approver", sa.String(), nullable=False),
    sa.Column("decision", sa.String(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    # The last line of defence for "one decision per approver", should a caller bypass
    # the check in Store.add_decision.
    sa.UniqueConstraint("approval_id", "approver"),
)

commands = sa.Table(
    "commands",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.String(), sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("text", sa.Text(), nullable=False),
    sa.Column("kind", sa.String(), nullable=False),
    sa.Column("action", sa.String(), nullable=False),
    sa.Column("rule", sa.String(), nullable=True),
    sa.Column("approval_id", _BigId, sa.ForeignKey("approvals.id"), nullable=True),
    sa.Column("status", sa.String(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("exit_status", sa.Integer(), nullable=True),
    sa.Column("rows", sa.BigInteger(), nullable=True),
    sa.Column("duration_ms", sa.Float(), nullable=True),
    sa.Column("bytes_in", sa.BigInteger(), nullable=True),
    sa.Column("bytes_out", sa.BigInteger(), nullable=True),
)
sa.Index(None, commands.c.session_id, commands.c.id)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.String(), sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("lines", sa.BigInteger(), nullable=False),
    sa.Column("chain_hash", sa.String(), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
)
sa.Index(None, checkpoints.c.session_id, checkpoints.c.lines)

manifests = sa.Table(
    "manifests",
    metadata,
    sa.Column("session_id", sa.String(), sa.ForeignKey("sessions.id"), primary_key=True),
    # Canonical JSON text (sorted keys) rather than a JSON column: the same manifest has
    # the same stored bytes on either backend.
    sa.Column("manifest", sa.Text(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

# One row per relay that ever joined the deployment (relays sharing this store). A relay
# keeps ``heartbeat_at`` fresh while it runs and sets ``stopped_at`` when it stops; one
# whose heartbeat is older than the node timeout is lost, and another relay sets its
# ``stopped_at`` when it interrupts the lost relay's sessions.
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("api_url", sa.String(), nullable=True),
    sa.Column("version", sa.String(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    sa.Column("stopped_at", UTCDateTime(), nullable=True),
)

# A short castgate token handed out for a verified OIDC token (``POST
# /api/v1/token/exchange``): only its SHA-256 is kept, with the identity it stands for,
# until the OIDC token's expiry. OpenSSH cannot send a password longer than 1023 bytes,
# and CI id-tokens are longer.
token_exchanges = sa.Table(
    "token_exchanges",
    metadata,
    sa.Column("digest", sa.String(), primary_key=True),
    sa.Column("identity", _json(), nullable=False),
    sa.Column("issued_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
)
sa.Index(None, token_exchanges.c.expires_at)
