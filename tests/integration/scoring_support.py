"""Helpers of the scorer's integration tests (tests/integration/test_scoring.py, test_landing.py): random valid
trajectories, fresh topics, one-message-per-request producers, offsets, a scorer config and wait loops.

Test producers send one message per request: Tansu reports a partition's end offset as its last batch's base
offset + 1, so batched sends make end offsets and lag read low.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from fastapi import FastAPI, Request
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from sqlalchemy.orm import Session

from feature_store.store import FeatureStore
from message_bus.topics import ensure_topics
from schemas.tables import TeacherScoreRow, TrajectoryRow
from schemas.trajectory import SamplingParams, TrajectoryV1
from shadow_scoring.config import ScoringConfig
from shadow_scoring.consumer import ScoringService

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def trajectories(n: int, vocab: int, seed: int = 0) -> list[TrajectoryV1]:
    """Random valid trajectories: token ids < vocab, behaviour logprobs <= 0, one minute apart."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, c = rng.randint(2, 12), rng.randint(1, 10)
        out.append(TrajectoryV1(
            trajectory_id=f"{seed}-{i:04d}-{uuid.uuid4().hex[:6]}", request_id=f"req-{i}", choice_index=0,
            created_at=T0 + timedelta(minutes=i), base_model_id="tiny-student",
            sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=10, seed=i),
            prompt_token_ids=[rng.randrange(vocab) for _ in range(p)],
            completion_token_ids=[rng.randrange(vocab) for _ in range(c)],
            behaviour_logprobs=[-rng.random() * 5 for _ in range(c)], logprob_kind="sampled",
            finish_reason="length"))
    return out


def topics(bootstrap: str, partitions: int = 2) -> tuple[str, str]:
    topic, dlq = f"traj-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: partitions, dlq: 1})
    return topic, dlq


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> list:
    """One message per request (see the module docstring for why)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    metas = [producer.send(topic, key=k, value=v).get(timeout=10) for k, v in messages]
    producer.close()
    return metas


def kafka_offsets(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """(sum of end offsets, sum of the group's committed offsets) over the topic's partitions."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    end = consumer.end_offsets(parts)
    consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    committed = admin.list_group_offsets({group: parts})[group]
    admin.close()
    return sum(end.values()), sum(committed[tp].offset for tp in parts if tp in committed and committed[tp].offset > 0)


def scorer_config(bootstrap: str, topic: str, dlq: str, store_url: str, teacher_dir: Path, **kw) -> ScoringConfig:
    return ScoringConfig(**{
        "bootstrap_servers": bootstrap, "topic": topic, "dlq_topic": dlq, "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "store_url": store_url, "teacher": str(teacher_dir), "device": "cpu", "session_timeout_ms": 6000,
        "poll_timeout_ms": 200, "batch_tokens": 64, "max_poll_records": 16, "retry_initial_s": 0.2,
        "retry_max_s": 1.0, "lag_refresh_s": 0.0, "idle_progress_s": 0.0, **kw})


def step_until(service: ScoringService, done, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out; stats {service.stats()}"
        service.step()


def wait_for(done, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def read_dead_letters(bootstrap: str, dlq: str, n: int) -> list:
    reader = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition(dlq, 0)])
    dead: list = []
    wait_for(lambda: dead.extend(r for rs in reader.poll(200).values() for r in rs) or len(dead) >= n, 10, "DLQ")
    reader.close()
    return dead


def score_rows(store: FeatureStore) -> tuple[int, int, int]:
    """(trajectory rows, teacher score rows, distinct trajectory ids among the scores)."""
    with Session(store.engine) as s:
        n_traj = s.execute(sa.select(sa.func.count()).select_from(TrajectoryRow)).scalar_one()
        n_scores = s.execute(sa.select(sa.func.count()).select_from(TeacherScoreRow)).scalar_one()
        distinct = s.execute(sa.select(sa.func.count(sa.distinct(TeacherScoreRow.trajectory_id)))).scalar_one()
    return n_traj, n_scores, distinct


class WrappedTeacher:
    """The real teacher under its own identity (id, vocabulary, tokenizer fingerprint, temperature); subclasses
    change what `score` does."""

    def __init__(self, inner):
        self.inner, self.teacher_id, self.vocab_size = inner, inner.teacher_id, inner.vocab_size
        self.tokenizer_fingerprint, self.temperature = inner.tokenizer_fingerprint, inner.temperature

    def score(self, batch, topk=0):
        return self.inner.score(batch, topk)


class TeacherServer:
    """A vLLM-compatible teacher for scorer subprocesses (`POST {base}/v1/completions` with `prompt_logprobs`, the
    wire format of `shadow_scoring.teacher.OpenAITeacher`): logprob -1 for every prompt token, each answer after
    `delay_s` (a GPU forward's time, so a burst outlasts the test's reactions). Every scorer gets its own base URL,
    `url(name)`, so the test knows which scorer has a batch in flight (`in_flight[name]`)."""

    MODEL = "stand-in-teacher"

    def __init__(self, vocab_size: int, delay_s: float = 0.1):
        self.vocab_size, self.delay_s = vocab_size, delay_s
        self.in_flight: dict[str, int] = {}
        self.answered: dict[str, int] = {}  # prompts answered per scorer (the start-up probe included)
        self.port: int | None = None
        self._server = None
        self._thread = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _app(self):
        import asyncio

        app = FastAPI()  # Request is imported at module level: FastAPI resolves the annotation by name there

        @app.post("/{name}/v1/completions")
        async def completions(name: str, request: Request):
            body = await request.json()
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            try:
                await asyncio.sleep(self.delay_s)
            finally:
                self.in_flight[name] -= 1
            self.answered[name] = self.answered.get(name, 0) + len(body["prompt"])
            choices = [{"index": i, "text": "", "finish_reason": "length", "logprobs": None,
                        "prompt_logprobs": [None] + [{str(t): {"logprob": -1.0, "rank": 1, "decoded_token": ""}}
                                                     for t in ids[1:]]}
                       for i, ids in enumerate(body["prompt"])]
            return {"id": "cmpl-stand-in", "object": "text_completion", "model": body["model"], "choices": choices}

        return app

    def __enter__(self) -> TeacherServer:
        import threading

        import uvicorn

        from message_bus.broker import free_port

        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="error"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for(lambda: self._server.started, 20, "the stand-in teacher")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)
