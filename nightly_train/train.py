"""The on-policy distillation loop: LoRA on the student, trained on its own logged tokens scored by the teacher.

Each optimizer step sums, over `grad_accum` micro-batches, the losses of up to four sources (token-weighted):
  logged rule-1 rows   -> importance-sampled reverse-KL advantage (Tinker's on-policy distillation)
  logged rule-2 rows   -> analytic reverse KL (or generalized JSD) over the teacher's stored top-k
  fresh rollouts       -> rule 1 exactly on-policy: sampled now from the adapter at temperature 1, scored by
                          the in-process teacher (so r_t starts at 1)
  GKD teacher samples  -> full-vocabulary reverse KL on teacher-generated states (cold start), mixed in with
                          probability 1 - lambda(step)
Checkpoints (adapter + optimizer, safetensors) every `checkpoint_every` steps; a killed run resumes from the
last one and, because data order and rollouts are seeded by (seed, epoch, step), ends with the same adapter.

    python -m nightly_train.pipeline run --config nightly.json     # or the Airflow DAG, which calls the same code
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model_runtime.adapters import save_adapter
from model_runtime.logprobs import completion_logits, token_logprobs
from model_runtime.models import ModelMeta, eos_token_ids, load_model, load_tokenizer, pick_device
from model_runtime.sampling import DecodeParams, sample
from nightly_train.config import TrainConfig
from nightly_train.data import Example, epoch_order, pad_right
from nightly_train.distributed import Ranks
from nightly_train.layout import checkpoints_dir, trained_adapter_dir
from nightly_train.losses import full_reverse_kl, generalized_jsd, masked_mean, sampled_token_loss, topk_reverse_kl
from nightly_train.teacher_bridge import TeacherBridge

MetricsFn = Callable[[int, dict[str, float]], None]
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)

    def tokens_by_rule(self) -> dict[str, int]:
        """Completion tokens trained on per source over the run (logged rule 1, logged rule 2, rollouts, GKD)."""
        out: dict[str, int] = {}
        for h in self.history:
            for k, v in h.items():
                if k.startswith("tokens."):
                    out[k.removeprefix("tokens.")] = out.get(k.removeprefix("tokens."), 0) + int(v)
        return out


def plan_steps(cfg: TrainConfig, n_examples: int, n_rollout_prompts: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch). Logged examples set the epoch; a night with none (all of its
    traffic greedy without top-k, say) still trains when rollouts can re-sample its prompts, one epoch being one
    pass of `rollouts.per_step` draws over the prompts. Nothing to train on gives 0 steps, never a crash."""
    per_step = cfg.batch_size * cfg.grad_accum
    if n_examples:
        per_epoch = math.ceil(n_examples / per_step)
    elif cfg.rollouts.enabled and n_rollout_prompts:
        per_epoch = math.ceil(n_rollout_prompts / (cfg.rollouts.per_step * cfg.grad_accum))
    else:
        return 0, 0
    total = cfg.epochs * per_epoch
    return (min(total, cfg.max_steps) if cfg.max_steps is not None else total), per_epoch


