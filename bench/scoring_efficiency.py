"""What the scorer service costs on top of the teacher's forward pass: end-to-end vs bare tokens/s, one run.

End to end = the real `ScoringService` (Kafka poll -> decode -> land in the sqlite feature store -> offset commit
-> teacher on the landed backlog -> scores written) on a Tansu broker this bench starts. Bare = `EmbeddedTeacher.score` alone on the
very batches the service formed (a recording wrapper around the teacher keeps them). The trajectories are real
student samples (temperature 1, varied prompts and completion lengths), produced before timing starts.

Per round: a fresh topic and sqlite file, the service joins its group (not timed), the trajectories are sent,
then (after `SETTLE_S`, the broker's fetch wake-up) the service is timed from its first poll until the last
message is scored; the bare teacher then re-scores that round's batches. The tiny default is 1024 trajectories,
four polls of 256: the scorer overlaps a poll's landing with the previous page's forward, which a one-poll
burst (the old default, 256) cannot show: there every scorer lands its first poll before it has anything to
score, a fixed cost that a stream pays once. Several rounds alternate which side runs first in the round, so drift of
the shared host hits both. The last line is the median over rounds of (end-to-end tokens/s) / (bare
tokens/s) (the pooled ratio is printed too; a load burst from other users skews it); target >= 0.85.
Each round also prints the scorer's own cost per trajectory, (service seconds - bare seconds) / trajectories:
the time a trajectory costs beyond its teacher forward, which is what caps a scorer next to a fast teacher.

`--cross-tokenizer` prices a teacher of another model family: the service scores through `CrossTokenizerTeacher`
(re-render in the teacher's template, tokenize, align spans, project) and the bare side is the wrapped teacher's
forward alone on the very views' teacher ids (built beforehand, untimed). The teacher is the tiny Gemma-like one
(`--real`: Gemma 3 270M, scoring SmolLM2's samples). A random tiny model samples random bytes, which no other
tokenizer can align, so the tiny run's completions are the student tokenizer's encoding of real prompt texts;
unalignable samples of `--real` are counted and left out before timing. The trajectories are v2, as serving writes
them (messages, texts, offsets). Target >= 0.85.

`--null-teacher` measures that ceiling directly: the same service with a teacher that answers at once (zero
logprobs, no model), so the time is the scorer's own (poll, CRC check, decode, land, commit, backlog query,
score rows, write). It prints trajectories/s; its last line is the median over rounds of ms per trajectory.

    .venv/bin/python bench/scoring_efficiency.py                       # tiny models, about a minute
    .venv/bin/python bench/scoring_efficiency.py --real -n 64 --max-tokens 64   # SmolLM2-135M teacher
    .venv/bin/python bench/scoring_efficiency.py --null-teacher -n 1024         # the scorer's own cost
    .venv/bin/python bench/scoring_efficiency.py --cross-tokenizer              # tiny student, Gemma-like teacher
    .venv/bin/python bench/scoring_efficiency.py --cross-tokenizer --real -n 64  # SmolLM2 -> Gemma 3 270M
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from _common import Rollout, model_pair, sample_rollouts
from feature_store.store import FeatureStore, TeacherScores
from message_bus.broker import TansuBroker
from message_bus.topics import ensure_topics, producer_config
from schemas.trajectory import SamplingParams, TrajectoryV1
from shadow_scoring.config import ScoringConfig
from shadow_scoring.consumer import ScoringService
from shadow_scoring.teacher import EmbeddedTeacher


# Between the last send and the clock's start. Tansu answers a fetch parked at the broker only when its
# fetch_max_wait_ms is up, not when data arrives (Apache Kafka answers at once): a 0-100 ms wait per round that
# is the broker's latency, not work of the scorer's (the poll's CRC check and parsing stay inside the clock).
SETTLE_S = 0.3


class RecordingTeacher:
    """Delegates to the embedded teacher and keeps every batch it was asked to score (same order)."""

    def __init__(self, inner: EmbeddedTeacher):
        self.inner, self.teacher_id, self.vocab_size = inner, inner.teacher_id, inner.vocab_size
        self.tokenizer_fingerprint, self.temperature = inner.tokenizer_fingerprint, inner.temperature
        self.batches: list[list[TrajectoryV1]] = []
        for hook in ("refusal", "seq_len", "prepare", "student_tokenizer_fingerprint"):  # a cross-tokenizer teacher's
            if hasattr(inner, hook):
                setattr(self, hook, getattr(inner, hook))

    def score(self, batch: list[TrajectoryV1], topk: int = 0) -> list[TeacherScores]:
        self.batches.append(list(batch))
        return self.inner.score(batch, topk)


class NullTeacher(RecordingTeacher):
    """The teacher's identity, answering at once with zero logprobs: what the scorer costs without a forward."""

    def score(self, batch: list[TrajectoryV1], topk: int = 0) -> list[TeacherScores]:
        self.batches.append(list(batch))
        out = []
        for t in batch:
            c = len(t.completion_token_ids)
            out.append(TeacherScores(np.zeros(c, np.float32), np.zeros((c, topk), np.int64) if topk else None,
                                     np.zeros((c, topk), np.float32) if topk else None))
        return out


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def to_trajectories(rollouts: list[Rollout], model_id: str) -> list[TrajectoryV1]:
    now = datetime.now(UTC)
    return [
        TrajectoryV1(
            trajectory_id=uuid.uuid4().hex, request_id=f"bench-{i}", choice_index=0, created_at=now,
            base_model_id=model_id,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=r.max_tokens, seed=i),
            prompt_token_ids=r.prompt_ids, completion_token_ids=r.completion_ids,
            behaviour_logprobs=r.behaviour_logprobs, logprob_kind="sampled", finish_reason=r.finish_reason,
        )
        for i, r in enumerate(rollouts)
    ]


