"""The scorer against a real Kafka-protocol broker (Tansu) and real databases: exactly once in effect.

Every test uses its own topics and consumer group. The SIGKILL test runs the scorer as a subprocess so the
kill is real: after a landing commit but before the offset commit (the window duplicates come from), after the
offset commit but before scoring (what only the store still holds), and in its `slow` variant both. Landing
before scoring and the window's completeness are tested in test_landing.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from feature_store.records import LoggedTrajectory
from feature_store.store import FeatureStore
from message_bus.topics import ensure_topics
from schemas.trajectory import decode_trajectory
from scoring_support import (
    WrappedTeacher,
    kafka_offsets,
    produce,
    read_dead_letters,
    score_rows,
    scorer_config,
    step_until,
    topics,
    trajectories,
    wait_for,
)
from shadow_scoring.consumer import ScoringService, backfill
from shadow_scoring.teacher import EmbeddedTeacher

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher(tiny_models) -> EmbeddedTeacher:
    return EmbeddedTeacher(tiny_models[0], device="cpu")


def test_every_good_trajectory_is_scored_once_and_offsets_follow(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = topics(kafka_broker.bootstrap)
    trajs = trajectories(24, teacher.vocab_size)
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0], metrics_port=0, topk=2)
    store = FeatureStore.open(sqlite_url)
    with ScoringService(cfg, teacher, store) as service:
        step_until(service, lambda: store.count_scored(teacher.teacher_id) == 24)
        stats = service.stats()
        metrics = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics").text
    assert store.coverage(teacher.teacher_id) == 1.0
    assert score_rows(store) == (24, 24, 24)
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
    assert kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (24, 24)
    assert "shadow_scoring_messages_scored_total 24.0" in metrics
    assert "shadow_scoring_consumer_lag 0.0" in metrics


def test_poison_goes_to_the_dead_letter_topic_and_the_rest_is_stored(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = topics(kafka_broker.bootstrap)
    good = trajectories(6, teacher.vocab_size, seed=1)
    body = json.loads(good[0].to_bytes())
    poison = {
        b"not json {": "InvalidTrajectory",
        b"[1, 2, 3]": "InvalidTrajectory",
        json.dumps({**body, "schema_version": 99}).encode(): "UnknownSchemaVersion",
        json.dumps({**body, "trajectory_id": "short", "behaviour_logprobs": []}).encode(): "InvalidTrajectory",
        None: "InvalidTrajectory",  # a tombstone
    }
    messages = [(t.key, t.to_bytes()) for t in good[:3]] + [(b"poison", v) for v in poison] + \
               [(t.key, t.to_bytes()) for t in good[3:]]
    metas = produce(kafka_broker.bootstrap, topic, messages)
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0])
    store = FeatureStore.open(sqlite_url)
    with ScoringService(cfg, teacher, store) as service:
        step_until(service, lambda: service.stats()["messages_scored"] + service.stats()["dead_lettered"] == 11)
        stats = service.stats()
    assert sorted(store.scored_ids(teacher.teacher_id)) == sorted(t.trajectory_id for t in good)
    assert stats["dead_lettered"] == 5
    assert stats["dead_lettered_by_reason"] == {"InvalidTrajectory": 4, "UnknownSchemaVersion": 1}
    assert store.count_trajectories() == 6
    dead = read_dead_letters(kafka_broker.bootstrap, dlq, 5)
    sources = {(m.partition, m.offset): v for (k, v), m in zip(messages, metas) if k == b"poison"}
    assert len(dead) == 5
    for rec in dead:
        h = {k: v.decode() for k, v in rec.headers}
        assert h["x-source-topic"] == topic
        assert rec.key == b"poison"
        value = sources[(int(h["x-source-partition"]), int(h["x-source-offset"]))]
        assert rec.value == value
        assert h["x-error-type"] == poison[value]
        assert h["x-error"]
    errors = sorted(dict(r.headers)["x-error"].decode() for r in dead)
    assert any("behaviour logprobs for" in e for e in errors)
    assert any(e.startswith("not JSON") for e in errors)
    assert any("schema_version 99" in e for e in errors)


def test_a_trajectory_the_teacher_refuses_is_landed_recorded_and_dead_lettered_once(kafka_broker, sqlite_url,
                                                                                      tiny_models, teacher):
    """A valid trajectory with a token the teacher has no embedding for is the teacher's refusal, not a poison:
    it lands (it counts in the window), is recorded in scoring_rejections (covered, never retried) and goes to
    the DLQ re-serialized from its row, with the reason and its place in the log."""
    topic, dlq = topics(kafka_broker.bootstrap)
    good = trajectories(3, teacher.vocab_size, seed=9)
    oov = good[0].model_copy(update={"trajectory_id": "oov", "prompt_token_ids": [teacher.vocab_size]})
    [meta] = produce(kafka_broker.bootstrap, topic, [(oov.key, oov.to_bytes())])
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in good])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0])
    store = FeatureStore.open(sqlite_url)
    with ScoringService(cfg, teacher, store) as service:
        step_until(service, lambda: service.stats()["messages_scored"] + service.stats()["rejected"] == 4)
        for _ in range(3):
            service.step()  # a refusal is not retried
        stats = service.stats()
    [dead] = read_dead_letters(kafka_broker.bootstrap, dlq, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert stats["rejected"] == 1
    assert stats["dead_lettered_by_reason"] == {"InvalidTrajectory": 1}
    assert store.count_trajectories() == 4
    assert store.count_rejected(teacher.teacher_id) == 1
    assert store.coverage(teacher.teacher_id) == 1.0
    assert dead.key == b"oov"
    # Re-serialized from the stored row: the same trajectory, its logprobs rounded to the stored float32.
    assert decode_trajectory(dead.value).model_dump(exclude={"behaviour_logprobs"}) == \
        oov.model_dump(exclude={"behaviour_logprobs"})
    np.testing.assert_allclose(decode_trajectory(dead.value).behaviour_logprobs, oov.behaviour_logprobs, rtol=1e-6)
    assert "vocabulary" in headers["x-error"]
    assert headers["x-teacher-id"] == teacher.teacher_id
    assert (int(headers["x-source-partition"]), int(headers["x-source-offset"])) == (meta.partition, meta.offset)


def test_a_replay_writes_no_duplicate_rows(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = topics(kafka_broker.bootstrap)
    trajs = trajectories(10, teacher.vocab_size, seed=2)
    messages = [(t.key, t.to_bytes()) for t in trajs]
    produce(kafka_broker.bootstrap, topic, messages)
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0])
    store = FeatureStore.open(sqlite_url)
    with ScoringService(cfg, teacher, store) as service:
        step_until(service, lambda: service.stats()["messages_scored"] == 10)
        produce(kafka_broker.bootstrap, topic, messages + messages[:3])  # the producer retried everything
        step_until(service, lambda: service.stats()["landed"] + service.stats()["duplicates_in_poll"] == 23)
        service.step()
        first = service.stats()
    # A new group starts from the beginning: a full replay of all 23 messages.
    replay = cfg.model_copy(update={"group_id": f"g-{uuid.uuid4().hex[:8]}"})
    with ScoringService(replay, teacher, store) as service:
        step_until(service, lambda: service.stats()["landed"] + service.stats()["duplicates_in_poll"] == 23)
        service.step()
        second = service.stats()
    assert (first["landed_new"], first["messages_scored"], first["rows_written"]) == (10, 10, 10)
    assert (second["landed_new"], second["messages_scored"], second["rows_written"]) == (0, 0, 0)
    assert score_rows(store) == (10, 10, 10)


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
    topic, dlq = topics(kafka_broker.bootstrap)
    trajs = trajectories(12, teacher.vocab_size, seed=3)
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, pg_url, tiny_models[0])
    store = FeatureStore.open(pg_url)
    admin, allow_connections = _connection_switch(pg_url)

    service, stop = ScoringService(cfg, teacher, store), threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs[:6]])
    runner.start()
    try:
        wait_for(lambda: service.stats()["messages_scored"] == 6 and service.stats()["consumer_lag"] == 0, 30, "6 rows")
        allow_connections(False)
        produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs[6:]])
        wait_for(lambda: service.stats()["retries"] >= 3, 30, "retries")
        assert service.stats()["waiting_for"] == "database"
        assert service.stats()["messages_scored"] == 6
        wait_for(lambda: service.stats()["consumer_lag"] == 6, 10, "lag to show the held poll")
        assert kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (12, 6)  # nothing committed
        allow_connections(True)
        wait_for(lambda: service.stats()["messages_scored"] == 12 and service.stats()["consumer_lag"] == 0, 30, "all")
    finally:
        allow_connections(True)
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    assert service.stats()["waiting_for"] is None
    assert sorted(store.scored_ids(teacher.teacher_id)) == sorted(t.trajectory_id for t in trajs)
    assert kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (12, 12)
    store.engine.dispose()
    admin.dispose()


def test_a_row_the_database_refuses_is_dead_lettered_not_retried(kafka_broker, pg_url, tiny_models, teacher):
    topic, dlq = topics(kafka_broker.bootstrap)
    trajs = trajectories(5, teacher.vocab_size, seed=6)
    trajs[2] = trajs[2].model_copy(update={"request_id": "refused-by-the-database"})
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, pg_url, tiny_models[0])
    store = FeatureStore.open(pg_url)
    with store.engine.begin() as conn:  # a valid message the database still refuses (an operator's constraint)
        conn.exec_driver_sql("ALTER TABLE trajectories ADD CONSTRAINT test_refuse "
                             "CHECK (request_id <> 'refused-by-the-database')")
    with ScoringService(cfg, teacher, store) as service:
        step_until(service, lambda: service.stats()["messages_scored"] + service.stats()["dead_lettered"] == 5)
        stats = service.stats()
    assert stats["dead_lettered_by_reason"] == {"IntegrityError": 1}
    assert stats["retries"] == 0
    assert sorted(store.scored_ids(teacher.teacher_id)) == sorted(t.trajectory_id for i, t in enumerate(trajs)
                                                                  if i != 2)
    [dead] = read_dead_letters(kafka_broker.bootstrap, dlq, 1)
    headers = dict(dead.headers)
    assert dead.key == trajs[2].key
    assert b"test_refuse" in headers["x-error"]
    assert len(headers["x-error"]) < 300
    store.engine.dispose()


class _SigtermOnFirstScore(WrappedTeacher):
    """The real teacher; SIGTERMs its own process when the first batch is being scored."""

    calls = 0

    def score(self, batch, topk=0):
        self.calls += 1
        if self.calls == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner.score(batch, topk)


def test_sigterm_finishes_the_batch_in_hand_commits_and_exits(kafka_broker, sqlite_url, tiny_models, teacher):
    topic, dlq = topics(kafka_broker.bootstrap)
    trajs = trajectories(20, teacher.vocab_size, seed=7)
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, sqlite_url, tiny_models[0], max_poll_records=6)
    store = FeatureStore.open(sqlite_url)
    before = signal.getsignal(signal.SIGTERM)
    stats = ScoringService(cfg, _SigtermOnFirstScore(teacher), store).run()  # returns instead of dying
    assert signal.getsignal(signal.SIGTERM) is before
    # The signal comes while the first page is in the teacher, which overlaps the next poll's landing: at most
    # two polls of 6 land, and what landed is scored before the exit (the step in hand, then one more page).
    assert 1 <= stats["landed"] <= 12
    assert stats["messages_scored"] == stats["landed"]
    assert stats["retries"] == 0
    assert store.count_scored(teacher.teacher_id) == stats["messages_scored"]
    assert kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (20, stats["landed"])


# ---- SIGKILL ----------------------------------------------------------------------------------------------------
SCORER = r'''
import json, os, sys, time
from pathlib import Path
from feature_store.store import FeatureStore
from shadow_scoring.config import ScoringConfig
from shadow_scoring.consumer import ScoringService
from shadow_scoring.teacher import EmbeddedTeacher

cfg = ScoringConfig.model_validate_json(sys.argv[1])
# "land:2": hang after the 2nd landing commit (offsets not committed); "score:1": hang in the 1st teacher call
# (its poll landed and committed, nothing scored); "none:0"
hang_at, hang_after = sys.argv[2].split(":")
journal, go = Path(sys.argv[3]), Path(sys.argv[4])
calls = {"land": 0, "score": 0}

def write(entry):
    with journal.open("a") as f:
        f.write(json.dumps({"pid": os.getpid(), **entry}) + "\n")

def checkpoint(where, ids):
    calls[where] += 1
    if hang_at == where and calls[where] == int(hang_after):
        write({"hang": where, "ids": ids})
        time.sleep(600)  # the test SIGKILLs us here

class JournaledStore:
    """The real store; every committed landing and score write is journaled (the file survives SIGKILL)."""
    def __init__(self, store):
        self.store = store
    def __getattr__(self, name):
        return getattr(self.store, name)
    def land(self, trajectories, progress=()):
        new = self.store.land(trajectories, progress)
        if trajectories:
            ids = [lt.trajectory.trajectory_id for lt in trajectories]
            write({"kind": "land", "ids": ids, "new": new})
            checkpoint("land", ids)  # landed, Kafka offsets not yet committed
        return new
    def write_scores(self, items, teacher_id, **kw):
        written = self.store.write_scores(items, teacher_id, **kw)
        write({"kind": "scores", "ids": [t.trajectory_id for t, _ in items], "new": written.new_scores})
        return written

class HangingTeacher:
    def __init__(self, inner):
        self.inner, self.teacher_id, self.vocab_size = inner, inner.teacher_id, inner.vocab_size
        self.tokenizer_fingerprint, self.temperature = inner.tokenizer_fingerprint, inner.temperature
    def score(self, batch, topk=0):
        checkpoint("score", [t.trajectory_id for t in batch])  # landed and committed, not scored yet
        return self.inner.score(batch, topk)

teacher = HangingTeacher(EmbeddedTeacher(cfg.teacher, device="cpu"))
store = JournaledStore(FeatureStore.open(cfg.store_url))
while not go.exists():  # loading overlaps the previous scorer's run; start on the test's word
    time.sleep(0.05)
print(json.dumps(ScoringService(cfg, teacher, store).run()), flush=True)
'''


def _kill_and_recover(kafka_broker, store_url, teacher, tmp_path, kills: list[str]) -> tuple[list[dict], dict]:
    """40 trajectories; one scorer subprocess per `kills` mode, each SIGKILLed where its mode hangs, then a last
    one that finishes the work and is SIGTERMed. Returns the journal entries and the last scorer's stats."""
    topic, dlq = topics(kafka_broker.bootstrap)
    trajs = trajectories(40, teacher.vocab_size, seed=4)
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, store_url, teacher.model_dir, max_poll_records=6)
    store = FeatureStore.open(store_url)
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
    try:
        for done, ((proc, go), mode) in enumerate(zip(scorers, kills), start=1):
            go.touch()
            wait_for(lambda: sum("hang" in e for e in entries()) == done or proc.poll() is not None, 60, mode)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        final, go = scorers[-1]
        go.touch()
        wait_for(lambda: store.count_scored(teacher.teacher_id) == 40 or final.poll() is not None, 60, "all 40 scored")
        wait_for(lambda: kafka_offsets(kafka_broker.bootstrap, topic, cfg.group_id) == (40, 40), 30, "offsets")
        final.send_signal(signal.SIGTERM)  # graceful: finish, commit, exit 0
        out, err = final.communicate(timeout=30)
        assert final.returncode == 0, err[-3000:]
    finally:  # a failed wait must not leave scorer processes behind
        for proc, _ in scorers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    store.engine.dispose()
    return entries(), json.loads(out.strip().splitlines()[-1])


