"""On-policy distillation vs SFT vs sparse-reward RL, on the embedded pair, at equal steps and sampled tokens.

The published claim (Thinking Machines, "On-Policy Distillation"): OPD reaches RL's result with 7-10x fewer
gradient steps and beats SFT on teacher completions. This bench checks what that looks like for this project's
own pair (teacher SmolLM2-135M-Instruct, student = teacher minus two layers (`--drop-layers`), LoRA), on this CPU:

- opd: `Distiller` with fresh rollouts only (rule 3): the student samples at T=1 from the current adapter each
  step, the in-process teacher scores the tokens, importance-sampling loss with the reverse-KL advantage.
- sft: off-policy: the teacher samples at T=1 on the same number of prompts x tokens per step, loss = NLL of
  the teacher's tokens under the student (forward KL on teacher states).
- rl: GRPO-style: `rl_group` student samples per prompt, reward = IFEval strict pass/fail of the decoded
  answer (`nightly_train.ifeval.score`), advantage = reward normalised within the group, policy gradient.

Every method starts from the same LoRA init (seeded), uses the same LoRA config, optimizer, learning rate and
gradient clipping, and samples `prompts_per_step x max_tokens` tokens per step from the training prompts.
Checkpoints every `eval_every` steps: held-out reverse KL / forward KL / distinct-2
(`evaluate_distillation`) and IFEval prompt-level strict accuracy (greedy) on held-out IFEval prompts.
Writes results.json, table.md and distill.png under --out; the last line is OPD's final reverse KL over SFT's.

    .venv/bin/python bench/distill_efficiency.py --tiny --steps 2 --eval-every 1      # smoke test, tiny models
    nohup .venv/bin/python bench/distill_efficiency.py > bench/out/distill.log 2>&1 &   # real pair, ~25 min
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from pydantic import Field, model_validator

from foundation.config import StrictConfig
from model_runtime.chat import user_prompt_ids
from model_runtime.logprobs import completion_logits, token_logprobs
from model_runtime.models import ModelMeta, eos_token_ids, load_model, load_tokenizer
from model_runtime.sampling import DecodeParams, sample
from nightly_train import ifeval
from nightly_train.config import LoraSettings, RolloutSettings, TrainConfig
from nightly_train.evaluate import evaluate_distillation, greedy_generate_fn
from nightly_train.losses import importance_sampling_loss, masked_mean
from nightly_train.train import Distiller
from shadow_distill.models_setup import resolve_models

Method = Literal["opd", "sft", "rl"]
StepHook = Callable[[int, torch.nn.Module, int], None]  # (steps done, student, sampled tokens this step)


class BenchConfig(StrictConfig):
    methods: tuple[Method, ...] = Field(("opd", "sft", "rl"), min_length=1)
    steps: int = Field(16, ge=1, description="Optimizer steps per method.")
    prompts_per_step: int = Field(4, ge=1, description="Sequences sampled per step (RL: groups x group size).")
    max_tokens: int = Field(48, ge=1, description="Length cap of every training sample.")
    rl_group: int = Field(4, ge=2, description="RL samples per prompt (group normalisation).")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(8, ge=1, description="Steps between checkpoint evaluations (step 0 always).")
    eval_prompts: int = Field(8, ge=1, description="Held-out prompts for reverse/forward KL.")
    eval_max_tokens: int = Field(48, ge=1)
    ifeval_prompts: int = Field(10, ge=1, description="Held-out IFEval prompts (greedy).")
    ifeval_max_tokens: int = Field(64, ge=1)
    seed: int = 0
    drop_layers: str = Field("auto", description="Student = teacher minus these layers, e.g. '8,21' (the demo's); "
                                                 "'auto' = the sensitivity check's least sensitive pair.")
    tiny: bool = False
    out: Path = Path("bench/out/distill")

    @model_validator(mode="after")
    def _fits(self) -> BenchConfig:
        if "rl" in self.methods and self.prompts_per_step % self.rl_group:
            raise ValueError(f"prompts_per_step {self.prompts_per_step} must be a multiple of rl_group {self.rl_group}")
        if self.eval_prompts > self.ifeval_prompts:
            raise ValueError("eval_prompts are drawn from the held-out IFEval prompts: at most ifeval_prompts")
        return self


@dataclass
class Checkpoint:
    method: str
    step: int
    sampled_tokens: int
    train_s: float
    reverse_kl: float
    reverse_kl_se: float
    forward_kl: float
    forward_kl_se: float
    distinct_2: float
    ifeval_strict: float
    ifeval_se: float
    greedy_answer: str


@dataclass
class Setup:
    cfg: BenchConfig
    teacher_dir: Path
    student_dir: Path
    teacher: torch.nn.Module
    tok: object
    eos: set[int]
    train: list[ifeval.IFEvalPrompt]
    train_ids: list[list[int]]
    heldout: list[ifeval.IFEvalPrompt]
    heldout_ids: list[list[int]]

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t not in self.eos], skip_special_tokens=True)


def build_setup(cfg: BenchConfig) -> Setup:
    teacher_dir, student_dir = resolve_models(tiny=cfg.tiny, workdir=cfg.out, drop_layers=cfg.drop_layers)
    tok = load_tokenizer(student_dir)
    teacher = load_model(teacher_dir)
    prompts = ifeval.load_prompts(None)
    held = set(random.Random(cfg.seed).sample(range(len(prompts)), cfg.ifeval_prompts))
    heldout = [p for i, p in enumerate(prompts) if i in held]
    train = [p for i, p in enumerate(prompts) if i not in held]
    return Setup(cfg, teacher_dir, student_dir, teacher, tok, eos_token_ids(tok, teacher), train,
                 [user_prompt_ids(tok, p.prompt) for p in train], heldout,
                 [user_prompt_ids(tok, p.prompt) for p in heldout])


# ---- evaluation ----------------------------------------------------------------------------------------------
def evaluate_checkpoint(s: Setup, model: torch.nn.Module, method: str, step: int, tokens: int,
                        train_s: float) -> Checkpoint:
    cfg = s.cfg
    was_training = model.training
    model.eval()
    dm = evaluate_distillation(model, s.teacher, s.tok, s.heldout_ids[:cfg.eval_prompts],
                               max_tokens=cfg.eval_max_tokens, seed=cfg.seed, greedy_prompt=s.heldout[0].prompt)
    result = ifeval.evaluate(s.heldout, greedy_generate_fn(model, s.tok, cfg.ifeval_max_tokens))
    model.train(was_training)
    acc = result.prompt_strict
    row = Checkpoint(method, step, tokens, train_s, dm.reverse_kl, dm.reverse_kl_se, dm.forward_kl,
                     dm.forward_kl_se, dm.distinct_2, acc, math.sqrt(acc * (1 - acc) / len(s.heldout)),
                     dm.greedy_answer)
    print(f"[{method}] step {step:>3} tokens {tokens:>6} train {train_s:6.1f} s | reverse KL {row.reverse_kl:.3f} "
          f"+- {row.reverse_kl_se:.3f} forward KL {row.forward_kl:.3f} distinct-2 {row.distinct_2:.2f} "
          f"IFEval {acc:.2f}", flush=True)
    return row


class Tracker:
    """Counts sampled tokens and training time per method; evaluates at the checkpoint steps."""

    def __init__(self, s: Setup, method: str, step0: Checkpoint):
        self.s, self.method = s, method
        self.rows = [Checkpoint(**{**asdict(step0), "method": method})]
        self.tokens, self.train_s, self._t = 0, 0.0, time.perf_counter()

    def __call__(self, step: int, model: torch.nn.Module, step_tokens: int) -> None:
        self.train_s += time.perf_counter() - self._t
        self.tokens += step_tokens
        print(f"[{self.method}] step {step} done: {step_tokens} sampled tokens, {self.train_s:.1f} s", flush=True)
        if step % self.s.cfg.eval_every == 0 or step == self.s.cfg.steps:
            self.rows.append(evaluate_checkpoint(self.s, model, self.method, step, self.tokens, self.train_s))
        self._t = time.perf_counter()


# ---- the three methods -----------------------------------------------------------------------------------------
def new_student(s: Setup) -> torch.nn.Module:
    """The base student with a fresh LoRA, seeded exactly as `Distiller` seeds its own (same init)."""
    torch.manual_seed(s.cfg.seed)
    lora = LoraSettings()
    model = get_peft_model(load_model(s.student_dir), LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    return model.train()


def draw(s: Setup, step: int, n: int) -> list[int]:
    return random.Random(s.cfg.seed * 1_000_003 + step).choices(range(len(s.train)), k=n)


def samples(s: Setup, model: torch.nn.Module, prompts: list[list[int]], seed: int) -> list[list[int]]:
    was_training = model.training
    model.eval()
    params = [DecodeParams(max_tokens=s.cfg.max_tokens, temperature=1.0, seed=seed + i) for i in range(len(prompts))]
    out = sample(model, prompts, params, eos_ids=s.eos, pad_id=s.pad_id)
    model.train(was_training)
    return [r.completion_ids for r in out]


def optimizer_step(s: Setup, model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_opd(s: Setup, hook: StepHook) -> None:
    cfg = s.cfg
    tc = TrainConfig(student_dir=s.student_dir, teacher_id=ModelMeta.read(s.teacher_dir).model_id,
                     teacher_dir=s.teacher_dir, output_dir=cfg.out / "opd", max_steps=cfg.steps,
                     learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm, checkpoint_every=10**6,
                     seed=cfg.seed, device="cpu",
                     rollouts=RolloutSettings(enabled=True, per_step=cfg.prompts_per_step, max_tokens=cfg.max_tokens))
    distiller = Distiller(tc, [], rollout_prompts=s.train_ids)
    distiller.run(log_metrics=lambda step, m: hook(step, distiller.model, int(m["tokens"])), progress=False)


def run_sft(s: Setup, hook: StepHook) -> None:
    model = new_student(s)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.cfg.learning_rate,
                            weight_decay=0.0)
    for step in range(s.cfg.steps):
        prompts = [s.train_ids[i] for i in draw(s, step, s.cfg.prompts_per_step)]
        with torch.no_grad():
            comps = samples(s, s.teacher, prompts, seed=step * 1000)
        keep = [i for i, c in enumerate(comps) if c]
        cl = completion_logits(model, [prompts[i] for i in keep], [comps[i] for i in keep], s.pad_id)
        nll = -masked_mean(token_logprobs(cl.logits_BCV, cl.completion_ids_BC), cl.mask_BC)
        optimizer_step(s, model, opt, nll)
        hook(step + 1, model, sum(len(c) for c in comps))


def group_advantages(rewards_G: torch.Tensor) -> torch.Tensor:
    """GRPO: reward minus the group mean over the group's std; all-equal groups teach nothing (zeros)."""
    std = rewards_G.std(unbiased=False)
    return (rewards_G - rewards_G.mean()) / std if std > 0 else torch.zeros_like(rewards_G)