def as_v2(trajs: list[TrajectoryV1], student_dir: Path) -> list:
    """The same trajectories as serving writes them (v2): the request's messages (rollout i answered prompt text
    i mod 40, in `_common`), the rendered prompt, the completion text and its offsets (built here, untimed)."""
    from _common import prompt_texts
    from model_runtime.models import eos_token_ids, load_tokenizer
    from schemas.trajectory import TrajectoryV2
    from serving.trajectories import CompletionTexts

    tok, texts = load_tokenizer(student_dir), prompt_texts()
    stops = eos_token_ids(tok)
    out = []
    for i, t in enumerate(trajs):
        done = CompletionTexts.of(tok, t.completion_token_ids, stops)
        fields = t.model_dump(exclude={"schema_version", "prompt_text", "completion_text"})
        out.append(TrajectoryV2(**fields, prompt_kind="chat", messages=[{"role": "user", "content": texts[i % len(texts)]}],
                                prompt_text=tok.decode(t.prompt_token_ids, skip_special_tokens=False),
                                completion_text=done.text, completion_offsets=done.offsets))
    return out


def text_rollouts(student_dir: Path, n: int, *, min_tokens: int, max_tokens: int, seed: int = 0) -> list[Rollout]:
    """Chat prompts answered by real text (other prompt texts, cut to a random length, then EOS): what a cross-
    tokenizer bench needs from a random tiny student, whose own samples are random bytes."""
    import random

    from _common import prompt_texts
    from model_runtime.chat import user_prompt_ids
    from model_runtime.models import load_tokenizer

    tok, texts, rng = load_tokenizer(student_dir), prompt_texts(), random.Random(seed)
    out = []
    for i in range(n):
        answer = " ".join(texts[(i + k) % len(texts)] for k in range(1, 4))
        ids = tok.encode(answer, add_special_tokens=False)[:rng.randint(min_tokens, max_tokens) - 1]
        ids = tok.encode(tok.decode(ids), add_special_tokens=False) + [tok.eos_token_id]  # no cut character
        out.append(Rollout(user_prompt_ids(tok, texts[i % len(texts)]), ids, [-1.0] * len(ids), len(ids), "stop"))
    return out


def cross_bare_pass(prep, batches: list[list[TrajectoryV1]]) -> Tally:
    """The wrapped teacher's forward alone on the teacher ids of the service's batches (views built untimed)."""
    views = [[prep.view(t) for t in batch] for batch in batches]
    started = time.perf_counter()
    for batch in views:
        prep.inner.score_ids([v.prompt_ids for v in batch], [v.completion_ids for v in batch], 0)
    tokens = sum(len(t.completion_token_ids) for b in batches for t in b)
    return Tally(tokens, time.perf_counter() - started)


def send_all(bootstrap: str, topic: str, trajs: list[TrajectoryV1]) -> None:
    producer = KafkaProducer(**producer_config(bootstrap))
    for f in [producer.send(topic, key=t.key, value=t.to_bytes()) for t in trajs]:
        f.get(timeout=30)
    producer.close()


def bare_pass(teacher: EmbeddedTeacher, batches: list[list[TrajectoryV1]], topk: int) -> Tally:
    started = time.perf_counter()
    for batch in batches:
        teacher.score(batch, topk)
    tokens = sum(len(t.completion_token_ids) for b in batches for t in b)
    return Tally(tokens, time.perf_counter() - started)


