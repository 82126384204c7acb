"""Relay nodes sharing one store: registration and heartbeats.

Additive only (a new table, nothing altered or dropped), so relays of the previous
version keep working against the migrated store while the others are upgraded: they
never read this table, and the sessions they write already carry their ``node``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the ``nodes`` table."""
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("api_url", sa.String(), nullable=True),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("started_at", _ts(), nullable=False),
        sa.Column("heartbeat_at", _ts(), nullable=False),
        sa.Column("stopped_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_nodes"),
    )


def downgrade() -> None:
    """Drop the ``nodes`` table."""
    op.drop_table("nodes")
