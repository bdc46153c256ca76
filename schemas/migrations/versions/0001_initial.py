"""Initial feature store: trajectories, teacher scores, adapter versions, training manifests.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "trajectories",
        sa.Column("trajectory_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("choice_index", sa.Integer, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("ingested_at", TZ, nullable=False),
        sa.Column("caller_hash", sa.String(64)),
        sa.Column("base_model_id", sa.String(200), nullable=False),
        sa.Column("adapter_version", sa.String(64)),
        sa.Column("temperature", sa.Float, nullable=False),
        sa.Column("top_p", sa.Float, nullable=False),
        sa.Column("top_k", sa.Integer, nullable=False),
        sa.Column("max_tokens", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer),
        sa.Column("logprob_kind", sa.String(16), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("n_prompt_tokens", sa.Integer, nullable=False),
        sa.Column("n_completion_tokens", sa.Integer, nullable=False),
        sa.Column("prompt_token_ids", sa.LargeBinary, nullable=False),
        sa.Column("completion_token_ids", sa.LargeBinary, nullable=False),
        sa.Column("behaviour_logprobs", sa.LargeBinary, nullable=False),
        sa.Column("prompt_text", sa.Text),
        sa.Column("completion_text", sa.Text),
        sa.Column("schema_version", sa.Integer, nullable=False),
    )
    op.create_index("ix_trajectories_created_at", "trajectories", ["created_at"])
    op.create_index("ix_trajectories_adapter_version", "trajectories", ["adapter_version"])
    op.create_table(
        "teacher_scores",
        sa.Column("trajectory_id", sa.String(64),
                  sa.ForeignKey("trajectories.trajectory_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("teacher_id", sa.String(200), primary_key=True),
        sa.Column("scored_at", TZ, nullable=False),
        sa.Column("n_tokens", sa.Integer, nullable=False),
        sa.Column("teacher_logprobs", sa.LargeBinary, nullable=False),
        sa.Column("topk", sa.Integer, nullable=False),
        sa.Column("topk_token_ids", sa.LargeBinary),
        sa.Column("topk_logprobs", sa.LargeBinary),
    )
    op.create_index("ix_teacher_scores_scored_at", "teacher_scores", ["scored_at"])
    op.create_table(
        "adapter_versions",
        sa.Column("model_name", sa.String(200), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("source_uri", sa.Text, nullable=False),
        sa.Column("window_start", TZ, nullable=False),
        sa.Column("window_end", TZ, nullable=False),
        sa.Column("trajectory_count", sa.Integer, nullable=False),
        sa.Column("gate_passed", sa.Boolean, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "training_manifests",
        sa.Column("interval_key", sa.String(100), primary_key=True),
        sa.Column("window_start", TZ, nullable=False),
        sa.Column("window_end", TZ, nullable=False),
        sa.Column("teacher_id", sa.String(200), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("n_train", sa.Integer, nullable=False),
        sa.Column("n_heldout", sa.Integer, nullable=False),
        sa.Column("train_ids_json", sa.Text, nullable=False),
        sa.Column("heldout_ids_json", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("training_manifests")
    op.drop_table("adapter_versions")
    op.drop_index("ix_teacher_scores_scored_at", "teacher_scores")
    op.drop_table("teacher_scores")
    op.drop_index("ix_trajectories_adapter_version", "trajectories")
    op.drop_index("ix_trajectories_created_at", "trajectories")
    op.drop_table("trajectories")
