"""Images and files: the upload table and upload tokens.

``uploads`` holds every file received (its blob is in the blob store under
``sha256``); ``posted_position``/``scope`` are set in the transaction of the
chat that posts it. ``upload_tokens`` holds the SHA-256 of each upload token
(never the token). Nothing in the log changes: chats with files carry an
``attachments`` field that older chats simply do not have.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCOPE = 200


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer, nullable=True),
        sa.Column("height", sa.Integer, nullable=True),
        sa.Column("thumb_sha256", sa.String(64), nullable=True),
        sa.Column("thumb_type", sa.String(32), nullable=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("posted_position", sa.BigInteger, nullable=True),
        sa.Column("scope", sa.String(SCOPE), nullable=True),
        sa.Column("command_id", sa.String(200), nullable=True),
    )
    op.create_index("ix_uploads_owner_created", "uploads", ["owner", "created"])
    op.create_index("ix_uploads_sha256", "uploads", ["sha256"])
    op.create_index("ix_uploads_thumb_sha256", "uploads", ["thumb_sha256"])
    op.create_index("ix_uploads_unposted", "uploads", ["posted_position", "created"])
    op.create_table(
        "upload_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("expires", sa.Float, nullable=False),
    )
    op.create_index("ix_upload_tokens_expires", "upload_tokens", ["expires"])


def downgrade() -> None:
    op.drop_index("ix_upload_tokens_expires", table_name="upload_tokens")
    op.drop_table("upload_tokens")
    for index in ("ix_uploads_unposted", "ix_uploads_thumb_sha256", "ix_uploads_sha256", "ix_uploads_owner_created"):
        op.drop_index(index, table_name="uploads")
    op.drop_table("uploads")
