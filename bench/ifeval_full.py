"""IFEval on the public 541 prompts: teacher vs untrained student vs a trained candidate, greedy, one run.

The nightly gate runs IFEval on a small seeded subset; this is the full-size check of how much instruction
following the layer-dropped student lost and how much a candidate adapter won back. Every model answers the
same prompts with the same greedy decoding (`nightly_train.evaluate.greedy_generate_fn`, chat template), and
`nightly_train.ifeval.score` gives the four canonical metrics (prompt-level and instruction-level, strict and
loose; instruction level = passes / all instructions of the set). The last line is the ratio of each
student's prompt-level strict accuracy to the teacher's.

    .venv/bin/python bench/ifeval_full.py --subset 40 --max-tokens 64              # quick: about 20 min on 2 cores
    .venv/bin/python bench/ifeval_full.py --subset 541 --max-tokens 512 \\
        --candidate-adapter <runs_dir>/<interval>/train/adapter --out ifeval.json  # full set: many hours on CPU
    .venv/bin/python bench/ifeval_full.py --tiny --subset 8 --max-tokens 8          # plumbing check, seconds

The IFEval file defaults to /work/shared/data/ifeval/input_data.jsonl where it exists (never committed to
the project), else to the project's own small instruction-following set.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model_runtime.models import load_model, load_tokenizer
from nightly_train import ifeval
from nightly_train.evaluate import greedy_generate_fn

SHARED_IFEVAL = Path("/work/shared/data/ifeval/input_data.jsonl")
METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    base_dir: Path
    adapter_dir: Path | None = None


@dataclass(frozen=True)
class Outcome:
    name: str
    result: ifeval.IFEvalResult
    seconds: float
    sample_answer: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ifeval-path", type=Path, default=SHARED_IFEVAL if SHARED_IFEVAL.exists() else None,
                   help="IFEval JSONL (default: the shared 541-prompt file if present, else the project's demo set)")
    p.add_argument("--subset", type=int, default=40, help="seeded subset size; 541 = the whole public set")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy answer length cap")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the host is shared)")
    p.add_argument("--teacher-dir", type=Path, help="default: the SmolLM2 teacher")
    p.add_argument("--student-dir", type=Path, help="default: the layer-dropped student")
    p.add_argument("--candidate-adapter", type=Path, help="a trained LoRA adapter folder for the student")
    p.add_argument("--tiny", action="store_true", help="tiny random models (plumbing only)")
    p.add_argument("--out", type=Path, help="write every result (with per-prompt passes) as JSON")
    args = p.parse_args(argv)
    if args.subset < 1 or args.max_tokens < 1 or args.batch_size < 1:
        p.error("--subset, --max-tokens and --batch-size must be >= 1")
    if args.candidate_adapter is not None and not args.candidate_adapter.is_dir():
        p.error(f"--candidate-adapter {args.candidate_adapter} is not a folder")
    return args


def model_specs(args: argparse.Namespace, workdir: Path) -> list[ModelSpec]:
    teacher_dir, student_dir = args.teacher_dir, args.student_dir
    if teacher_dir is None or student_dir is None:
        from shadow_distill.models_setup import resolve_models

        default_teacher, default_student = resolve_models(tiny=args.tiny, workdir=workdir)
        teacher_dir, student_dir = teacher_dir or default_teacher, student_dir or default_student
    specs = [ModelSpec("teacher", teacher_dir), ModelSpec("student (untrained)", student_dir)]
    if args.candidate_adapter is not None:
        specs.append(ModelSpec("candidate", student_dir, args.candidate_adapter))
    return specs


def load(spec: ModelSpec):
    model = load_model(spec.base_dir)
    if spec.adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, spec.adapter_dir).eval()


def run_one(spec: ModelSpec, prompts: list[ifeval.IFEvalPrompt], max_tokens: int, batch_size: int) -> Outcome:
    tok, model = load_tokenizer(spec.base_dir), load(spec)
    t0 = time.perf_counter()
    answers = greedy_generate_fn(model, tok, max_tokens, batch_size)([p.prompt for p in prompts])
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    return Outcome(spec.name, ifeval.score(prompts, answers), seconds, answers[0])


def table(outcomes: list[Outcome]) -> str:
    head = f"{'model':<20}" + "".join(f"{m:>20}" for m in METRICS) + f"{'gen s':>9}"
    rows = [f"{o.name:<20}" + "".join(f"{getattr(o.result, m):>20.4f}" for m in METRICS) + f"{o.seconds:>9.0f}"
            for o in outcomes]
    return "\n".join([head, "-" * len(head), *rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = ifeval.load_prompts(args.ifeval_path, subset=args.subset, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="ifeval-bench-") as tmp:
        outcomes = run_all(args, prompts, model_specs(args, Path(tmp)))
    print(table(outcomes))
    if args.out is not None:
        args.out.write_text(json.dumps({o.name: {"seconds": o.seconds, **o.result.to_dict()} for o in outcomes},
                                       indent=1))
    teacher = outcomes[0].result.prompt_strict
    ratios = ", ".join(f"{o.name} {o.result.prompt_strict / teacher:.3f}" if teacher else f"{o.name} n/a"
                       for o in outcomes[1:])
    print(f"prompt-strict ratio to the teacher: {ratios}")


def run_all(args: argparse.Namespace, prompts: list[ifeval.IFEvalPrompt], specs: list[ModelSpec]) -> list[Outcome]:
    n_instr = sum(len(p.instruction_id_list) for p in prompts)
    print(f"IFEval: {len(prompts)} prompts, {n_instr} instructions from {args.ifeval_path or 'the demo set'}; "
          f"greedy, max {args.max_tokens} tokens")
    if args.candidate_adapter is None:
        print("no --candidate-adapter given: scoring the teacher and the untrained student only")
    outcomes = []
    for spec in specs:
        outcomes.append(run_one(spec, prompts, args.max_tokens, args.batch_size))
        o = outcomes[-1]
        print(f"  {o.name}: prompt strict {o.result.prompt_strict:.4f} in {o.seconds:.0f} s; "
              f"first answer {o.sample_answer[:100]!r}", flush=True)
    return outcomes


if __name__ == "__main__":
    main()