def service_pass(cfg: ScoringConfig, teacher: RecordingTeacher, store: FeatureStore, trajs: list[TrajectoryV1],
                 join_timeout_s: float = 60.0) -> tuple[Tally, float]:
    """Join the group first (not timed), send, then time first poll -> commit covering the last message."""
    service = ScoringService(cfg, teacher, store)
    with service:
        joined_at = time.perf_counter()
        while service.stats()["consumer_lag"] is None:  # lag is measured only once partitions are assigned
            service.step()
            if time.perf_counter() - joined_at > join_timeout_s:
                raise RuntimeError("the scorer never got a partition assignment")
        join_s = time.perf_counter() - joined_at
        send_all(cfg.bootstrap_servers, cfg.topic, trajs)
        time.sleep(SETTLE_S)  # the parked fetch returns (Tansu holds it to fetch_max_wait_ms): broker latency
        teacher.batches.clear()
        started = time.perf_counter()
        while service.stats()["messages_scored"] < len(trajs):
            service.step()
        seconds = time.perf_counter() - started
    stats = service.stats()
    if stats["rows_written"] != len(trajs) or stats["dead_lettered"]:
        raise RuntimeError(f"scorer wrote {stats['rows_written']} rows for {len(trajs)} messages: {stats}")
    return Tally(stats["tokens_scored"], seconds), join_s


def cross_setup(real: bool, workdir: Path, student_dir: Path):
    """(the service's cross-tokenizer teacher, a second one that builds the bare side's views): the tiny
    Gemma-like teacher, or Gemma 3 270M with `real`. Separate instances, so the service pays for every view it
    uses (a teacher keeps the views it built)."""
    from model_runtime.gemma import ensure_gemma
    from model_runtime.models import load_tokenizer
    from model_runtime.tiny import build_tiny_cross_teacher
    from shadow_scoring.cross_tokenizer import CrossTokenizerTeacher

    # tiny: as deep as the tiny same-tokenizer teacher (4 layers), so both benches price the same forward
    folder = ensure_gemma() if real else build_tiny_cross_teacher(workdir / "cross-teacher", n_layers=4)
    inner = EmbeddedTeacher(folder, device="cpu")
    student_tok, teacher_tok = load_tokenizer(student_dir), load_tokenizer(folder)
    return tuple(CrossTokenizerTeacher(inner, student_tok, teacher_tok) for _ in range(2))


