"""Initial audit store: events, sessions, approvals, commands, checkpoints, manifests.

Revision ID: 0001
Revises:
Create Date: 2025-11-27 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from recorder.store.schema: a revision must keep
# building the same tables after the model moves on.
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create every table of the audit store."""
    op.create_table(
        "events",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("origin", sa.String(), nullable=True),
        sa.Column("resource", sa.String(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("session_id", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_at", "events", ["at"])
    op.create_index("ix_events_kind_at", "events", ["kind", "at"])
    op.create_index("ix_events_session_id_at", "events", ["session_id", "at"])

    op.create_table(
        "sessions",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("identity", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("protocol", sa.String(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("auth_method", sa.String(), nullable=True),
        sa.Column("source", sa.String(), nullable=True),
        sa.Column("node", sa.String(), nullable=True),
        sa.Column("cast_path", sa.String(), nullable=True),
        sa.Column("title", sa.String(), nullable=True),
        sa.Column("started_at", _ts(), nullable=False),
        sa.Column("ended_at", _ts(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("exit_status", sa.Integer(), nullable=True),
        sa.Column("lines", sa.BigInteger(), nullable=True),
        sa.Column("final_hash", sa.String(), nullable=True),
        sa.Column("masking_counts", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    )
    op.create_index("ix_sessions_started_at", "sessions", ["started_at"])
    op.create_index("ix_sessions_identity_started_at", "sessions", ["identity", "started_at"])
    op.create_index("ix_sessions_target_started_at", "sessions", ["target", "started_at"])

    op.create_table(
        "approvals",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("identity", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("rule", sa.String(), nullable=False),
        sa.Column("min_approvals", sa.Integer(), nullable=False),
        sa.Column("approver_groups", sa.JSON(), nullable=False),
        sa.Column("requested_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("resolved_at", _ts(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_approvals"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_approvals_session_id_sessions"
        ),
    )
    op.create_index("ix_approvals_status", "approvals", ["status"])
    op.create_index("ix_approvals_session_id", "approvals", ["session_id"])

    op.create_table(
        "approval_decisions",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("approval_id", _BigId, nullable=False),
        sa.Column("approver", sa.String(), nullable=False),
        sa.Column("decision", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_approval_decisions"),
        sa.ForeignKeyConstraint(
            ["approval_id"],
            ["approvals.id"],
            name="fk_approval_decisions_approval_id_approvals",
        ),
        sa.UniqueConstraint(
            "approval_id", "approver", name="uq_approval_decisions_approval_id_approver"
        ),
    )

    op.create_table(
        "commands",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("rule", sa.String(), nullable=True),
        sa.Column("approval_id", _BigId, nullable=True),
        sa.Column("status", sa.String(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.Column("exit_status", sa.Integer(), nullable=True),
        sa.Column("rows", sa.BigInteger(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("bytes_in", sa.BigInteger(), nullable=True),
        sa.Column("bytes_out", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_commands"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_commands_session_id_sessions"
        ),
        sa.ForeignKeyConstraint(
            ["approval_id"], ["approvals.id"], name="fk_commands_approval_id_approvals"
        ),
    )
    op.create_index("ix_commands_session_id_id", "commands", ["session_id", "id"])

    op.create_table(
        "checkpoints",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("lines", sa.BigInteger(), nullable=False),
        sa.Column("chain_hash", sa.String(), nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_checkpoints"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_checkpoints_session_id_sessions"
        ),
    )
    op.create_index("ix_checkpoints_session_id_lines", "checkpoints", ["session_id", "lines"])

    op.create_table(
        "manifests",
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name="pk_manifests"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_manifests_session_id_sessions"
        ),
    )


def downgrade() -> None:
    """Drop every table of the audit store (and with it the audit trail)."""
    op.drop_table("manifests")
    op.drop_table("checkpoints")
    op.drop_table("commands")
    op.drop_table("approval_decisions")
    op.drop_table("approvals")
    op.drop_table("sessions")
    op.drop_table("events")
