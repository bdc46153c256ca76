"""What cross-tokenizer scoring costs on top of the teacher's forward pass: (bare tokens/s) vs (with re-rendering,
alignment and projection), printed, not gated.

Bare = `completion_logprobs` of the teacher on its own (prompt, completion) token ids, in batches, prepared before
timing. Cross = the same batches starting from what the scorer has: the student's completion ids and the prompt
as the student rendered it (`CrossTokenizer.view`: parse, re-render in the teacher's template, decode the student's
ids incrementally, tokenize with the teacher, align), then the forward pass, then `view.project`. Completions are
random texts (prose words, accents, emoji, CJK, whitespace runs) tokenized by the student, with its stop token.
Rounds alternate which side runs first; the last line is the median ratio (cross tokens/s) / (bare tokens/s).

    .venv/bin/python bench/cross_tokenizer_cost.py              # tiny student/teacher tokenizers + tiny teacher
    .venv/bin/python bench/cross_tokenizer_cost.py --real       # SmolLM2 tokenizer -> Gemma 3 270M teacher
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from model_runtime.gemma import ensure_gemma, tiny_gemma_tokenizer
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import ensure_teacher, load_model, load_tokenizer
from model_runtime.tiny import build_tokenizer, tiny_config
from model_runtime.xtok import CrossTokenizer

WORDS = ["the", "sea", "waves", "salt", "wind", "answer", "colour", "network", "travel", "music", "done", "JSON",
         "naïve", "café", "über", "😀", "🚀", "日本語", "中文", "42", "3.14", "\n", "\n\n", "  ", ",", "."]
PROMPTS = ["Write a short poem about the sea.", "List two colours and one animal in JSON.",
           "Explain a neural network in one paragraph.", "Summarise: the quick brown fox jumps over the lazy dog."]


def completion_texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join((" " if rng.random() < 0.8 else "") + rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
            for _ in range(n)]


def models(real: bool):
    if real:
        teacher_dir = ensure_gemma()
        return load_tokenizer(ensure_teacher()), load_tokenizer(teacher_dir), load_model(teacher_dir)
    from transformers import LlamaForCausalLM

    student_tok, teacher_tok = build_tokenizer(), tiny_gemma_tokenizer()
    torch.manual_seed(0)
    return student_tok, teacher_tok, LlamaForCausalLM(tiny_config(len(teacher_tok))).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="SmolLM2's tokenizer as the student, Gemma 3 270M as teacher")
    ap.add_argument("-n", type=int, default=64, help="trajectories per round")
    ap.add_argument("--words", type=int, default=80, help="words per completion (at most)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    student_tok, teacher_tok, teacher = models(args.real)
    xt = CrossTokenizer(student_tok, teacher_tok)
    stop = sorted(xt.student_stop_ids)[0]
    rows = []
    for k, text in enumerate(completion_texts(args.n, args.words)):
        prompt = student_tok.apply_chat_template([{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                                                 tokenize=False, add_generation_prompt=True)
        ids = student_tok.encode(text, add_special_tokens=False, split_special_tokens=True) + [stop]
        rows.append((prompt, ids))
    views = [xt.view(ids, rendered_prompt=prompt) for prompt, ids in rows]  # warm-up and the bare side's input
    pad = teacher_tok.pad_token_id
    batches = [list(range(i, min(i + args.batch, len(rows)))) for i in range(0, len(rows), args.batch)]
    teacher_tokens = sum(len(v.completion_ids) for v in views)

    @torch.no_grad()
    def bare() -> float:
        t = time.perf_counter()
        for idx in batches:
            completion_logprobs(teacher, [views[i].prompt_ids for i in idx], [views[i].completion_ids for i in idx], pad)
        return time.perf_counter() - t

    @torch.no_grad()
    def cross() -> tuple[float, float]:
        t, align = time.perf_counter(), 0.0
        for idx in batches:
            a0 = time.perf_counter()
            vs = [xt.view(rows[i][1], rendered_prompt=rows[i][0]) for i in idx]
            align += time.perf_counter() - a0
            scored = completion_logprobs(teacher, [v.prompt_ids for v in vs], [v.completion_ids for v in vs], pad)
            a1 = time.perf_counter()
            for v, s in zip(vs, scored, strict=True):
                v.project(s.logprobs_C)
            align += time.perf_counter() - a1
        return time.perf_counter() - t, align

    bare()
    ratios, aligns = [], []
    for r in range(args.rounds):
        if r % 2:
            (c, a), b = cross(), bare()
        else:
            b = bare()
            c, a = cross()
        ratios.append(b / c)
        aligns.append(a)
        print(f"round {r}: bare {teacher_tokens / b:,.0f} teacher tok/s, cross {teacher_tokens / c:,.0f} tok/s, "
              f"alignment {a / len(rows) * 1e3:.3f} ms/trajectory ({a / c:.1%} of the cross time), ratio {b / c:.3f}")
    student_tokens = sum(len(ids) for _, ids in rows)
    print(f"{'real: SmolLM2 -> Gemma 3 270M' if args.real else 'tiny'}: {len(rows)} trajectories, {student_tokens} "
          f"student / {teacher_tokens} teacher completion tokens, batch {args.batch}; median alignment "
          f"{statistics.median(aligns) / len(rows) * 1e3:.3f} ms/trajectory")
    print(f"cross-tokenizer / bare throughput (median of {args.rounds}): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
