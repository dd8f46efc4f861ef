"""Accounts: credentials, revoked access tokens, failed-login counters and
the server's signing key (issue 13).

Only ``chatserver.accounts`` reads or writes these tables. Passwords are kept
as Argon2id hashes; no token is stored, only the ids (``jti``) of revoked
ones until they would have expired anyway. The log records that an account
exists (``AccountCreated``) and moderation (``UserKicked``, ``UserBanned``);
nothing secret goes there.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created", sa.Float, nullable=False),
        # Tokens issued before this moment (a password change) are refused.
        sa.Column("tokens_after", sa.Float, nullable=False, server_default="0"),
        sa.Column("banned_until", sa.Float, nullable=True),
    )
    op.create_table(
        "revoked_tokens",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("expires", sa.Float, nullable=False),
    )
    op.create_index("ix_revoked_tokens_expires", "revoked_tokens", ["expires"])
    op.create_table(
        "login_failures",
        # "account:<name>" or "address:<ip>".
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("window_start", sa.Float, nullable=False),
    )
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("server_secrets")
    op.drop_table("login_failures")
    op.drop_index("ix_revoked_tokens_expires", table_name="revoked_tokens")
    op.drop_table("revoked_tokens")
    op.drop_table("accounts")
