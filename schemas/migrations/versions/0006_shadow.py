"""trajectories.shadow: answers of a candidate mirrored on live traffic (shadow mode).

The teacher scores them like any other trajectory, the live paired comparison reads them, and no training window
contains them (every window query filters `shadow = false`). Rows before this revision are live traffic.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("shadow", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_trajectories_shadow_request", "trajectories", ["shadow", "request_id"])


def downgrade() -> None:
    op.drop_index("ix_trajectories_shadow_request", table_name="trajectories")
    with op.batch_alter_table("trajectories") as batch:
        batch.drop_column("shadow")
