"""The trajectory topic's partition count is chosen where the topic is created: it caps how many scorer
replicas can work at once (a consumer group gives each partition to one member)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from foundation.errors import ConfigError
from message_bus.topics import PARTITIONS_ENV, ensure_trajectory_topics, trajectory_partitions, trajectory_topics

REPO = Path(__file__).resolve().parents[2]


def _partitions(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()


def test_the_partition_count_comes_from_the_argument_then_the_environment_then_4(monkeypatch):
    monkeypatch.setenv(PARTITIONS_ENV, "6")
    assert trajectory_partitions(12) == 12
    assert trajectory_partitions() == 6
    monkeypatch.delenv(PARTITIONS_ENV)
    assert trajectory_partitions() == 4


def test_a_partition_count_that_is_not_a_number_is_refused(monkeypatch):
    monkeypatch.setenv(PARTITIONS_ENV, "many")
    with pytest.raises(ConfigError, match=PARTITIONS_ENV):
        trajectory_partitions()


def test_the_dead_letter_topic_has_one_partition():
    assert trajectory_topics(8, "t", "d") == {"t": 8, "d": 1}


@pytest.mark.integration
def test_ensure_trajectory_topics_creates_the_topic_with_the_count_asked(kafka_broker):
    topic, dlq = f"traj-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    assert sorted(ensure_trajectory_topics(kafka_broker.bootstrap, 6, topic=topic, dlq_topic=dlq)) == sorted([topic, dlq])
    assert (_partitions(kafka_broker.bootstrap, topic), _partitions(kafka_broker.bootstrap, dlq)) == (6, 1)


@pytest.mark.integration
def test_the_command_line_creates_the_topics_with_the_environments_count(kafka_broker):
    topic, dlq = f"traj-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    out = subprocess.run([sys.executable, "-m", "message_bus.topics", "--bootstrap-servers", kafka_broker.bootstrap,
                          "--topic", topic, "--dlq-topic", dlq], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO), PARTITIONS_ENV: "5"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["topics"] == {topic: 5, dlq: 1}
    assert _partitions(kafka_broker.bootstrap, topic) == 5