def run_rl(s: Setup, hook: StepHook) -> None:
    cfg = s.cfg
    model = new_student(s)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            weight_decay=0.0)
    for step in range(cfg.steps):
        chosen = draw(s, step, cfg.prompts_per_step // cfg.rl_group)
        rows = [i for i in chosen for _ in range(cfg.rl_group)]
        prompts = [s.train_ids[i] for i in rows]
        comps = samples(s, model, prompts, seed=step * 1000)
        rewards = torch.tensor([ifeval.score([s.train[i]], [s.decode(c)]).prompt_strict
                                for i, c in zip(rows, comps, strict=True)])
        adv_B = torch.cat([group_advantages(g) for g in rewards.split(cfg.rl_group)])
        keep = [b for b, c in enumerate(comps) if c]
        cl = completion_logits(model, [prompts[b] for b in keep], [comps[b] for b in keep], s.pad_id)
        lp_BC = token_logprobs(cl.logits_BCV, cl.completion_ids_BC)
        adv_BC = adv_B[keep][:, None] * cl.mask_BC
        loss, _ = importance_sampling_loss(lp_BC, lp_BC.detach(), adv_BC, cl.mask_BC, mode="none")
        optimizer_step(s, model, opt, loss)
        print(f"[rl] step {step + 1} rewards {rewards.tolist()}", flush=True)
        hook(step + 1, model, sum(len(c) for c in comps))


RUNNERS: dict[str, Callable[[Setup, StepHook], None]] = {"opd": run_opd, "sft": run_sft, "rl": run_rl}


# ---- report --------------------------------------------------------------------------------------------------
def steps_to_reach(rows: list[Checkpoint], target: Checkpoint, metric: str) -> str:
    better = (lambda r: r.reverse_kl <= target.reverse_kl) if metric == "reverse_kl" else \
        (lambda r: r.ifeval_strict >= target.ifeval_strict)
    hit = next((r for r in rows if better(r)), None)
    return "not reached" if hit is None else f"{hit.step} ({hit.sampled_tokens} tokens)"


def table(results: dict[str, list[Checkpoint]]) -> str:
    lines = ["| method | step | sampled tokens | train s | reverse KL (+- s.e.) | forward KL (+- s.e.) | distinct-2 "
             "| IFEval strict (+- s.e.) |", "|---|---|---|---|---|---|---|---|"]
    for method, rows in results.items():
        lines += [f"| {method} | {r.step} | {r.sampled_tokens} | {r.train_s:.0f} | {r.reverse_kl:.3f} +- "
                  f"{r.reverse_kl_se:.3f} | {r.forward_kl:.3f} +- {r.forward_kl_se:.3f} | {r.distinct_2:.2f} | "
                  f"{r.ifeval_strict:.2f} +- {r.ifeval_se:.2f} |" for r in rows]
    if "sft" in results:
        end = results["sft"][-1]
        lines += ["", f"Steps to reach SFT's end point (reverse KL {end.reverse_kl:.3f}, IFEval "
                      f"{end.ifeval_strict:.2f}), at checkpoint granularity:", "",
                  "| method | reverse KL <= SFT end | IFEval >= SFT end |", "|---|---|---|"]
        lines += [f"| {m} | {steps_to_reach(rows, end, 'reverse_kl')} | {steps_to_reach(rows, end, 'ifeval')} |"
                  for m, rows in results.items()]
    return "\n".join(lines)


def plot(results: dict[str, list[Checkpoint]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for method, rows in results.items():
        steps, toks = [r.step for r in rows], [r.sampled_tokens for r in rows]
        rkl, se = [r.reverse_kl for r in rows], [r.reverse_kl_se for r in rows]
        axes[0].errorbar(steps, rkl, yerr=se, marker="o", capsize=3, label=method)
        axes[1].errorbar(toks, rkl, yerr=se, marker="o", capsize=3, label=method)
        axes[2].errorbar(steps, [r.ifeval_strict for r in rows], yerr=[r.ifeval_se for r in rows], marker="o",
                         capsize=3, label=method)
    for ax, (x, y) in zip(axes, [("gradient steps", "held-out reverse KL (nats/token)"),
                                 ("sampled tokens", "held-out reverse KL (nats/token)"),
                                 ("gradient steps", "IFEval prompt strict (held-out)")], strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, field in BenchConfig.model_fields.items():
        if name in ("methods", "tiny"):
            continue
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default,
                        help=field.description)
    ap.add_argument("--methods", default="opd,sft,rl")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (smoke test; numbers meaningless)")
    args = vars(ap.parse_args())
    args["methods"] = tuple(args["methods"].split(","))
    cfg = BenchConfig(**args)
    logging.basicConfig(level=logging.WARNING)
    cfg.out.mkdir(parents=True, exist_ok=True)
    print(f"config: {cfg.model_dump_json()}", flush=True)

    started = time.perf_counter()
    s = build_setup(cfg)
    base = new_student(s)
    step0 = evaluate_checkpoint(s, base, "base", 0, 0, 0.0)
    del base
    results: dict[str, list[Checkpoint]] = {}
    for method in cfg.methods:
        tracker = Tracker(s, method, step0)
        RUNNERS[method](s, tracker)
        results[method] = tracker.rows
        gc.collect()
    report = table(results)
    (cfg.out / "results.json").write_text(json.dumps(
        {"config": json.loads(cfg.model_dump_json()), "teacher": str(s.teacher_dir), "student": str(s.student_dir),
         "wall_s": time.perf_counter() - started,
         "results": {m: [asdict(r) for r in rows] for m, rows in results.items()}}, indent=1))
    (cfg.out / "table.md").write_text(report + "\n")
    plot(results, cfg.out / "distill.png")
    print(report)
    print(f"wrote {cfg.out}/results.json, table.md, distill.png; wall {time.perf_counter() - started:.0f} s")
    if "opd" in results and "sft" in results:
        print(f"OPD final reverse KL / SFT final reverse KL: "
              f"{results['opd'][-1].reverse_kl / results['sft'][-1].reverse_kl:.3f}")
        print(f"{results['opd'][-1].reverse_kl / results['sft'][-1].reverse_kl:.3f}")


if __name__ == "__main__":
    main()
