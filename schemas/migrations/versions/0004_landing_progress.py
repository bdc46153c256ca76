"""Landing before scoring: where each trajectory sat in the log, the log's progress, refusals, score stamps.

- trajectories: `log_partition`, `log_offset` (NULL for rows not landed by the scorer), `landed_watermark`, and
  `prompt_hash` (sha256 hex of the stored `prompt_token_ids` bytes, filled here for existing rows, then NOT
  NULL), with indexes for the scorer's backlog query and the prompt-level held-out split.
- teacher_scores: `tokenizer_fingerprint`, `teacher_temperature` (NULL on rows scored before this revision:
  nobody recorded them, and guessing would let the trainer mix scores made under another tokenizer).
- new tables `log_progress` (per consumer group, topic, partition) and `scoring_rejections`.

Revision ID: 0004
Revises: 0003
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
_CHUNK = 1000


def _fill_prompt_hashes() -> None:
    """prompt_hash of every existing row, from the stored bytes (that is the definition), in keyset chunks."""
    conn = op.get_bind()
    rows = sa.table("trajectories", sa.column("trajectory_id", sa.String), sa.column("prompt_token_ids", sa.LargeBinary),
                    sa.column("prompt_hash", sa.String))
    after = ""
    while True:
        chunk = conn.execute(sa.select(rows.c.trajectory_id, rows.c.prompt_token_ids)
                             .where(rows.c.trajectory_id > after).order_by(rows.c.trajectory_id).limit(_CHUNK)).all()
        if not chunk:
            return
        conn.execute(rows.update().where(rows.c.trajectory_id == sa.bindparam("tid"))
                     .values(prompt_hash=sa.bindparam("h")),
                     [{"tid": tid, "h": hashlib.sha256(bytes(blob)).hexdigest()} for tid, blob in chunk])
        after = chunk[-1][0]


def upgrade() -> None:
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("prompt_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("log_partition", sa.Integer, nullable=True))
        batch.add_column(sa.Column("log_offset", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("landed_watermark", TZ, nullable=True))
    _fill_prompt_hashes()
    with op.batch_alter_table("trajectories") as batch:
        batch.alter_column("prompt_hash", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_trajectories_prompt_hash", "trajectories", ["prompt_hash"])
    op.create_index("ix_trajectories_log_partition", "trajectories", ["log_partition", "created_at"])
    with op.batch_alter_table("teacher_scores") as batch:
        batch.add_column(sa.Column("tokenizer_fingerprint", sa.String(64), nullable=True))
        batch.add_column(sa.Column("teacher_temperature", sa.Float, nullable=True))
    op.create_table(
        "scoring_rejections",
        sa.Column("trajectory_id", sa.String(64),
                  sa.ForeignKey("trajectories.trajectory_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("teacher_id", sa.String(200), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("rejected_at", TZ, nullable=False),
    )
    op.create_table(
        "log_progress",
        sa.Column("group_id", sa.String(200), primary_key=True),
        sa.Column("topic", sa.String(249), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("max_created_at", TZ),
        sa.Column("caught_up_at", TZ),
        sa.Column("partitions_total", sa.Integer, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("log_progress")
    op.drop_table("scoring_rejections")
    with op.batch_alter_table("teacher_scores") as batch:
        batch.drop_column("teacher_temperature")
        batch.drop_column("tokenizer_fingerprint")
    op.drop_index("ix_trajectories_log_partition", "trajectories")
    op.drop_index("ix_trajectories_prompt_hash", "trajectories")
    with op.batch_alter_table("trajectories") as batch:
        batch.drop_column("landed_watermark")
        batch.drop_column("log_offset")
        batch.drop_column("log_partition")
        batch.drop_column("prompt_hash")
