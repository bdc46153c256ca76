"""Typed, validated configuration of the nightly distillation: one `StrictConfig` tree, checked when it loads.

Small config objects build the full one (as in the Tinker cookbook): `LoraSettings`, `ImportanceSettings`,
`RolloutSettings`, `GKDSettings` -> `TrainSettings` (the hyperparameters a nightly file sets) -> `TrainConfig`
(those plus one run's paths and versions, which the pipeline fills in). `NightlyConfig` is the whole nightly file:
its `train` section is a `TrainSettings`, its `eval` an `EvalSettings`, its `gate` the gate's `GatePolicy`, so a
bad value anywhere fails when the file is read, naming the field and the value, not hours later in a task.

    TrainConfig(student_dir="...", teacher_id="smollm2-135m-instruct", output_dir="runs/2026-11-25")
    NightlyConfig.from_json_file("nightly.json")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from foundation.config import StrictConfig
from nightly_train.gate import GatePolicy
from schemas.trajectory import DEFAULT_TOPIC


class LoraSettings(StrictConfig):
    rank: int = Field(16, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (0 keeps CPU runs deterministic).")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        min_length=1, description="Names of the linear modules that get adapters.")


class ImportanceSettings(StrictConfig):
    mode: Literal["none", "truncate", "clip"] = Field(
        "truncate", description="How importance ratios of logged tokens are bounded: not at all, truncated "
                                "from above at `ratio_max`, or PPO-clipped to 1 +- `clip_eps`.")
    ratio_max: float = Field(2.0, gt=1.0, description="Truncation level of the importance ratio.")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range.")
    max_staleness: int = Field(
        3, ge=0, description="Rule-1 samples produced by an adapter more than this many steps away in the "
                             "registry's lineage tree are not importance-weighted (their states still serve "
                             "rule 2 and rollouts); samples of an adapter the registry does not know never are.")


class RolloutSettings(StrictConfig):
    enabled: bool = Field(False, description="Sample fresh completions from the current adapter at "
                                             "temperature 1 on the window's prompts (rule 3 of DESIGN.md).")
    per_step: int = Field(4, ge=1, description="Fresh rollouts per optimizer step.")
    max_tokens: int = Field(96, ge=1, description="Length cap of a fresh rollout.")


class GKDSettings(StrictConfig):
    enabled: bool = Field(False, description="GKD-style mixing with teacher-generated (off-policy) "
                                             "completions, for a cold start.")
    lambda_start: float = Field(0.0, ge=0.0, le=1.0,
                                description="Fraction of on-policy (student) sequences at the first step.")
    lambda_end: float = Field(1.0, ge=0.0, le=1.0,
                              description="Fraction of on-policy sequences at the last step (linear schedule).")
    per_step: int = Field(4, ge=1, description="Sequences per step drawn by the GKD mixer.")
    max_tokens: int = Field(96, ge=1, description="Length cap of teacher-generated completions.")


class TrainSettings(StrictConfig):
    """The hyperparameters of a night's training (the nightly file's `train` section)."""

    # ---- data -----------------------------------------------------------------------------------------------
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
    processes: int = Field(1, ge=1, description=(
        "Training processes on this host under torchrun (one GPU each with CUDA, gloo on the CPU); each trains on "
        "its shard of every global batch (nightly_train.distributed). 1: a single process."))


class TrainConfig(TrainSettings):
    """One training run: the settings plus the models, the champion it continues from and where it writes."""

    student_dir: Path = Field(description="Folder of the student base model (safetensors + shadow_distill.json).")
    teacher_id: str = Field(min_length=1, description="Which teacher's stored scores to train on.")
    teacher_dir: Path | None = Field(None, description="Teacher model folder, needed in-process for fresh "
                                                       "rollouts, GKD and the evaluators.")
    init_adapter: Path | None = Field(None, description="Adapter to continue from (the current champion).")
    output_dir: Path = Field(description="Where checkpoints and the final adapter are written.")

    @classmethod
    def for_run(cls, settings: TrainSettings, **run: object) -> TrainConfig:
        """`settings` plus one run's paths and versions (`student_dir=`, `output_dir=`, ...)."""
        return cls.model_validate({**settings.model_dump(), **run})

    @model_validator(mode="after")
    def _needs_teacher(self) -> TrainConfig:
        if (self.rollouts.enabled or self.gkd.enabled) and self.teacher_dir is None:
            raise ValueError("rollouts and gkd need teacher_dir: the teacher scores them in-process")
        return self


