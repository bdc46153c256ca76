"""trajectories.sampling_json and user_hash: every sampling parameter of the message survives the store.

The typed columns (temperature, top_p, top_k, max_tokens, seed) stay for SQL; `sampling_json` is the message's
whole `sampling` object, so a parameter added to the contract later (min_p, min_tokens, ignore_eos, ...) is never
dropped on landing: a min_p-cut sample must not read back as an untruncated temperature-1 one, which rule 1 would
importance-weight. NULL on rows landed before this migration (they predate those fields). `user_hash` is the
salted hash of the request's `user` field; both hashes are indexed, for erasure by caller.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("sampling_json", sa.Text(), nullable=True))
        batch.add_column(sa.Column("user_hash", sa.String(64), nullable=True))
    op.create_index("ix_trajectories_user_hash", "trajectories", ["user_hash"])
    op.create_index("ix_trajectories_caller_hash", "trajectories", ["caller_hash"])


def downgrade() -> None:
    op.drop_index("ix_trajectories_caller_hash", table_name="trajectories")
    op.drop_index("ix_trajectories_user_hash", table_name="trajectories")
    with op.batch_alter_table("trajectories") as batch:
        batch.drop_column("user_hash")
        batch.drop_column("sampling_json")
