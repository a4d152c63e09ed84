"""Instances: one row per serving process, with the heartbeat that is its lease.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dead", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    # Sweeps look up the running runs of one instance.
    op.create_index("ix_runs_instance_id", "runs", ["instance_id"])


def downgrade() -> None:
    op.drop_index("ix_runs_instance_id", "runs")
    op.drop_table("instances")
