"""Trajectory v2 and cross-tokenizer scores.

trajectories: what a v2 message adds for a teacher with another tokenizer (`prompt_kind`, the request's
`messages_json`, the template switches, `completion_offsets` packed like token ids). All NULL on v1 rows, which
keep landing during the rolling upgrade.

teacher_scores: `span_ids` (packed, one per completion token) when the teacher's tokenizer is not the student's:
`teacher_logprobs` then holds each span's teacher logprob shared over its student tokens (model_runtime.xtok);
NULL on same-tokenizer rows (every token its own span). `student_tokenizer_fingerprint`: the student tokenizer
the scores were projected onto (NULL: the same as `tokenizer_fingerprint`, the teacher's).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("prompt_kind", sa.String(8), nullable=True))
        batch.add_column(sa.Column("messages_json", sa.Text(), nullable=True))
        batch.add_column(sa.Column("add_generation_prompt", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("continue_final_message", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("completion_offsets", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("teacher_scores") as batch:
        batch.add_column(sa.Column("span_ids", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("student_tokenizer_fingerprint", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("teacher_scores") as batch:
        batch.drop_column("student_tokenizer_fingerprint")
        batch.drop_column("span_ids")
    with op.batch_alter_table("trajectories") as batch:
        for column in ("completion_offsets", "continue_final_message", "add_generation_prompt", "messages_json",
                       "prompt_kind"):
            batch.drop_column(column)
