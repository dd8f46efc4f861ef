"""Rooms and private messages: the events' conversation (``scope``) and the
projections of rooms, memberships, read markers and conversations.

Every event logged before this revision belongs to the lobby when it is a
join, a leave or a chat (those were the only room events there were), so
the backfill sets ``room:lobby`` on those and leaves the rest NULL, exactly
as ``events.scope_of`` derives it for new events. Payloads are not touched.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCOPE = 200


def upgrade() -> None:
    op.add_column("events", sa.Column("scope", sa.String(SCOPE), nullable=True))
    op.execute(
        "UPDATE events SET scope = 'room:lobby' "
        "WHERE type IN ('UserJoined', 'UserLeft', 'MessagePosted') AND scope IS NULL"
    )
    op.create_index("ix_events_scope_position", "events", ["scope", "position"])
    op.create_table(
        "rooms",
        sa.Column("key", sa.String(SCOPE), primary_key=True),
        sa.Column("name", sa.String(SCOPE), nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("creator", sa.String(64), nullable=False),
        sa.Column("created_position", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "room_members",
        sa.Column("room_key", sa.String(SCOPE), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("joined_position", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "read_markers",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(SCOPE), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "conversations",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("peer", sa.String(64), primary_key=True),
        sa.Column("last_position", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_conversations_name_last", "conversations", ["name", "last_position"])


def downgrade() -> None:
    op.drop_index("ix_conversations_name_last", table_name="conversations")
    for table in ("conversations", "read_markers", "room_members", "rooms"):
        op.drop_table(table)
    op.drop_index("ix_events_scope_position", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("scope")