class EvalSettings(StrictConfig):
    """How the candidate and the champion are measured: the same prompts and seeds for both, so the gate can pair
    them prompt by prompt (`nightly_train.gate`)."""

    ifeval_path: Path | None = Field(None, description=(
        "IFEval JSONL (e.g. the public 541 prompts, kept outside the project); None = the project's own 240-prompt "
        "set (nightly_train/instruction_sets/if_project.jsonl)."))
    ifeval_subset: int | None = Field(None, ge=1, description="Seeded subset size (None = all prompts).")
    ifeval_seed: int = Field(0, description="Seed of the subset.")
    ifeval_max_tokens: int = Field(128, ge=1, description="Greedy answer length cap (the champion's result is cached "
                                                           "by model identity, so each model pays it once).")
    kl_prompts: int = Field(16, ge=2, description="Held-out prompts for the reverse-KL meter (the gate's units).")
    kl_samples_per_prompt: int = Field(4, ge=1, description=(
        "Samples per held-out prompt and side (same seeds for candidate and champion); more lower the per-prompt "
        "noise of the paired KL tests."))
    kl_max_tokens: int = Field(64, ge=1, description="Sampled tokens per held-out sample.")
    seed: int = Field(0, description="Seed of the held-out samples (same for candidate and champion).")
    greedy_prompt: str = Field("Give three tips for staying healthy.", description="Shown before/after.")


class NightlyConfig(StrictConfig):
    """Everything a night needs; read from a JSON file named by $SHADOW_DISTILL_NIGHTLY_CONFIG or --config."""

    store_url: str = Field(description="Feature store SQLAlchemy URL.")
    mlflow_tracking_uri: str = Field(description="MLflow tracking (and registry) URI.")
    model_name: str | None = Field(None, description="Registered model; default 'shadow-distill-<student id>'.")
    student_dir: Path = Field(description="Student base model folder.")
    teacher_dir: Path = Field(description="Teacher model folder (rollouts and the evaluators run it in-process).")
    teacher_id: str = Field(min_length=1, description="Whose stored scores to train on.")
    cross_tokenizer: bool = Field(False, description=(
        "Allow a teacher whose tokenizer is not the student's (another model family): its scores are over aligned "
        "character spans (model_runtime.xtok), rule 1 and rollouts train on span advantages, and the top-k rules "
        "(analytic KL, GKD) are off. False refuses such a teacher, naming both tokenizers."))
    runs_dir: Path = Field(description="Working folders, one per interval (checkpoints, adapters, reports).")
    experiment: str = Field("shadow-distill-nightly", min_length=1, description="MLflow experiment of the runs.")
    coverage_threshold: float = Field(0.99, gt=0.0, le=1.0, description="Scored (or refused) fraction of the "
                                                                      "window's landed trajectories to wait for.")
    log_topic: str = Field(DEFAULT_TOPIC, min_length=1, description="Kafka topic the scorer lands trajectories from.")
    scorer_group: str = Field("shadow-scoring", min_length=1, description="Consumer group of the scorer whose "
                                                                           "progress says how far the log was read.")
    allowed_lateness_s: float = Field(300.0, ge=0.0, description=(
        "A window counts as seen once every partition of the log was read past its end plus this much (event "
        "time), or found caught up that long after it: covers a serving spool that replays after an outage."))
    min_trajectories: int = Field(8, ge=1, description="Fewer scored trajectories than this: skip the night.")
    heldout_percent: int = Field(20, ge=1, le=90, description="Share of the window's distinct prompts held out "
                                                              "(by prompt hash).")
    min_heldout: int = Field(8, ge=1, description=(
        "Held-out prompts kept even when the share rounds lower: the gate's paired tests are over prompts, and "
        "a sign-flip test over n prompts cannot reach p < 2^-n (5 is the least at alpha 0.05; 8 gives it power)."))
    retention_days: int = Field(30, ge=1, description="Trajectories older than this are purged.")
    min_live_pairs: int = Field(0, ge=0, description=(
        "`promote approve` refuses a candidate with fewer live shadow pairs (0: no live evidence required)."))
    notify_webhook: str | None = Field(None, description="POSTed a JSON summary after registration.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Training hyperparameters.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="How candidate and champion are measured.")
    gate: GatePolicy = Field(default_factory=GatePolicy, description="What the candidate must pass.")

    @model_validator(mode="after")
    def _kl_tests_can_pass(self) -> NightlyConfig:
        # The sign-flip tests' smallest p is 2^-n over n prompts: fewer than log2(1/alpha) can never pass.
        if 2.0 ** -self.eval.kl_prompts > self.gate.alpha:
            need = math.ceil(math.log2(1 / self.gate.alpha))
            raise ValueError(f"eval.kl_prompts={self.eval.kl_prompts} can never pass the paired KL tests at "
                             f"gate.alpha={self.gate.alpha} (smallest p 2^-{self.eval.kl_prompts}); "
                             f"use at least {need}")
        return self

    def registered_model(self) -> str:
        from model_runtime.models import ModelMeta

        return self.model_name or f"shadow-distill-{ModelMeta.read(self.student_dir).model_id}"
