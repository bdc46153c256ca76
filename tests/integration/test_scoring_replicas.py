"""Scorer replicas: scorer processes sharing one consumer group split the topic's partitions, and a rebalance (a
replica added, stopped, or SIGKILLed with a batch in the teacher) loses nothing and writes nothing twice.

Each replica is a real `python -m shadow_scoring` process with its own /metrics port and log, against the real
broker (Tansu) and one store; the teacher is a vLLM-compatible stand-in (`TeacherServer`) that takes 0.2 s per
batch, so a few hundred trajectories outlast the test's reactions and the test knows which replica has a batch
in flight when it kills it. The stand-in's logprobs are constant: what is tested is who scores what, not the scores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from feature_store.store import FeatureStore
from message_bus.broker import free_port
from schemas.tables import TeacherScoreRow, TrajectoryRow
from scoring_support import TeacherServer, kafka_offsets, produce, score_rows, topics, trajectories, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 4
BURST = 300
ALL = set(range(PARTITIONS))


class Replica:
    """One scorer process of the group, reached through its /metrics and its log file."""

    def __init__(self, name: str, flags: list[str], tmp_path: Path):
        self.name, self.port = name, free_port()
        self.argv = [sys.executable, "-m", "shadow_scoring", *flags, "--client-id", name,
                     "--metrics-port", str(self.port)]
        self.log_path = tmp_path / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Replica:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(self.argv, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        return self

    def metrics(self) -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return ""

    def exported(self, metric: str) -> set[int]:
        """Partitions with a sample of the labelled gauge `metric` on /metrics."""
        return {int(p) for p in re.findall(rf'^{metric}{{[^}}]*partition="(\d+)"', self.metrics(), re.M)}

    def owned(self) -> set[int]:
        return self.exported("shadow_scoring_owned_partition")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> dict:
        """SIGTERM: the step in hand is finished and committed; returns the final stats it prints."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, self.log()[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _flags(bootstrap: str, topic: str, dlq: str, store_url: str, teacher_url: str, vocab: int, tokenizer: Path):
    return ["--bootstrap-servers", bootstrap, "--topic", topic, "--dlq-topic", dlq, "--group-id", f"g-{topic}",
            "--store-url", store_url, "--teacher", teacher_url, "--teacher-model", TeacherServer.MODEL,
            "--teacher-vocab-size", str(vocab), "--teacher-tokenizer", str(tokenizer), "--topk", "0",
            "--session-timeout-ms", "6000", "--max-poll-records", "32", "--batch-tokens", "256",
            "--poll-timeout-ms", "200", "--lag-refresh-s", "0", "--idle-progress-s", "0",
            "--retry-initial-s", "0.2", "--retry-max-s", "1"]


