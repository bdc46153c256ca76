"""training_manifests.champion_version: the champion a night continues from, resolved once by its snapshot.

Every later task of the night (train, evaluate, review) reads it from the manifest, so a reviewer moving the
alias mid-night cannot give two tasks different champions. NULL = the bare student base.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_manifests") as batch:
        batch.add_column(sa.Column("champion_version", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_manifests") as batch:
        batch.drop_column("champion_version")
