"""Events lose their run index: no query reads events by run (a thread's events are read by
`(thread_id, seq)`), and keeping the index cost every stored event an insert into one more
B-tree whose pages are spread over all running runs. With 200 concurrent streams it doubled
the database time per stored delta (bench/README.md).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_events_run_id", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_run_id", "events", ["run_id"])
