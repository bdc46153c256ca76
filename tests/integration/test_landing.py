"""Landing before scoring, against a real broker (Tansu) and real databases: a window is complete only when the
log was read past its end AND what landed is scored.

The trajectories of these tests are created on 2025-03-01 (scoring_support.T0), so a consumer that finds its
partitions caught up now has seen far past the window's end: the watermark then comes from `caught_up_at`.
The event-time side of the watermark (busy partitions, a partition never seen) is tested with hand-made
progress in test_feature_store.py and tests/unit/test_window_status.py.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import httpx
import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from feature_store.store import FeatureStore
from foundation.errors import TeacherUnavailable
from schemas.prompts import prompt_hash
from scoring_support import (
    T0,
    WrappedTeacher,
    produce,
    score_rows,
    scorer_config,
    step_until,
    topics,
    trajectories,
    wait_for,
)
from shadow_scoring.consumer import ScoringService
from shadow_scoring.teacher import EmbeddedTeacher

pytestmark = pytest.mark.integration
END = T0 + timedelta(days=1)
LATENESS_S = 600.0


@pytest.fixture(scope="module")
def teacher(tiny_models) -> EmbeddedTeacher:
    return EmbeddedTeacher(tiny_models[0], device="cpu")


class _DownTeacher(WrappedTeacher):
    """The real teacher, unreachable while `down` is set (what a crashed vLLM server looks like)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.down = threading.Event()
        self.down.set()

    def score(self, batch, topk=0):
        if self.down.is_set():
            raise TeacherUnavailable("teacher server unreachable (test)")
        return self.inner.score(batch, topk)


def _status(store: FeatureStore, teacher, cfg):
    return store.window_status(teacher.teacher_id, T0, END, topic=cfg.topic, group_id=cfg.group_id)


def test_with_no_scorer_nothing_lands_and_the_window_is_not_complete(kafka_broker, store_url, tiny_models, teacher):
    topic, dlq = topics(kafka_broker.bootstrap)
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajectories(6, teacher.vocab_size)])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, store_url, tiny_models[0])
    store = FeatureStore.open(store_url)
    status = _status(store, teacher, cfg)
    assert status.landed == 0
    assert status.watermark is None
    assert store.coverage(teacher.teacher_id, T0, END) == 1.0  # an empty window is covered...
    assert not status.complete(END, LATENESS_S, threshold=1.0)  # ...but not known to be empty
    store.engine.dispose()


def test_a_down_teacher_leaves_landed_unscored_trajectories_and_the_window_waits(kafka_broker, store_url, tiny_models,
                                                                                 teacher):
    topic, dlq = topics(kafka_broker.bootstrap)
    trajs = trajectories(12, teacher.vocab_size, seed=21)
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, store_url, tiny_models[0])
    store, down = FeatureStore.open(store_url), _DownTeacher(teacher)
    service, stop = ScoringService(cfg, down, store), threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: service.stats()["waiting_for"] == "teacher", 40, "the teacher retries")
        while_down = _status(store, teacher, cfg)
        landed_while_down = service.stats()["landed"]
        down.down.clear()
        wait_for(lambda: _status(store, teacher, cfg).complete(END, LATENESS_S, 1.0), 40, "a complete window")
    finally:
        down.down.clear()
        stop.set()
        runner.join(30)
    after = _status(store, teacher, cfg)
    assert landed_while_down >= 1
    assert while_down.landed == landed_while_down
    assert while_down.scored == 0
    assert not while_down.complete(END, LATENESS_S, threshold=1.0)
    assert (after.landed, after.scored, after.rejected) == (12, 12, 0)
    assert after.watermark >= END + timedelta(seconds=LATENESS_S)
    assert service.stats()["rows_written"] == 12
    assert score_rows(store) == (12, 12, 12)  # every trajectory scored exactly once
    store.engine.dispose()


def test_landing_records_each_partitions_progress(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = topics(kafka_broker.bootstrap, partitions=3)
    trajs = trajectories(9, teacher.vocab_size, seed=22)
    metas = produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0])
    store = FeatureStore.open(sqlite_url)
    with ScoringService(cfg, teacher, store) as service:
        step_until(service, lambda: _status(store, teacher, cfg).complete(END, LATENESS_S, 1.0))
    progress = {p.partition: p for p in store.log_progress(cfg.group_id, topic)}
    newest = {m.partition: max(t.created_at for t, n in zip(trajs, metas) if n.partition == m.partition)
              for m in metas}
    reader = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap)
    ends = {tp.partition: off for tp, off in reader.end_offsets([TopicPartition(topic, p) for p in range(3)]).items()}
    reader.close()
    assert sorted(progress) == [0, 1, 2]
    assert {p: r.next_offset for p, r in progress.items()} == ends
    assert {p: r.max_created_at for p, r in progress.items() if p in newest} == newest
    assert all(r.partitions_total == 3 for r in progress.values())
    assert all(r.caught_up_at is not None for r in progress.values())
    assert _status(store, teacher, cfg).partitions_seen == 3


def test_the_scorer_stores_the_teachers_top20_by_default(kafka_broker, sqlite_url, tiny_models, teacher, caplog):
    """Greedy traffic teaches only through the teacher's distribution: top-k is on unless turned off, each row
    says which tokenizer and temperature it was made under, and the scorer reports what that costs."""
    topic, dlq = topics(kafka_broker.bootstrap)
    trajs = trajectories(4, teacher.vocab_size, seed=23)
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0], metrics_port=0)
    store = FeatureStore.open(sqlite_url)
    caplog.set_level(logging.INFO, logger="shadow_scoring.consumer")
    with ScoringService(cfg, teacher, store) as service:
        step_until(service, lambda: store.count_scored(teacher.teacher_id) == 4)
        stats = service.stats()
        metrics = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics").text
    got = store.load_scored([trajs[0].trajectory_id], teacher.teacher_id)[0]
    assert cfg.topk == 20
    assert got.teacher.topk == 20
    assert stats["stored_bytes_per_token"] == 164.0  # 4 (logprob) + 20 x (4 id + 4 logprob)
    assert "shadow_scoring_stored_bytes_per_token 164.0" in metrics
    assert "storing top-20: 164 bytes per completion token" in caplog.text
    assert got.tokenizer_fingerprint == teacher.tokenizer_fingerprint
    assert got.teacher_temperature == 1.0
    assert got.base_model_id == "tiny-student"
    assert got.prompt_hash == prompt_hash(trajs[0].prompt_token_ids)