def _vocab(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def _unscored(store: FeatureStore, partitions: set[int]) -> int:
    """Landed trajectories of `partitions` with no score row yet."""
    scored = sa.exists().where(TeacherScoreRow.trajectory_id == TrajectoryRow.trajectory_id)
    with Session(store.engine) as s:
        return s.execute(sa.select(sa.func.count()).select_from(TrajectoryRow)
                         .where(TrajectoryRow.log_partition.in_(sorted(partitions)), ~scored)).scalar_one()


def _busy(teacher: TeacherServer, name: str) -> bool:
    """The replica has had a batch answered (beyond its start-up probe) and has another in the teacher now."""
    return teacher.answered.get(name, 0) > 1 and teacher.in_flight.get(name, 0) > 0


@pytest.fixture
def group(kafka_broker, sqlite_url, tiny_models, tmp_path):
    """(flags of a replica, the store, the stand-in teacher, the topic, its trajectories); replicas are the test's."""
    topic, dlq = topics(kafka_broker.bootstrap, partitions=PARTITIONS)
    store = FeatureStore.open(sqlite_url)  # migrated before any replica starts
    vocab = _vocab(tiny_models[0])
    with TeacherServer(vocab, delay_s=0.2) as teacher:
        def flags(name: str) -> list[str]:
            return _flags(kafka_broker.bootstrap, topic, dlq, sqlite_url, teacher.url(name), vocab, tiny_models[0])

        yield flags, store, teacher, topic, trajectories(BURST, vocab, seed=31)
    store.engine.dispose()


def test_two_replicas_split_four_partitions_and_a_sigkill_mid_batch_loses_and_duplicates_nothing(
        kafka_broker, group, tmp_path):
    flags, store, teacher, topic, trajs = group
    a, b = Replica("scorer-a", flags("scorer-a"), tmp_path), Replica("scorer-b", flags("scorer-b"), tmp_path)
    try:
        a.start(), b.start()
        wait_for(lambda: a.owned() and b.owned() and a.owned() | b.owned() == ALL, 90, "the group to split")
        split = (a.owned(), b.owned())
        produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs])
        wait_for(lambda: _busy(teacher, a.name), 60, "scorer-a with a batch in the teacher")
        in_flight_at_kill = teacher.in_flight[a.name]
        a.kill()  # SIGKILL, a batch in the teacher
        unscored_at_kill = _unscored(store, split[0])
        wait_for(lambda: store.count_scored(TeacherServer.MODEL) == BURST, 120, "every trajectory scored")
        wait_for(lambda: b.owned() == ALL, 30, "scorer-b to own every partition")
        wait_for(lambda: kafka_offsets(kafka_broker.bootstrap, topic, f"g-{topic}") == (BURST, BURST), 30, "offsets")
        lagged = b.exported("shadow_scoring_partition_lag")
        survivor = b.stop()
    finally:
        a.kill()
        b.kill()
    assert not split[0] & split[1]
    assert in_flight_at_kill > 0
    assert unscored_at_kill > 0  # the victim left landed, unscored work in its partitions
    assert score_rows(store) == (BURST, BURST, BURST)  # one score row per trajectory, none missing
    assert sorted(store.scored_ids(TeacherServer.MODEL)) == sorted(t.trajectory_id for t in trajs)
    assert "owns partitions [0, 1, 2, 3]" in b.log()
    assert lagged == ALL
    assert survivor["assignment"] == sorted(ALL)
    assert survivor["partition_lag"] == {str(p): 0 for p in ALL}
    assert survivor["dead_lettered"] == 0


def test_a_replica_added_then_one_stopped_mid_burst_scores_each_trajectory_once(kafka_broker, group, tmp_path):
    """Graceful rebalances (a replica joins, one leaves on SIGTERM) move partitions between steps: no trajectory is
    scored by two replicas, and none is left behind."""
    flags, store, teacher, topic, trajs = group
    a, b = Replica("scorer-a", flags("scorer-a"), tmp_path), Replica("scorer-b", flags("scorer-b"), tmp_path)
    try:
        a.start()
        wait_for(lambda: a.owned() == ALL, 60, "scorer-a to own every partition")
        half = BURST // 2
        produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs[:half]])
        wait_for(lambda: _busy(teacher, a.name), 60, "scorer-a scoring")
        b.start()  # added mid-burst
        wait_for(lambda: b.owned(), 60, "scorer-b to take partitions")
        # a may have scored the first half while b started: the rest arrives once b owns partitions of its own
        produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in trajs[half:]])
        wait_for(lambda: teacher.answered.get(b.name, 0) > 1, 60, "scorer-b to score")
        shared = (a.owned(), b.owned())
        first = a.stop()  # stopped mid-burst
        wait_for(lambda: store.count_scored(TeacherServer.MODEL) == BURST, 120, "every trajectory scored")
        wait_for(lambda: b.owned() == ALL, 30, "scorer-b to own every partition")
        second = b.stop()
    finally:
        a.kill()
        b.kill()
    assert shared[0] | shared[1] == ALL
    assert not shared[0] & shared[1]
    assert score_rows(store) == (BURST, BURST, BURST)
    assert first["rows_written"] + second["rows_written"] == BURST
    assert first["messages_scored"] + second["messages_scored"] == BURST  # no teacher work done twice
    assert first["rebalances"] >= 2  # alone, then sharing
    assert second["assignment"] == sorted(ALL)