def alignable(prep, trajs: list) -> list:
    """The trajectories the cross-tokenizer teacher can align (the scorer dead-letters the others)."""
    kept = [t for t in trajs if prep.refusal(t) is None]
    prep._views.clear()
    print(f"cross-tokenizer teacher {prep.teacher_id}: {len(trajs) - len(kept)} of {len(trajs)} trajectories "
          "cannot be aligned (left out before timing; the scorer dead-letters them)")
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct teacher and its student")
    ap.add_argument("--model-dir", type=Path, help="teacher folder to score with (implies real-sized runs)")
    ap.add_argument("--drop-layers", default="auto", help="with --real: the sampling student ('auto', '8,21')")
    ap.add_argument("-n", "--trajectories", type=int, help="trajectories per round (default 1024 tiny, 64 real)")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, help="timed rounds (default 4 tiny, 2 real)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--max-poll-records", type=int, default=256)
    ap.add_argument("--topk", type=int, default=0)
    ap.add_argument("--null-teacher", action="store_true", help="a teacher that answers at once: the scorer's own cost")
    ap.add_argument("--cross-tokenizer", action="store_true",
                    help="a teacher of another tokenizer (tiny Gemma-like; --real: Gemma 3 270M)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    real = args.real or args.model_dir is not None
    n = args.trajectories or (64 if real else 1024)
    args.rounds = args.rounds or (2 if real else 4)

    with tempfile.TemporaryDirectory() as tmp, TansuBroker() as broker:
        teacher_dir, student_dir = model_pair(real, Path(tmp), args.model_dir, drop_layers=args.drop_layers)
        t0 = time.perf_counter()
        if args.cross_tokenizer and not real:
            rollouts = text_rollouts(student_dir, n, min_tokens=args.min_tokens, max_tokens=args.max_tokens)
        else:
            rollouts = sample_rollouts(student_dir, n, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                                       batch_size=16 if real else 64)
        lengths = sorted(len(r.completion_ids) for r in rollouts)
        print(f"sampled {n} student trajectories in {time.perf_counter() - t0:.1f} s; completion tokens "
              f"min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]} total {sum(lengths)}")
        prep = None
        if args.cross_tokenizer:
            teacher, prep = cross_setup(real, Path(tmp), student_dir)
            teacher_dir = prep.tokenizer_dir
        else:
            teacher = EmbeddedTeacher(teacher_dir, device="cpu")
        recorder = (NullTeacher if args.null_teacher else RecordingTeacher)(teacher)
        trajs = to_trajectories(rollouts, teacher.teacher_id)
        if args.cross_tokenizer:
            trajs = alignable(prep, as_v2(trajs, student_dir))
            n = len(trajs)
        bare_pass(teacher, [trajs[:8]], args.topk)  # warm-up: first-call allocations
        service_total, bare_total = Tally(), Tally()
        round_ratios: list[float] = []
        own_ms: list[float] = []  # the scorer's own cost per trajectory, per round
        previous_batches: list = []  # set by each even round, re-scored by the odd round after it
        for rnd in range(args.rounds):
            topic = f"bench.scoring.{rnd}"
            ensure_topics(broker.bootstrap, {topic: 1})
            cfg = ScoringConfig(bootstrap_servers=broker.bootstrap, topic=topic, group_id=f"bench-{rnd}",
                                store_url=f"sqlite:///{tmp}/store-{rnd}.db", teacher=str(teacher_dir),
                                batch_tokens=args.batch_tokens, topk=args.topk, lag_refresh_s=0,
                                max_poll_records=args.max_poll_records, poll_timeout_ms=200)
            round_trajs = [t.model_copy(update={"trajectory_id": uuid.uuid4().hex}) for t in trajs]
            if args.null_teacher:
                svc, join_s = service_pass(cfg, recorder, FeatureStore.open(cfg.store_url), round_trajs)
                own_ms.append(svc.seconds / n * 1000)
                print(f"round {rnd}: group join {join_s:.1f} s (not timed); null teacher: {n} trajectories in "
                      f"{svc.seconds:.2f} s = {n / svc.seconds:.0f} trajectories/s, {own_ms[-1]:.3f} ms each")
                continue
            # The bare pass needs the service's batches, so within a round the service goes first; odd rounds
            # re-score the previous round's batches before their own service pass (ABBA over two rounds).
            def bare_side(batches):
                return cross_bare_pass(prep, batches) if prep is not None else bare_pass(teacher, batches, args.topk)

            if rnd % 2 == 1:
                bare = bare_side(previous_batches)
            svc, join_s = service_pass(cfg, recorder, FeatureStore.open(cfg.store_url), round_trajs)
            previous_batches = list(recorder.batches)
            if rnd % 2 == 0:
                bare = bare_side(previous_batches)
            service_total.tokens += svc.tokens
            service_total.seconds += svc.seconds
            bare_total.tokens += bare.tokens
            bare_total.seconds += bare.seconds
            round_ratios.append(svc.tokens_per_s / bare.tokens_per_s)
            own_ms.append((svc.seconds - bare.seconds) / n * 1000)
            print(f"round {rnd}: group join {join_s:.1f} s (not timed); {len(previous_batches)} teacher batches; "
                  f"service {svc.tokens} tok in {svc.seconds:.2f} s = {svc.tokens_per_s:.0f} tok/s; "
                  f"bare teacher {bare.tokens} tok in {bare.seconds:.2f} s = {bare.tokens_per_s:.0f} tok/s; "
                  f"scorer's own cost {own_ms[-1]:.3f} ms per trajectory")
    if args.null_teacher:
        print(f"null teacher, {n} trajectories x {args.rounds} rounds: the scorer's own cost per trajectory, ms "
              f"(per round {' '.join(f'{m:.3f}' for m in own_ms)}); last line: their median")
        print(f"{statistics.median(own_ms):.3f}")
        return
    print(f"scorer's own cost per trajectory (service - bare seconds, / trajectories): median "
          f"{statistics.median(own_ms):.3f} ms (per round {' '.join(f'{m:.3f}' for m in own_ms)})")
    pooled = service_total.tokens_per_s / bare_total.tokens_per_s
    print(f"end-to-end {service_total.tokens_per_s:.0f} tok/s vs bare teacher {bare_total.tokens_per_s:.0f} tok/s "
          f"({'SmolLM2' if real else 'tiny'}{' -> cross-tokenizer teacher' if prep else ''}, {n} trajectories x "
          f"{args.rounds} rounds): pooled ratio {pooled:.3f}; "
          f"per-round {' '.join(f'{r:.3f}' for r in round_ratios)}; last line: their median, target >= 0.85")
    print(f"{statistics.median(round_ratios):.3f}")


if __name__ == "__main__":
    main()