class Distiller:
    def __init__(self, cfg: TrainConfig, examples: list[Example], rollout_prompts: list[list[int]] | None = None,
                 ranks: Ranks | None = None):
        self.cfg = cfg
        self.examples = examples
        self.ranks = ranks or Ranks.from_env()  # one process, or this rank of a torchrun
        # Rollouts re-sample every logged prompt of the window (the caller passes them; greedy traffic included),
        # by default the prompts of the logged examples.
        self.rollout_prompts = rollout_prompts if rollout_prompts is not None else [e.prompt_ids for e in examples]
        self.device = pick_device(self.ranks.device(cfg.device))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tok = load_tokenizer(cfg.student_dir)
        self.pad_id = self.tok.pad_token_id
        self.base_id = ModelMeta.read(cfg.student_dir).model_id
        torch.manual_seed(cfg.seed)
        base = load_model(cfg.student_dir, self.device, self.dtype)
        self.eos = eos_token_ids(self.tok, base)
        if cfg.init_adapter is not None:
            self.model = PeftModel.from_pretrained(base, cfg.init_adapter, is_trainable=True)
        else:
            lora = cfg.lora
            self.model = get_peft_model(base, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                         target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        self.teacher = load_model(cfg.teacher_dir, self.device, self.dtype) if cfg.teacher_dir else None
        # The in-process teacher (rollouts, GKD) through the tokenizers: re-rendered over spans when they differ.
        self.bridge = TeacherBridge(self.teacher, self.tok, load_tokenizer(cfg.teacher_dir),
                                    student_stop_ids=self.eos) if self.teacher is not None else None
        self.gkd_enabled = cfg.gkd.enabled
        if self.gkd_enabled and self.bridge is not None and self.bridge.cross:
            log.warning("GKD is off: it compares full next-token distributions, which a teacher with another "
                        "tokenizer does not share with the student (rule 1 and rollouts train on span advantages)")
            self.gkd_enabled = False
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.total_steps, self.steps_per_epoch = plan_steps(cfg, len(examples), len(self.rollout_prompts))

    # ---- data ---------------------------------------------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> list[Example]:
        if not self.examples:
            return []
        cfg = self.cfg
        flat = step * cfg.grad_accum + micro
        per_epoch = self.steps_per_epoch * cfg.grad_accum
        epoch, index = divmod(flat, per_epoch)
        order = epoch_order(len(self.examples), cfg.seed, epoch)
        chosen = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
        return [self.examples[i] for i in chosen]

    # ---- losses per source (each returns (sum of per-token losses, tokens, metrics)) ------------------------
    def logged_loss(self, batch: list[Example]) -> tuple[torch.Tensor, int, dict[str, float]]:
        cl = completion_logits(self.model, [e.prompt_ids for e in batch], [e.completion_ids for e in batch], self.pad_id)
        mask_BC = cl.mask_BC
        width = mask_BC.shape[1]
        rule1_B = torch.tensor([e.rule == "sampled_is" for e in batch], device=self.device)
        total, metrics = torch.zeros((), device=self.device), {}
        m1 = mask_BC & rule1_B[:, None]
        if m1.any():
            new_lp_BC = token_logprobs(cl.logits_BCV, cl.completion_ids_BC)
            behaviour_BC = pad_right([e.behaviour_lp_C for e in batch], width).to(self.device)
            teacher_BC = pad_right([e.teacher_lp_C for e in batch], width).to(self.device)
            spans_BC = None
            if any(e.span_id_C is not None for e in batch):  # a teacher of another tokenizer scored spans
                spans_BC = pad_right([e.spans() for e in batch], width).to(self.device)
            imp = self.cfg.importance
            loss, st = sampled_token_loss(new_lp_BC, behaviour_BC, teacher_BC, m1, coef=self.cfg.kl_penalty_coef,
                                          mode=imp.mode, ratio_max=imp.ratio_max, clip_eps=imp.clip_eps,
                                          span_id_BC=spans_BC)
            total = total + loss * m1.sum()
            metrics.update({"advantage_mean": st.advantage_mean, "ratio_mean": st.ratio_mean,
                            "ratio_max": st.ratio_max, "clipped_fraction": st.clipped_fraction,
                            "tokens.sampled_is": float(m1.sum()),
                            "sampled_reverse_kl": float(masked_mean(new_lp_BC.detach() - teacher_BC, m1))})
        m2 = mask_BC & ~rule1_B[:, None]
        if m2.any():
            rows = [b for b, e in enumerate(batch) if e.rule == "topk_analytic"]
            ids_BCK = pad_right([batch[b].topk_ids_CK for b in rows], width).long().to(self.device)
            lp_BCK = pad_right([batch[b].topk_lp_CK for b in rows], width, fill=-1e4).to(self.device)
            logits = cl.logits_BCV[rows]
            if self.cfg.loss == "topk_jsd":
                loss = generalized_jsd(logits, ids_BCK, lp_BCK, m2[rows], self.cfg.jsd_beta)
            else:
                loss = topk_reverse_kl(logits, ids_BCK, lp_BCK, m2[rows])
            total = total + loss * m2.sum()
            metrics.update({"topk_loss": loss.item(), "tokens.topk_analytic": float(m2.sum())})
        return total, int(mask_BC.sum()), metrics

    def _pick_prompts(self, step: int, micro: int, n: int, salt: int) -> tuple[list[list[int]], int]:
        if not self.rollout_prompts:
            return [], 0
        g = torch.Generator().manual_seed((self.cfg.seed * 7919 + step * 104_729 + micro * 131 + salt) % 2**62)
        idx = torch.randint(len(self.rollout_prompts), (n,), generator=g).tolist()
        return [self.rollout_prompts[i] for i in idx], int(torch.randint(0, 2**31, (1,), generator=g))

    @torch.no_grad()
    def _generate(self, model, prompts, max_tokens, seeds: list[int]) -> list[list[int]]:
        """Temperature-1 samples, row i seeded by `seeds[i]` (the prompt's index in the global batch, so a rank
        samples exactly what one process would for its rows)."""
        params = [DecodeParams(max_tokens=max_tokens, temperature=1.0, seed=s) for s in seeds]
        was_training = model.training
        model.eval()
        out = sample(model, prompts, params, eos_ids=self.eos, pad_id=self.pad_id)
        model.train(was_training)
        return [r.completion_ids for r in out]

    def rollout_loss(self, step: int, micro: int) -> tuple[torch.Tensor, int, dict[str, float]]:
        cfg = self.cfg.rollouts
        prompts, seed = self._pick_prompts(step, micro, cfg.per_step, salt=1)
        mine = self.ranks.shard(range(len(prompts)))
        prompts = [prompts[i] for i in mine]
        completions = self._generate(self.model, prompts, cfg.max_tokens, [seed + i for i in mine]) if prompts else []
        keep = [i for i, c in enumerate(completions) if c]
        if not keep:
            return torch.zeros((), device=self.device), 0, {}
        scored = self.bridge.score(prompts, completions, temperature=self.cfg.teacher_temperature)
        unaligned = sum(s is None for s in scored)  # a teacher of another tokenizer could not align them
        keep = [i for i, s in enumerate(scored) if s is not None]
        if not keep:
            return torch.zeros((), device=self.device), 0, {"rollout_unaligned": float(unaligned)}
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
        scored = [scored[i] for i in keep]
        cl = completion_logits(self.model, prompts, completions, self.pad_id)
        new_lp_BC = token_logprobs(cl.logits_BCV, cl.completion_ids_BC)
        width = cl.mask_BC.shape[1]
        teacher_BC = pad_right([s.teacher_logprobs_C.numpy() for s in scored], width).to(self.device, torch.float32)
        spans_BC = pad_right([s.span_id_C.numpy() for s in scored], width).to(self.device) if self.bridge.cross else None
        behaviour_BC = new_lp_BC.detach()  # sampled by this very policy: exactly on-policy, w = 1
        loss, _ = sampled_token_loss(new_lp_BC, behaviour_BC, teacher_BC, cl.mask_BC, coef=self.cfg.kl_penalty_coef,
                                     mode="none", span_id_BC=spans_BC)
        n = int(cl.mask_BC.sum())
        return loss * n, n, {"rollout_reverse_kl": float(masked_mean(behaviour_BC - teacher_BC, cl.mask_BC)),
                             "tokens.rollout": float(n), "rollout_unaligned": float(unaligned)}

    def gkd_loss(self, step: int, micro: int) -> tuple[torch.Tensor, int, dict[str, float]]:
        cfg = self.cfg.gkd
        frac = step / max(self.total_steps - 1, 1)
        lam = cfg.lambda_start + (cfg.lambda_end - cfg.lambda_start) * frac
        prompts, seed = self._pick_prompts(step, micro, cfg.per_step, salt=2)
        if not prompts:
            return torch.zeros((), device=self.device), 0, {"gkd_lambda": lam}
        g = torch.Generator().manual_seed(seed)
        on_policy = torch.rand(len(prompts), generator=g) < lam
        completions = [None] * len(prompts)
        mine = self.ranks.shard(range(len(prompts)))
        for source, flag in ((self.model, True), (self.teacher, False)):
            rows = [i for i in mine if bool(on_policy[i]) == flag]
            if rows:
                for i, c in zip(rows, self._generate(source, [prompts[i] for i in rows], cfg.max_tokens,
                                                     [seed + i for i in rows])):
                    completions[i] = c
        keep = [i for i, c in enumerate(completions) if c]
        if not keep:
            return torch.zeros((), device=self.device), 0, {"gkd_lambda": lam}
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
        cl = completion_logits(self.model, prompts, completions, self.pad_id)
        with torch.no_grad():
            t_logits = completion_logits(self.teacher, prompts, completions, self.pad_id).logits_BCV
        loss = full_reverse_kl(cl.logits_BCV, t_logits, cl.mask_BC, self.cfg.teacher_temperature)
        n = int(cl.mask_BC.sum())
        return loss * n, n, {"gkd_lambda": lam, "gkd_reverse_kl": loss.item(), "tokens.gkd": float(n)}

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        ckpt = checkpoints_dir(self.cfg.output_dir) / f"step-{step:06d}"
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        save_adapter(self.model, tmp / "adapter", self.base_id)
        state = self.opt.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": state["param_groups"]}))
        tmp.rename(ckpt)  # a checkpoint exists only once it is complete
        return ckpt

    def resume(self) -> int:
        root = checkpoints_dir(self.cfg.output_dir)
        done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp")) if root.exists() else []
        if not done:
            return 0
        last = done[-1]
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, load_file(last / "adapter" / "adapter_model.safetensors"))
        meta = json.loads((last / "state.json").read_text())
        flat = load_file(last / "optimizer.safetensors")
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            i, name = key.split(".", 1)
            per_param.setdefault(int(i), {})[name] = value
        self.opt.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
        return int(meta["step"])

    # ---- the loop -----------------------------------------------------------------------------------------
    TOKEN_KEYS = ("tokens.sampled_is", "tokens.topk_analytic", "tokens.rollout", "tokens.gkd")

    def micro_step(self, step: int, micro: int) -> tuple[float, int, dict[str, float]]:
        """Backward of this rank's share of one micro-batch; returns (global mean loss, global tokens, metrics).

        Each rank's per-token loss sum is divided by the *global* token count and the gradients are summed over
        ranks after the last micro-batch, so the update equals one process's on the whole global batch."""
        cfg, ranks = self.cfg, self.ranks
        parts = []
        batch = ranks.shard(self.micro_batch(step, micro))
        if batch:
            parts.append(self.logged_loss(batch))
        if cfg.rollouts.enabled:
            parts.append(self.rollout_loss(step, micro))
        if self.gkd_enabled:
            parts.append(self.gkd_loss(step, micro))
        n_global = int(ranks.sum(sum(n for _, n, _ in parts)))
        metrics: dict[str, float] = {}
        for _, _, m in parts:
            metrics.update(m)
        local_tokens = [metrics.pop(k, 0.0) for k in self.TOKEN_KEYS]  # summed over ranks, in a fixed order
        summed = [ranks.sum(v) for v in local_tokens]
        metrics.update({k: v for k, v in zip(self.TOKEN_KEYS, summed) if v})
        if n_global == 0:
            return 0.0, 0, metrics
        local = sum((total for total, n, _ in parts if n), torch.zeros((), device=self.device))
        if local.requires_grad:
            (local / n_global / cfg.grad_accum).backward()
        return ranks.sum(float(local.detach())) / n_global, n_global, metrics

    def run(self, log_metrics: MetricsFn | None = None, progress: bool = True) -> TrainResult:
        cfg, ranks = self.cfg, self.ranks
        start = self.resume()
        history = []
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        bar = tqdm(range(start, self.total_steps), initial=start, total=self.total_steps, desc="distill",
                   disable=not (progress and ranks.is_main))
        for step in bar:
            t0 = time.perf_counter()
            metrics: dict[str, float] = {}
            tokens_total = 0
            for micro in range(cfg.grad_accum):
                loss, n_tokens, micro_metrics = self.micro_step(step, micro)
                if n_tokens == 0:
                    continue
                tokens_total += n_tokens
                metrics["loss"] = metrics.get("loss", 0.0) + loss / cfg.grad_accum
                for name, value in micro_metrics.items():  # token counts add up over micro-batches; the rest last
                    metrics[name] = metrics.get(name, 0.0) + value if name.startswith("tokens.") else value
            ranks.sum_gradients(trainable)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            metrics.update({"grad_norm": float(grad_norm), "tokens": float(tokens_total),
                            "tokens_per_s": tokens_total / max(time.perf_counter() - t0, 1e-9)})
            history.append({"step": step + 1, **metrics})
            if log_metrics and ranks.is_main:
                log_metrics(step + 1, metrics)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
            log.info("step %d/%d loss %.4f sampled_rkl %.4f rollout_rkl %.4f tokens/s %.0f", step + 1,
                     self.total_steps, metrics.get("loss", float("nan")), metrics.get("sampled_reverse_kl", float("nan")),
                     metrics.get("rollout_reverse_kl", float("nan")), metrics["tokens_per_s"])
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < self.total_steps:
                if ranks.is_main:
                    self.save_checkpoint(step + 1)
                ranks.barrier()  # every rank resumes from the same checkpoint
        adapter_dir = trained_adapter_dir(cfg.output_dir)
        if ranks.is_main:
            save_adapter(self.model, adapter_dir, self.base_id)
        ranks.barrier()
        return TrainResult(adapter_dir=adapter_dir, steps=self.total_steps, history=history)
