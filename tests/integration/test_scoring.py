"""The scorer against a real Kafka-protocol broker (Tansu) and real databases: exactly once in effect.

Every test uses its own topics and consumer group. The SIGKILL test runs the scorer as a subprocess so the
kill is real: after a DB commit but before the offset commit (the window duplicates come from), and in its
`slow` variant again mid-scoring. Test producers send one message per request: Tansu reports a partition's
end offset as its last batch's base offset + 1, so batched sends make end offsets and lag read low.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from sqlalchemy.orm import Session

from feature_store.store import FeatureStore
from message_bus.topics import ensure_topics
from schemas.tables import TeacherScoreRow, TrajectoryRow
from schemas.trajectory import SamplingParams, TrajectoryV1
from shadow_scoring.config import ScoringConfig
from shadow_scoring.consumer import ScoringService, backfill
from shadow_scoring.teacher import EmbeddedTeacher

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def teacher(tiny_models) -> EmbeddedTeacher:
    return EmbeddedTeacher(tiny_models[0], device="cpu")


def _trajectories(n: int, vocab: int, seed: int = 0) -> list[TrajectoryV1]:
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


def _topics(bootstrap: str, partitions: int = 2) -> tuple[str, str]:
    topic, dlq = f"traj-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: partitions, dlq: 1})
    return topic, dlq


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> list:
    """One message per request (see the module docstring for why)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    metas = [producer.send(topic, key=k, value=v).get(timeout=10) for k, v in messages]
    producer.close()
    return metas


