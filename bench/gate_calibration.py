"""How often does the promotion gate pass a candidate that is not better? Its calibration, measured.

Three parts, each printed as a markdown table (docs/design.md, "Promotion", quotes a run):
1. IFEval non-inferiority (exact, by enumeration, no simulation): the pass rate at the H0 boundary (true drop =
   margin: must be <= alpha), the power for a truly equal candidate, and the MDE, per set size and discordance
   rate; beside it the old rule's pass rate for a candidate that truly loses 10 points (it blocked only a
   significant drop).
2. The sign-flip test's level under symmetric and skewed null differences (simulated).
3. Tiny models over many seeds: the KL rule's pass rate for a candidate identical to the champion, one equal in
   distribution (same weights, independent seeds), and tiny random LoRA noise; with the old point-estimate rule
   ("candidate KL < champion KL") beside it.

    .venv/bin/python bench/gate_calibration.py                 # about 5 minutes on one core (200 seeds)
    .venv/bin/python bench/gate_calibration.py --seeds 40 --skip-models
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nightly_train.stats import (  # noqa: E402
    equal_candidate_power,
    mcnemar_exact_p,
    noninferiority_mde,
    noninferiority_rejection_rate,
    sign_flip_test,
)

ALPHA, MARGIN = 0.05, 0.05


def old_rule_pass_rate(n: int, p_b: float, p_c: float, alpha: float) -> float:
    """The old IFEval rule (block only when exact McNemar P(X >= b) < alpha): P(pass), exact enumeration."""
    import math

    total, psi = 0.0, p_b + p_c
    for k in range(n + 1):
        pk = math.comb(n, k) * psi ** k * (1 - psi) ** (n - k)
        if pk < 1e-15:
            continue
        for b in range(k + 1):
            pb = math.comb(k, b) * (p_b / psi) ** b * (p_c / psi) ** (k - b)
            if not (mcnemar_exact_p(b, k - b) < alpha and b > k - b):
                total += pk * pb
    return total


def part_ifeval() -> None:
    print("\n## 1. IFEval non-inferiority (margin 0.05, alpha 0.05; exact)\n")
    print("| prompts | discordance | pass rate at true drop = margin | equal candidate passes | MDE (80%) |"
          " old rule passes a true 10-point drop |")
    print("|---|---|---|---|---|---|")
    for n in (20, 40, 240, 541):
        for psi in (0.1, 0.2, 0.3):
            size = noninferiority_rejection_rate(n, (psi + MARGIN) / 2, (psi - MARGIN) / 2, MARGIN, ALPHA)
            power = noninferiority_rejection_rate(n, psi / 2, psi / 2, MARGIN, ALPHA)
            old = old_rule_pass_rate(n, (psi + 0.1) / 2, (psi - 0.1) / 2, ALPHA) if psi >= 0.1 else float("nan")
            approx = equal_candidate_power(n, psi, MARGIN, ALPHA)
            print(f"| {n} | {psi} | {size:.3f} | {power:.3f} (approx {approx:.3f})"
                  f" | {noninferiority_mde(n, psi, ALPHA):.3f} | {old:.3f} |")


def part_sign_flip(reps: int) -> None:
    print(f"\n## 2. Sign-flip level (alpha 0.05, {reps} simulated nights each)\n")
    print("| prompts | null differences | rejection rate |")
    print("|---|---|---|")
    rng = random.Random(0)
    laws = {"normal(0, 1)": lambda: rng.gauss(0, 1), "t3 (heavy tails)": lambda: rng.gauss(0, 1) / max(
        1e-9, (sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3) ** 0.5),
            "exponential - 1 (skewed, mean 0)": lambda: rng.expovariate(1.0) - 1.0}
    for n in (8, 16):
        for name, draw in laws.items():
            hits = sum(sign_flip_test([draw() for _ in range(n)], ALPHA).significant for _ in range(reps))
            print(f"| {n} | {name} | {hits / reps:.3f} |")


def part_models(seeds: int, k: int, tokens: int) -> None:
    import torch

    from model_runtime.adapters import random_adapter
    from model_runtime.chat import user_prompt_ids
    from model_runtime.models import load_model, load_tokenizer
    from model_runtime.tiny import build_tiny_pair
    from nightly_train.evaluate import evaluate_distillation, student_with_adapter, teacher_reference
    from nightly_train.gate import GatePolicy, sample_rule

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gate-calibration-"))
    teacher_dir, student_dir = build_tiny_pair(tmp / "tiny")
    tok = load_tokenizer(student_dir)
    teacher, student = load_model(teacher_dir), load_model(student_dir)
    texts = ["Write a poem about the sea.", "List two colors and one animal.", "Explain a neural network.",
             "Summarize the text and end with done.", "Give three bullet points about cooking.", "How are you today?",
             "Answer in JSON format please.", "Tell me about music and travel."]
    prompts = [user_prompt_ids(tok, t) for t in texts]
    noise = {f"LoRA noise {s}": student_with_adapter(student_dir,
                                                     random_adapter(student_dir, tmp / f"n{s}", 11, scale=s))
             for s in (0.01, 0.05)}
    policy, counts, t0 = GatePolicy(alpha=ALPHA), {}, time.monotonic()

    def measure(model, seed, ref):
        return evaluate_distillation(model, teacher, tok, prompts, max_tokens=tokens, seed=seed,
                                     samples_per_prompt=k, reference=ref)

    for s in range(seeds):
        ref = teacher_reference(teacher, tok, prompts, samples_per_prompt=k, max_tokens=tokens, seed=1000 * s)
        champ = measure(student, 1000 * s, ref)
        candidates = {"identical (same seeds)": measure(student, 1000 * s, ref),
                      "equal in distribution (independent seeds)": measure(student, 1000 * s + 500, ref),
                      **{name: measure(m, 1000 * s, ref) for name, m in noise.items()}}
        for name, cand in candidates.items():
            c = counts.setdefault(name, [0, 0])
            c[0] += sample_rule("kl", policy, cand.per_prompt_reverse_kl, champ.per_prompt_reverse_kl).passed
            c[1] += cand.reverse_kl < champ.reverse_kl
    print(f"\n## 3. Tiny models, {seeds} seeds ({len(prompts)} prompts x {k} samples x {tokens} tokens; "
          f"{time.monotonic() - t0:.0f} s)\n")
    print("| candidate | KL rule passes | old rule (point estimates) passes |")
    print("|---|---|---|")
    for name, (new, old) in counts.items():
        print(f"| {name} | {new / seeds:.3f} | {old / seeds:.3f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--reps", type=int, default=2000, help="simulated nights per sign-flip row")
    p.add_argument("--skip-models", action="store_true")
    args = p.parse_args(argv)
    part_ifeval()
    part_sign_flip(args.reps)
    if not args.skip_models:
        part_models(args.seeds, args.samples, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
