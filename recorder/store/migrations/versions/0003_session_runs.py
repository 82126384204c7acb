"""Sessions keep the identity's OIDC attributes and the pipeline run they belong to;
exchanged tokens (a short castgate token standing for a verified OIDC token).

Additive only (two nullable columns, an index and a new table), so relays of the
previous version keep working against the migrated store: their sessions simply belong
to no run, and they never read the new table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``sessions.attributes``, ``sessions.run_id`` and ``token_exchanges``."""
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("attributes", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("run_id", sa.String(), nullable=True))
    op.create_index("ix_sessions_run_id_started_at", "sessions", ["run_id", "started_at"])
    op.create_table(
        "token_exchanges",
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("identity", sa.JSON(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_token_exchanges"),
    )
    op.create_index("ix_token_exchanges_expires_at", "token_exchanges", ["expires_at"])


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_token_exchanges_expires_at", table_name="token_exchanges")
    op.drop_table("token_exchanges")
    op.drop_index("ix_sessions_run_id_started_at", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("run_id")
        batch.drop_column("attributes")
