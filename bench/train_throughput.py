"""What the trainer's bookkeeping costs: `Distiller.run` tokens/s vs a bare LoRA forward+backward loop, one run.

Trainer = `nightly_train.train.Distiller.run` on logged rule-1 examples (temperature-1 student samples with
their behaviour logprobs and the teacher's logprobs; no rollouts, no teacher in the loop). Bare = the least a
LoRA step can do on the same batches (`Distiller.micro_batch`, so identical token ids): `completion_logits`
-> `token_logprobs` -> token-mean NLL -> backward -> AdamW step, same LoRA config, same base weights.

After a warm-up of each, rounds alternate ABBA (trainer, bare, bare, trainer, ...) so load drift on the
shared host hits both alike. The last line is the median over rounds of trainer tokens/s over bare tokens/s
(the pooled ratio is printed too; a burst of load from other users skews a pooled ratio); target >= 0.8.

    .venv/bin/python bench/train_throughput.py                 # tiny models, well under a minute
    .venv/bin/python bench/train_throughput.py --real          # SmolLM2 student: 8 x 64-token rows x 6 steps
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from _common import model_pair, sample_rollouts
from model_runtime.logprobs import completion_logits, completion_logprobs, token_logprobs
from model_runtime.models import load_model, load_tokenizer
from nightly_train.config import TrainConfig
from nightly_train.data import Example
from nightly_train.losses import masked_mean
from nightly_train.train import Distiller


def logged_examples(teacher_dir: Path, student_dir: Path, n: int, tokens: int) -> list[Example]:
    """Rule-1 examples as the feature store would hand them over: student samples + teacher logprobs."""
    rollouts = sample_rollouts(student_dir, n, min_tokens=tokens, max_tokens=tokens)
    teacher = load_model(teacher_dir)
    pad_id = load_tokenizer(teacher_dir).pad_token_id
    rollouts = [r for r in rollouts if r.completion_ids]
    scored = completion_logprobs(teacher, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                                 pad_id)
    return [Example(trajectory_id=f"bench-{i}", rule="sampled_is", prompt_ids=r.prompt_ids,
                    completion_ids=r.completion_ids, behaviour_lp_C=np.asarray(r.behaviour_logprobs, np.float32),
                    teacher_lp_C=s.logprobs_C.numpy(), topk_ids_CK=None, topk_lp_CK=None, staleness=0)
            for i, (r, s) in enumerate(zip(rollouts, scored, strict=True))]


class BareLoop:
    """The plain LoRA loop on the trainer's own batches."""

    def __init__(self, cfg: TrainConfig, distiller: Distiller):
        torch.manual_seed(cfg.seed)
        lora = cfg.lora
        self.model = get_peft_model(load_model(cfg.student_dir), LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.learning_rate)
        self.distiller, self.pad_id = distiller, distiller.pad_id

    def run(self, steps: int) -> tuple[int, float]:
        tokens, started = 0, time.perf_counter()
        for step in range(steps):
            batch = self.distiller.micro_batch(step, 0)
            cl = completion_logits(self.model, [e.prompt_ids for e in batch], [e.completion_ids for e in batch],
                                   self.pad_id)
            loss = -masked_mean(token_logprobs(cl.logits_BCV, cl.completion_ids_BC), cl.mask_BC)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens += int(cl.mask_BC.sum())
        return tokens, time.perf_counter() - started


def trainer_pass(distiller: Distiller) -> tuple[int, float]:
    """One `Distiller.run` (it restarts at step 0 each call: no checkpoint is written in between)."""
    started = time.perf_counter()
    result = distiller.run(progress=False)
    return int(sum(h["tokens"] for h in result.history)), time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="SmolLM2 student (layer-dropped) instead of tiny models")
    ap.add_argument("--drop-layers", default="auto", help="with --real: the student's dropped layers ('auto', '8,21')")
    ap.add_argument("--rows", type=int, help="trajectories per batch (default 8)", default=8)
    ap.add_argument("--tokens", type=int, help="completion tokens per trajectory (default 64)", default=64)
    ap.add_argument("--steps", type=int, help="optimizer steps per pass (default 6 real, 20 tiny)")
    ap.add_argument("--rounds", type=int, default=4, help="timed passes of each side (ABBA order)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    steps = args.steps or (6 if args.real else 20)

    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir, student_dir = model_pair(args.real, Path(tmp), drop_layers=args.drop_layers)
        examples = logged_examples(teacher_dir, student_dir, args.rows * 2, args.tokens)
        cfg = TrainConfig(student_dir=student_dir, teacher_id="bench-teacher", output_dir=Path(tmp) / "run",
                          batch_size=args.rows, epochs=steps, max_steps=steps, checkpoint_every=10**6,
                          device="cpu", learning_rate=1e-5)
        distiller = Distiller(cfg, examples)
        bare = BareLoop(cfg, distiller)
        trainer_pass(distiller)  # warm-up of both sides, not timed
        bare.run(steps)
        totals = {"trainer": [0, 0.0], "bare": [0, 0.0]}
        round_ratios = []
        for rnd in range(args.rounds):
            order = ("trainer", "bare") if rnd % 2 == 0 else ("bare", "trainer")
            tps = {}
            for side in order:
                tokens, seconds = trainer_pass(distiller) if side == "trainer" else bare.run(steps)
                totals[side][0] += tokens
                totals[side][1] += seconds
                tps[side] = tokens / seconds
                print(f"round {rnd} {side:>7}: {tokens} tokens in {seconds:.2f} s = {tps[side]:.0f} tok/s")
            round_ratios.append(tps["trainer"] / tps["bare"])
    trainer_tps = totals["trainer"][0] / totals["trainer"][1]
    bare_tps = totals["bare"][0] / totals["bare"][1]
    print(f"trainer {trainer_tps:.0f} tok/s vs bare LoRA fwd+bwd {bare_tps:.0f} tok/s "
          f"({'SmolLM2 student' if args.real else 'tiny'}, {args.rows} x {args.tokens}-token rows x {steps} steps "
          f"x {args.rounds} rounds): pooled ratio {trainer_tps / bare_tps:.3f}; per-round ratios "
          f"{' '.join(f'{r:.3f}' for r in round_ratios)}; last line: their median (robust to load bursts), "
          "target >= 0.8")
    print(f"{float(np.median(round_ratios)):.3f}")


if __name__ == "__main__":
    main()