def _kafka_offsets(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """(sum of end offsets, sum of the group's committed offsets) over the topic's partitions."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    end = consumer.end_offsets(parts)
    consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    committed = admin.list_group_offsets({group: parts})[group]
    admin.close()
    return sum(end.values()), sum(committed[tp].offset for tp in parts if tp in committed and committed[tp].offset > 0)


def _config(bootstrap: str, topic: str, dlq: str, store_url: str, teacher_dir: Path, **kw) -> ScoringConfig:
    return ScoringConfig(**{
        "bootstrap_servers": bootstrap, "topic": topic, "dlq_topic": dlq, "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "store_url": store_url, "teacher": str(teacher_dir), "device": "cpu", "session_timeout_ms": 6000,
        "poll_timeout_ms": 200, "batch_tokens": 64, "max_poll_records": 16, "retry_initial_s": 0.2,
        "retry_max_s": 1.0, "lag_refresh_s": 0.0, **kw})


def _step_until(service: ScoringService, done, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out; stats {service.stats()}"
        service.step()


def _wait(done, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _read_dead_letters(bootstrap: str, dlq: str, n: int) -> list:
    reader = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition(dlq, 0)])
    dead: list = []
    _wait(lambda: dead.extend(r for rs in reader.poll(200).values() for r in rs) or len(dead) >= n, 10, "DLQ")
    reader.close()
    return dead


def _score_rows(store: FeatureStore) -> tuple[int, int, int]:
    """(trajectory rows, teacher score rows, distinct trajectory ids among the scores)."""
    with Session(store.engine) as s:
        n_traj = s.execute(sa.select(sa.func.count()).select_from(TrajectoryRow)).scalar_one()
        n_scores = s.execute(sa.select(sa.func.count()).select_from(TeacherScoreRow)).scalar_one()
        distinct = s.execute(sa.select(sa.func.count(sa.distinct(TeacherScoreRow.trajectory_id)))).scalar_one()
    return n_traj, n_scores, distinct


def test_every_good_trajectory_is_scored_once_and_offsets_follow(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = _topics(kafka_broker.bootstrap)
    trajs = _trajectories(24, teacher.vocab_size)
    _produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = _config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0], metrics_port=0, topk=2)
    store = FeatureStore.open(sqlite_url)
    with ScoringService(cfg, teacher, store) as service:
        _step_until(service, lambda: store.count_scored(teacher.teacher_id) == 24)
        stats = service.stats()
        metrics = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics").text
    assert store.coverage(teacher.teacher_id) == 1.0
    assert _score_rows(store) == (24, 24, 24)
    loaded = store.load_scored([t.trajectory_id for t in trajs[:3]], teacher.teacher_id)
    for t, got in zip(trajs[:3], loaded):
        want = teacher.score([t], topk=2)[0]
        np.testing.assert_allclose(got.teacher.teacher_logprobs_C, want.teacher_logprobs_C, atol=1e-5)
        assert got.teacher.topk_ids_CK.tolist() == want.topk_ids_CK.tolist()
    assert stats["messages_scored"] == stats["rows_written"] == 24
    assert stats["dead_lettered"] == 0
    assert stats["tokens_scored"] == sum(len(t.completion_token_ids) for t in trajs)
    assert stats["tokens_per_s"] > 0
    assert stats["consumer_lag"] == 0
    assert _kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (24, 24)
    assert "shadow_scoring_messages_scored_total 24.0" in metrics
    assert "shadow_scoring_consumer_lag 0.0" in metrics


def test_poison_goes_to_the_dead_letter_topic_and_the_rest_is_stored(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = _topics(kafka_broker.bootstrap)
    good = _trajectories(6, teacher.vocab_size, seed=1)
    body = json.loads(good[0].to_bytes())
    poison = {
        b"not json {": "InvalidTrajectory",
        b"[1, 2, 3]": "InvalidTrajectory",
        json.dumps({**body, "schema_version": 2}).encode(): "UnknownSchemaVersion",
        json.dumps({**body, "trajectory_id": "oov", "prompt_token_ids": [teacher.vocab_size]}).encode():
            "InvalidTrajectory",
        json.dumps({**body, "trajectory_id": "short", "behaviour_logprobs": []}).encode(): "InvalidTrajectory",
        None: "InvalidTrajectory",  # a tombstone
    }
    messages = [(t.key, t.to_bytes()) for t in good[:3]] + [(b"poison", v) for v in poison] + \
               [(t.key, t.to_bytes()) for t in good[3:]]
    metas = _produce(kafka_broker.bootstrap, topic, messages)
    cfg = _config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0])
    store = FeatureStore.open(sqlite_url)
    with ScoringService(cfg, teacher, store) as service:
        _step_until(service, lambda: service.stats()["messages_scored"] + service.stats()["dead_lettered"] == 12)
        stats = service.stats()
    assert sorted(store.scored_ids(teacher.teacher_id)) == sorted(t.trajectory_id for t in good)
    assert stats["dead_lettered"] == 6
    assert stats["dead_lettered_by_reason"] == {"InvalidTrajectory": 5, "UnknownSchemaVersion": 1}
    dead = _read_dead_letters(kafka_broker.bootstrap, dlq, 6)
    sources = {(m.partition, m.offset): v for (k, v), m in zip(messages, metas) if k == b"poison"}
    assert len(dead) == 6
    for rec in dead:
        h = {k: v.decode() for k, v in rec.headers}
        assert h["x-source-topic"] == topic
        assert rec.key == b"poison"
        value = sources[(int(h["x-source-partition"]), int(h["x-source-offset"]))]
        assert rec.value == value
        assert h["x-error-type"] == poison[value]
        assert h["x-error"]
    errors = sorted(dict(r.headers)["x-error"].decode() for r in dead)
    assert any("vocabulary" in e for e in errors)
    assert any("behaviour logprobs for" in e for e in errors)
    assert any(e.startswith("not JSON") for e in errors)
    assert any("schema_version 2" in e for e in errors)


def test_a_replay_writes_no_duplicate_rows(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = _topics(kafka_broker.bootstrap)
    trajs = _trajectories(10, teacher.vocab_size, seed=2)
    messages = [(t.key, t.to_bytes()) for t in trajs]
    _produce(kafka_broker.bootstrap, topic, messages)
    cfg = _config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0])
    store = FeatureStore.open(sqlite_url)
    with ScoringService(cfg, teacher, store) as service:
        _step_until(service, lambda: service.stats()["messages_scored"] == 10)
        _produce(kafka_broker.bootstrap, topic, messages + messages[:3])  # the producer retried everything
        _step_until(service, lambda: service.stats()["messages_scored"] + service.stats()["duplicates_in_poll"] == 23)
        assert service.stats()["rows_written"] == 10
    # A new group starts from the beginning: a full replay of all 23 messages.
    replay = cfg.model_copy(update={"group_id": f"g-{uuid.uuid4().hex[:8]}"})
    with ScoringService(replay, teacher, store) as service:
        _step_until(service, lambda: service.stats()["messages_scored"] + service.stats()["duplicates_in_poll"] == 23)
        assert service.stats()["rows_written"] == 0
    assert _score_rows(store) == (10, 10, 10)


def _connection_switch(pg_url: str):
    """(admin engine, allow(bool)): refuse new connections to the test database and end the open ones (what a
    crashed or partitioned PostgreSQL looks like to the scorer), or allow them again."""
    db = sa.engine.make_url(pg_url).database
    admin = sa.create_engine(sa.engine.make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")

    def allow_connections(allow: bool) -> None:
        with admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS {str(allow).lower()}'))
            if not allow:
                c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                          {"d": db})

    return admin, allow_connections


def test_database_down_pauses_commits_nothing_and_resumes(kafka_broker, pg_url, tiny_models, teacher):
    topic, dlq = _topics(kafka_broker.bootstrap)
    trajs = _trajectories(12, teacher.vocab_size, seed=3)
    cfg = _config(kafka_broker.bootstrap, topic, dlq, pg_url, tiny_models[0])
    store = FeatureStore.open(pg_url)
    admin, allow_connections = _connection_switch(pg_url)

    service, stop = ScoringService(cfg, teacher, store), threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    _produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs[:6]])
    runner.start()
    try:
        _wait(lambda: service.stats()["messages_scored"] == 6 and service.stats()["consumer_lag"] == 0, 30, "6 rows")
        allow_connections(False)
        _produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs[6:]])
        _wait(lambda: service.stats()["retries"] >= 3, 30, "retries")
        assert service.stats()["waiting_for"] == "database"
        assert service.stats()["messages_scored"] == 6
        _wait(lambda: service.stats()["consumer_lag"] == 6, 10, "lag to show the held poll")
        assert _kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (12, 6)  # nothing committed
        allow_connections(True)
        _wait(lambda: service.stats()["messages_scored"] == 12 and service.stats()["consumer_lag"] == 0, 30, "all")
    finally:
        allow_connections(True)
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    assert service.stats()["waiting_for"] is None
    assert sorted(store.scored_ids(teacher.teacher_id)) == sorted(t.trajectory_id for t in trajs)
    assert _kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (12, 12)
    store.engine.dispose()
    admin.dispose()


def test_a_row_the_database_refuses_is_dead_lettered_not_retried(kafka_broker, pg_url, tiny_models, teacher):
    topic, dlq = _topics(kafka_broker.bootstrap)
    trajs = _trajectories(5, teacher.vocab_size, seed=6)
    trajs[2] = trajs[2].model_copy(update={"request_id": "refused-by-the-database"})
    _produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = _config(kafka_broker.bootstrap, topic, dlq, pg_url, tiny_models[0])
    store = FeatureStore.open(pg_url)
    with store.engine.begin() as conn:  # a valid message the database still refuses (an operator's constraint)
        conn.exec_driver_sql("ALTER TABLE trajectories ADD CONSTRAINT test_refuse "
                             "CHECK (request_id <> 'refused-by-the-database')")
    with ScoringService(cfg, teacher, store) as service:
        _step_until(service, lambda: service.stats()["messages_scored"] + service.stats()["dead_lettered"] == 5)
        stats = service.stats()
    assert stats["dead_lettered_by_reason"] == {"IntegrityError": 1}
    assert stats["retries"] == 0
    assert sorted(store.scored_ids(teacher.teacher_id)) == sorted(t.trajectory_id for i, t in enumerate(trajs)
                                                                  if i != 2)
    [dead] = _read_dead_letters(kafka_broker.bootstrap, dlq, 1)
    headers = dict(dead.headers)
    assert dead.key == trajs[2].key
    assert b"test_refuse" in headers["x-error"]
    assert len(headers["x-error"]) < 300
    store.engine.dispose()


class _SigtermOnFirstScore:
    """The real teacher; SIGTERMs its own process when the first batch is being scored."""

    def __init__(self, inner: EmbeddedTeacher):
        self.inner, self.teacher_id, self.vocab_size = inner, inner.teacher_id, inner.vocab_size
        self.calls = 0

    def score(self, batch, topk=0):
        self.calls += 1
        if self.calls == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner.score(batch, topk)


def test_sigterm_finishes_the_batch_in_hand_commits_and_exits(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = _topics(kafka_broker.bootstrap)
    trajs = _trajectories(20, teacher.vocab_size, seed=7)
    _produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = _config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0], max_poll_records=6)
    store = FeatureStore.open(sqlite_url)
    before = signal.getsignal(signal.SIGTERM)
    stats = ScoringService(cfg, _SigtermOnFirstScore(teacher), store).run()  # returns instead of dying
    assert signal.getsignal(signal.SIGTERM) is before
    assert 1 <= stats["messages_scored"] <= 6
    assert stats["retries"] == 0
    assert store.count_scored(teacher.teacher_id) == stats["messages_scored"]
    assert _kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (20, stats["messages_scored"])


# ---- SIGKILL ----------------------------------------------------------------------------------------------------
SCORER = r'''
import json, os, sys, time
from pathlib import Path
from feature_store.store import FeatureStore
from shadow_scoring.config import ScoringConfig
from shadow_scoring.consumer import ScoringService
from shadow_scoring.teacher import EmbeddedTeacher

cfg = ScoringConfig.model_validate_json(sys.argv[1])
hang_at, hang_after = sys.argv[2].split(":")  # "db:2": hang after the 2nd DB commit; "score:2"; "none:0"
journal, go = Path(sys.argv[3]), Path(sys.argv[4])
calls = {"db": 0, "score": 0}

def checkpoint(where, ids):
    calls[where] += 1
    if hang_at == where and calls[where] == int(hang_after):
        with journal.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "hang": where, "ids": ids}) + "\n")
        time.sleep(600)  # the test SIGKILLs us here

class JournaledStore:
    """The real store; every committed ingest is journaled (the file survives SIGKILL) before any checkpoint."""
    def __init__(self, store):
        self.store = store
    def ingest_scored(self, items, teacher_id):
        new = self.store.ingest_scored(items, teacher_id)
        ids = [t.trajectory_id for t, _ in items]
        with journal.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "ids": ids, "new": new}) + "\n")
        checkpoint("db", ids)  # DB committed, Kafka offsets not yet
        return new

class HangingTeacher:
    def __init__(self, inner):
        self.inner, self.teacher_id, self.vocab_size = inner, inner.teacher_id, inner.vocab_size
    def score(self, batch, topk=0):
        checkpoint("score", [t.trajectory_id for t in batch])  # mid-poll: nothing of it stored yet
        return self.inner.score(batch, topk)

teacher = HangingTeacher(EmbeddedTeacher(cfg.teacher, device="cpu"))
store = JournaledStore(FeatureStore.open(cfg.store_url))
while not go.exists():  # loading overlaps the previous scorer's run; start on the test's word
    time.sleep(0.05)
print(json.dumps(ScoringService(cfg, teacher, store).run()), flush=True)
'''


@pytest.mark.parametrize("kills", [
    pytest.param(["db:2"], id="db"),  # between a DB commit and its offset commit: where duplicates come from
    pytest.param(["db:2", "score:2"], id="db+score", marks=pytest.mark.slow),  # then again, mid-scoring
])
def test_sigkill_mid_batch_loses_nothing_and_duplicates_nothing(kafka_broker, sqlite_url, tiny_models, teacher,
                                                                 tmp_path, kills):
    topic, dlq = _topics(kafka_broker.bootstrap)
    trajs = _trajectories(40, teacher.vocab_size, seed=4)
    _produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = _config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0], max_poll_records=6)
    store = FeatureStore.open(sqlite_url)
    script, journal = tmp_path / "scorer.py", tmp_path / "journal.jsonl"
    script.write_text(SCORER)

    def start(mode: str) -> tuple[subprocess.Popen, Path]:
        go = tmp_path / f"go-{mode}"
        argv = [sys.executable, str(script), cfg.model_dump_json(), mode, str(journal), str(go)]
        return subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True), go

    def entries() -> list[dict]:
        return [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []

    scorers = [start(mode) for mode in [*kills, "none:0"]]
    for done, ((proc, go), mode) in enumerate(zip(scorers, kills), start=1):
        go.touch()
        _wait(lambda: sum("hang" in e for e in entries()) == done or proc.poll() is not None, 60, mode)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    uncommitted = next(e["ids"] for e in entries() if e.get("hang") == "db")
    assert set(uncommitted) <= set(store.scored_ids(teacher.teacher_id))  # stored, offsets not committed

    final, go = scorers[-1]
    go.touch()
    _wait(lambda: store.count_scored(teacher.teacher_id) == 40 or final.poll() is not None, 60, "all 40 rows")
    _wait(lambda: _kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (40, 40), 30, "offsets")
    final.send_signal(signal.SIGTERM)  # graceful: finish, commit, exit 0
    out, err = final.communicate(timeout=30)
    assert final.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["dead_lettered"] == 0

    ingests = [e for e in entries() if "new" in e]
    assert sum(e["new"] for e in ingests) == 40  # each trajectory was new exactly once...
    assert sum(len(e["ids"]) for e in ingests) > 40  # ...although some were delivered and stored again
    first_pid = ingests[0]["pid"]
    assert any(e["pid"] != first_pid and set(uncommitted) & set(e["ids"]) for e in ingests), \
        "the poll stored before the kill but never committed to Kafka must be redelivered"
    assert _score_rows(store) == (40, 40, 40)
    assert sorted(store.scored_ids(teacher.teacher_id)) == sorted(t.trajectory_id for t in trajs)


# ---- backfill ---------------------------------------------------------------------------------------------------
def test_backfill_rescores_a_window_with_a_new_teacher_once(sqlite_url, tiny_models, teacher):
    store = FeatureStore.open(sqlite_url)
    trajs = _trajectories(12, teacher.vocab_size, seed=5)
    store.ingest_scored(list(zip(trajs, teacher.score(trajs))), teacher.teacher_id)
    hot = EmbeddedTeacher(tiny_models[0], device="cpu", temperature=2.0)
    since, until = trajs[2].created_at, trajs[9].created_at
    report = backfill(store, hot, since, until, batch_tokens=40, page_size=3)
    assert (report.seen, report.rows_written, report.rejected_ids) == (7, 7, [])
    assert store.scored_ids(hot.teacher_id) == [t.trajectory_id for t in trajs[2:9]]
    for t, got in zip(trajs[2:9], store.load_scored([t.trajectory_id for t in trajs[2:9]], hot.teacher_id)):
        np.testing.assert_allclose(got.teacher.teacher_logprobs_C, hot.score([t])[0].teacher_logprobs_C, atol=1e-5)
    again = backfill(store, hot, since, until, batch_tokens=40)
    assert (again.seen, again.rows_written) == (0, 0)
    assert backfill(store, hot, None, None, batch_tokens=40).rows_written == 5
    assert _score_rows(store) == (12, 24, 12)


def test_a_scorer_started_before_its_database_and_broker_waits_for_them(pg_url, tiny_models, teacher, caplog):
    """Start-up order must not matter (compose, k8s, a rebooted node): the scorer waits with backoff for an
    unreachable PostgreSQL and then an unstarted broker, and scores what arrives once both are up."""
    from message_bus.broker import TansuBroker, free_port

    admin, allow_connections = _connection_switch(pg_url)
    port = free_port()
    topic, dlq = f"traj-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    cfg = _config(f"127.0.0.1:{port}", topic, dlq, pg_url, tiny_models[0], startup_wait_s=60.0,
                  connect_timeout_s=2.0)
    stop, outcome = threading.Event(), {}

    def scorer() -> None:
        try:
            service = ScoringService.from_config(cfg)
            outcome["service"] = service
            with service:
                service.run(stop)
        except BaseException as exc:  # surfaced by the asserts below
            outcome["error"] = exc

    allow_connections(False)
    caplog.set_level("WARNING", logger="shadow_scoring.consumer")
    runner = threading.Thread(target=scorer)
    runner.start()
    broker = TansuBroker(port=port)
    try:
        _wait(lambda: "database unreachable at start-up" in caplog.text, 20, "the database wait")
        allow_connections(True)
        _wait(lambda: "broker unreachable at start-up" in caplog.text or "error" in outcome, 30, "the broker wait")
        assert "error" not in outcome, outcome.get("error")
        broker.start()
        ensure_topics(broker.bootstrap, {topic: 1, dlq: 1})
        trajs = _trajectories(5, teacher.vocab_size, seed=11)
        _produce(broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
        _wait(lambda: "service" in outcome and outcome["service"].stats()["messages_scored"] == 5, 60, "scores")
    finally:
        allow_connections(True)
        stop.set()
        runner.join(30)
        broker.stop()
        admin.dispose()
    assert "error" not in outcome, outcome.get("error")
    store = FeatureStore.open(pg_url)
    assert sorted(store.scored_ids(teacher.teacher_id)) == sorted(t.trajectory_id for t in trajs)
    store.engine.dispose()


def test_startup_gives_up_after_its_deadline_with_the_real_error(sqlite_url, tiny_models, caplog):
    from kafka.errors import KafkaError

    from message_bus.broker import free_port

    cfg = _config(f"127.0.0.1:{free_port()}", "t", "d", sqlite_url, tiny_models[0], startup_wait_s=3.0,
                  connect_timeout_s=1.0)
    service = ScoringService.from_config(cfg)  # sqlite opens at once
    caplog.set_level("WARNING", logger="shadow_scoring.consumer")
    started = time.monotonic()
    with pytest.raises(KafkaError, match="bootstrap"):
        service.open()
    assert caplog.text.count("broker unreachable at start-up") >= 2, "it retried before giving up"
    assert time.monotonic() - started < 15, "and it gave up near its deadline"