def _journal(entries: list[dict], kind: str) -> list[dict]:
    return [e for e in entries if e.get("kind") == kind]


def test_sigkill_between_landing_and_the_offset_commit_duplicates_nothing(kafka_broker, sqlite_url, teacher, tmp_path):
    entries, stats = _kill_and_recover(kafka_broker, sqlite_url, teacher, tmp_path, ["land:2"])
    hung = next(e for e in entries if e.get("hang") == "land")
    lands, scores = _journal(entries, "land"), _journal(entries, "scores")
    assert stats["dead_lettered"] == 0
    assert sum(e["new"] for e in lands) == 40  # each trajectory landed new exactly once...
    assert sum(len(e["ids"]) for e in lands) > 40  # ...although some were delivered and landed again
    assert any(e["pid"] != hung["pid"] and set(hung["ids"]) & set(e["ids"]) for e in lands), \
        "the poll landed before the kill but never committed to Kafka must be redelivered"
    assert sum(e["new"] for e in scores) == 40
    assert score_rows(FeatureStore.open(sqlite_url)) == (40, 40, 40)


def test_sigkill_after_the_offset_commit_before_scoring_loses_nothing(kafka_broker, sqlite_url, teacher, tmp_path):
    """Kafka will never redeliver a poll whose offsets were committed: its scores come from the store alone."""
    entries, stats = _kill_and_recover(kafka_broker, sqlite_url, teacher, tmp_path, ["score:1"])
    hung = next(e for e in entries if e.get("hang") == "score")
    lands, scores = _journal(entries, "land"), _journal(entries, "scores")
    relanded = {i for e in lands if e["pid"] != hung["pid"] for i in e["ids"]}
    scored_after = {i for e in scores if e["pid"] != hung["pid"] for i in e["ids"]}
    assert not set(hung["ids"]) & relanded  # not redelivered by Kafka...
    assert set(hung["ids"]) <= scored_after  # ...and scored by the next scorer from the store
    assert sum(e["new"] for e in scores) == 40
    assert stats["messages_scored"] == 40
    assert score_rows(FeatureStore.open(sqlite_url)) == (40, 40, 40)


