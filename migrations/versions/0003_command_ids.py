"""Command ids: every event carries the id of the command that appended it.

A retried chat is found by its client's id and answered with the original;
after a COMMIT whose outcome is unknown the writer looks its batch up by id.
Events logged before this revision keep NULL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites no row on either backend.
    op.add_column("events", sa.Column("command_id", sa.String(200), nullable=True))
    # Not unique: the events of one command share their id.
    op.create_index("ix_events_command_id", "events", ["command_id"])


def downgrade() -> None:
    op.drop_index("ix_events_command_id", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("command_id")
