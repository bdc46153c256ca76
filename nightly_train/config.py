"""Typed, validated configuration of one nightly distillation run.

Small config objects build the full one (as in the Tinker cookbook): `LoraSettings`, `ImportanceSettings`,
`RolloutSettings`, `GKDSettings` -> `TrainConfig`. Every field is validated where it is declared and documented
by its `description`; a bad value fails with a message naming the field and the value.

    TrainConfig(student_dir="...", teacher_id="smollm2-135m-instruct", output_dir="runs/2026-11-25")
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    rank: int = Field(16, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (0 keeps CPU runs deterministic).")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        min_length=1, description="Names of the linear modules that get adapters.")


class ImportanceSettings(_Strict):
    mode: Literal["none", "truncate", "clip"] = Field(
        "truncate", description="How importance ratios of logged tokens are bounded: not at all, truncated "
                                "from above at `ratio_max`, or PPO-clipped to 1 +- `clip_eps`.")
    ratio_max: float = Field(2.0, gt=1.0, description="Truncation level of the importance ratio.")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range.")
    max_staleness: int = Field(
        3, ge=0, description="Rule-1 samples produced by an adapter more than this many versions older than "
                             "the one being trained are dropped (their states can still serve rule 2).")


class RolloutSettings(_Strict):
    enabled: bool = Field(False, description="Sample fresh completions from the current adapter at "
                                             "temperature 1 on the window's prompts (rule 3 of DESIGN.md).")
    per_step: int = Field(4, ge=1, description="Fresh rollouts per optimizer step.")
    max_tokens: int = Field(96, ge=1, description="Length cap of a fresh rollout.")


class GKDSettings(_Strict):
    enabled: bool = Field(False, description="GKD-style mixing with teacher-generated (off-policy) "
                                             "completions, for a cold start.")
    lambda_start: float = Field(0.0, ge=0.0, le=1.0,
                                description="Fraction of on-policy (student) sequences at the first step.")
    lambda_end: float = Field(1.0, ge=0.0, le=1.0,
                              description="Fraction of on-policy sequences at the last step (linear schedule).")
    per_step: int = Field(4, ge=1, description="Sequences per step drawn by the GKD mixer.")
    max_tokens: int = Field(96, ge=1, description="Length cap of teacher-generated completions.")


class TrainConfig(_Strict):
    # ---- models and data -----------------------------------------------------------------------------------
    student_dir: Path = Field(description="Folder of the student base model (safetensors + shadow_distill.json).")
    teacher_id: str = Field(min_length=1, description="Which teacher's stored scores to train on.")
    teacher_dir: Path | None = Field(None, description="Teacher model folder, needed in-process for fresh "
                                                       "rollouts, GKD and the evaluators.")
    init_adapter: Path | None = Field(None, description="Adapter to continue from (the current champion).")
    current_version: int = Field(0, ge=0, description="Registry version of `init_adapter` (0 = base): "
                                                      "staleness of a sample = current - its adapter version.")
    output_dir: Path = Field(description="Where checkpoints and the final adapter are written.")
    max_trajectories: int = Field(2000, ge=1, description="At most this many trajectories (newest kept).")
    max_completion_tokens: int = Field(512, ge=1, description="Longer completions are cut to this many tokens.")
    # ---- objective ------------------------------------------------------------------------------------------
    loss: Literal["sampled_token", "topk_reverse_kl", "topk_jsd"] = Field(
        "sampled_token", description="Loss on logged temperature-1 samples: the importance-sampled per-token "
                                     "advantage (Tinker recipe) or, where teacher top-k is stored, analytic "
                                     "reverse KL / generalized JSD over the top-k support.")
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="beta of the generalized JSD.")
    kl_penalty_coef: float = Field(1.0, gt=0.0, description="Scale of the reverse-KL advantage.")
    teacher_temperature: float = Field(1.0, gt=0.0, description="Temperature of the in-process teacher "
                                                                "distribution the student is matched to.")
    importance: ImportanceSettings = ImportanceSettings()
    rollouts: RolloutSettings = RolloutSettings()
    gkd: GKDSettings = GKDSettings()
    lora: LoraSettings = LoraSettings()
    # ---- optimisation ---------------------------------------------------------------------------------------
    learning_rate: float = Field(1e-4, gt=0.0, lt=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Trajectories per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the logged trajectories.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    checkpoint_every: int = Field(10, ge=1, description="Optimizer steps between checkpoints.")
    seed: int = Field(0, description="Seeds LoRA init, data order and rollouts: same seed, same data -> "
                                     "same adapter on CPU.")
    device: str = Field("auto", description="'auto' (CUDA with bf16 when present), 'cpu' or 'cuda'.")

    @model_validator(mode="after")
    def _needs_teacher(self) -> TrainConfig:
        if (self.rollouts.enabled or self.gkd.enabled) and self.teacher_dir is None:
            raise ValueError("rollouts and gkd need teacher_dir: the teacher scores them in-process")
        if self.init_adapter is None and self.current_version != 0:
            raise ValueError(f"current_version={self.current_version} but no init_adapter")
        return self