@pytest.mark.slow
def test_sigkill_at_both_points_in_turn_scores_everything_once(kafka_broker, sqlite_url, teacher, tmp_path):
    entries, _ = _kill_and_recover(kafka_broker, sqlite_url, teacher, tmp_path, ["land:2", "score:2"])
    assert sum(e["new"] for e in _journal(entries, "land")) == 40
    assert sum(e["new"] for e in _journal(entries, "scores")) == 40
    assert score_rows(FeatureStore.open(sqlite_url)) == (40, 40, 40)


# ---- backfill ---------------------------------------------------------------------------------------------------
def test_backfill_rescores_a_window_with_a_new_teacher_once(sqlite_url, tiny_models, teacher):
    store = FeatureStore.open(sqlite_url)
    trajs = trajectories(12, teacher.vocab_size, seed=5)
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
    assert score_rows(store) == (12, 24, 12)


def test_backfill_stamps_the_new_teachers_tokenizer_and_temperature(sqlite_url, tiny_models, teacher):
    store = FeatureStore.open(sqlite_url)
    [t] = trajectories(1, teacher.vocab_size, seed=12)
    store.ingest_scored([(t, teacher.score([t])[0])], teacher.teacher_id)
    hot = EmbeddedTeacher(tiny_models[0], device="cpu", temperature=2.0)
    backfill(store, hot, None, None, batch_tokens=40)
    [got] = store.load_scored([t.trajectory_id], hot.teacher_id)
    assert got.teacher_temperature == 2.0
    assert got.tokenizer_fingerprint == teacher.tokenizer_fingerprint
    assert got.teacher.topk == 20  # top-k by default, as the service


