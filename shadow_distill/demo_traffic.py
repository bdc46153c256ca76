"""Product-like traffic for the demo: prompts, a bounded concurrent client (official `openai` SDK), and the
reverse KL of served traffic read back from the feature store.

Training traffic and evaluation traffic use disjoint topics, so "reverse KL on fresh traffic" is measured on
prompts the nightly run never trained on.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

TEMPLATES = [
    "Give three practical tips about {t}.",
    "Explain {t} to a ten-year-old in a few sentences.",
    "Write a short, friendly paragraph about {t}.",
    "What are two common mistakes people make with {t}, and how can they avoid them?",
]
TRAIN_TOPICS = [
    "saving money", "learning a new language", "staying healthy", "cooking pasta", "planning a trip",
    "writing a resume", "growing tomatoes", "getting better sleep", "starting to run", "keeping a plant alive",
    "organizing a desk", "preparing for an exam", "making coffee", "riding a bicycle", "reading more books",
    "public speaking", "drinking enough water", "cleaning a kitchen", "taking photos with a phone", "walking a dog",
]
EVAL_TOPICS = [
    "learning to swim", "baking bread", "studying history", "painting a room", "writing a letter",
    "brushing your teeth", "choosing a laptop", "visiting a museum", "making friends", "recycling at home",
    "packing a suitcase", "training a puppy", "making tea", "reducing stress", "playing chess", "budgeting",
]
GREEDY_PROMPT = "Give three tips for staying healthy."


def prompts(topics: list[str], n: int) -> list[str]:
    """n prompts cycling through templates x topics (deterministic)."""
    combos = [tpl.format(t=t) for t in topics for tpl in TEMPLATES]
    step = 7 if len(combos) % 7 else 5  # spread consecutive prompts across topics and templates
    return [combos[(i * step) % len(combos)] for i in range(n)]


@dataclass
class TrafficResult:
    sent: int
    ok: int
    errors: list[str]
    seconds: float


def send_chat(base_url: str, api_key: str, model: str, texts: list[str], *, max_tokens: int, temperature: float,
              concurrency: int, seed0: int = 0) -> TrafficResult:
    """Send chat requests with the official client, `concurrency` at a time; count answered choices."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=600)
    errors: list[str] = []

    def one(i: int) -> int:
        try:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": texts[i]}],
                                               max_tokens=max_tokens, temperature=temperature, seed=seed0 + i)
            return len(r.choices)
        except Exception as exc:  # counted and reported: the demo shows failures, it never hides them
            errors.append(f"{type(exc).__name__}: {exc}")
            return 0

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        ok = sum(pool.map(one, range(len(texts))))
    return TrafficResult(len(texts), ok, errors, time.monotonic() - t0)


def greedy_answer(base_url: str, api_key: str, model: str, text: str, max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=600)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                       max_tokens=max_tokens, temperature=0.0, extra_headers={"X-Shadow-Log": "off"})
    return r.choices[0].message.content or ""


def traffic_reverse_kl(store, teacher_id: str, start, end) -> tuple[float, float, int]:
    """Per-token mean of log p_student - log p_teacher on served temperature-1 samples (+- s.e. over requests).

    The behaviour logprobs are the serving policy's own, so this is an on-policy Monte-Carlo estimate of the
    reverse KL of whatever adapter served the window.
    """
    ids = store.scored_ids(teacher_id, start, end)
    rows = [t for t in store.load_scored(ids, teacher_id) if t.sampling.is_untruncated_temperature_one]
    import torch

    from nightly_train.evaluate import token_weighted_mean_and_se

    per = [torch.from_numpy(t.behaviour_logprobs_C - t.teacher.teacher_logprobs_C) for t in rows]
    return token_weighted_mean_and_se(per)
