"""trajectories.seed becomes 64-bit: serving draws 62-bit seeds, which a 32-bit column refuses on PostgreSQL.

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
    with op.batch_alter_table("trajectories") as batch:
        batch.alter_column("seed", type_=sa.BigInteger, existing_type=sa.Integer, existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("trajectories") as batch:
        batch.alter_column("seed", type_=sa.Integer, existing_type=sa.BigInteger, existing_nullable=True)