def test_backfill_records_a_refusal_and_does_not_retry_it(sqlite_url, tiny_models, teacher):
    store = FeatureStore.open(sqlite_url)
    good, bad = trajectories(2, teacher.vocab_size, seed=13)
    bad = bad.model_copy(update={"completion_token_ids": [teacher.vocab_size], "behaviour_logprobs": [-1.0]})
    store.land([LoggedTrajectory(good), LoggedTrajectory(bad)])
    first = backfill(store, teacher, None, None, batch_tokens=40)
    again = backfill(store, teacher, None, None, batch_tokens=40)
    assert (first.seen, first.rows_written, first.rejected_ids) == (2, 1, [bad.trajectory_id])
    assert again.seen == 0
    assert store.coverage(teacher.teacher_id) == 1.0


def test_a_scorer_started_before_its_database_and_broker_waits_for_them(pg_url, tiny_models, teacher, caplog):
    """Start-up order must not matter (compose, k8s, a rebooted node): the scorer waits with backoff for an
    unreachable PostgreSQL and then an unstarted broker, and scores what arrives once both are up."""
    from message_bus.broker import TansuBroker, free_port

    admin, allow_connections = _connection_switch(pg_url)
    port = free_port()
    topic, dlq = f"traj-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    cfg = scorer_config(f"127.0.0.1:{port}", topic, dlq, pg_url, tiny_models[0], startup_wait_s=60.0,
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
        wait_for(lambda: "database unreachable at start-up" in caplog.text, 20, "the database wait")
        allow_connections(True)
        wait_for(lambda: "broker unreachable at start-up" in caplog.text or "error" in outcome, 30, "the broker wait")
        assert "error" not in outcome, outcome.get("error")
        broker.start()
        ensure_topics(broker.bootstrap, {topic: 1, dlq: 1})
        trajs = trajectories(5, teacher.vocab_size, seed=11)
        produce(broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
        wait_for(lambda: "service" in outcome and outcome["service"].stats()["messages_scored"] == 5, 60, "scores")
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

    cfg = scorer_config(f"127.0.0.1:{free_port()}", "t", "d", sqlite_url, tiny_models[0], startup_wait_s=3.0,
                  connect_timeout_s=1.0)
    service = ScoringService.from_config(cfg)  # sqlite opens at once
    caplog.set_level("WARNING", logger="shadow_scoring.consumer")
    started = time.monotonic()
    with pytest.raises(KafkaError, match="bootstrap"):
        service.open()
    assert caplog.text.count("broker unreachable at start-up") >= 2, "it retried before giving up"
    assert time.monotonic() - started < 15, "and it gave up near its deadline"
