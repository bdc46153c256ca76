"""The v1 -> v2 rolling upgrade: readers keep reading v1 while the topic may still hold it.

Old serving pods keep writing v1 until the rollout ends, and the topic keeps their messages for its retention
after that. This is the CI check that fails if the v1 reader is removed (or the golden v1 messages stop
parsing) while `schemas.trajectory.v1_may_be_in_topic` says v1 can still arrive.
"""

from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml

from schemas import trajectory as contract

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_V1 = ROOT / "tests" / "fixtures" / "trajectory.v1.golden.jsonl"


def topic_retention() -> timedelta:
    """The longest retention any deployment in infra/ gives the trajectory topic (Kubernetes and compose)."""
    docs = yaml.safe_load_all((ROOT / "infra" / "k8s" / "base" / "kafka.yaml").read_text())
    k8s = [int(d["spec"]["config"]["retention.ms"]) for d in docs
           if d and d.get("kind") == "KafkaTopic" and d["spec"]["topicName"] == contract.DEFAULT_TOPIC]
    env = [int(line.split("=", 1)[1]) for line in (ROOT / "infra" / ".env.example").read_text().splitlines()
           if line.startswith("TRAJECTORY_RETENTION_MS=")]
    assert k8s and env, "the trajectory topic's retention is no longer where this check reads it"
    return timedelta(milliseconds=max(k8s + env))


def golden_v1_messages() -> list[str]:
    return [line for line in GOLDEN_V1.read_text().splitlines() if line.strip()]


def test_the_infra_retention_is_read():
    assert topic_retention() == timedelta(days=7)


def test_while_v1_may_be_in_the_topic_version_1_is_read():
    if not contract.v1_may_be_in_topic(date.today(), topic_retention()):
        pytest.skip("the last v1 writer stopped more than the topic's retention ago: the v1 reader may go")
    assert 1 in contract.READ_VERSIONS


@pytest.mark.parametrize("index", [0, 1])
def test_while_v1_may_be_in_the_topic_a_golden_v1_message_decodes(index):
    if not contract.v1_may_be_in_topic(date.today(), topic_retention()):
        pytest.skip("the last v1 writer stopped more than the topic's retention ago: the v1 reader may go")
    assert contract.decode_trajectory(golden_v1_messages()[index]).schema_version == 1


def test_v1_may_be_in_the_topic_while_a_v1_writer_may_run():
    assert contract.v1_may_be_in_topic(date(2030, 1, 1), timedelta(days=7), retired_on=None)


def test_v1_may_be_in_the_topic_within_retention_after_the_last_writer():
    assert contract.v1_may_be_in_topic(date(2027, 1, 8), timedelta(days=7), retired_on=date(2027, 1, 1))


def test_v1_is_gone_a_retention_and_a_day_after_the_last_writer():
    assert not contract.v1_may_be_in_topic(date(2027, 1, 10), timedelta(days=7), retired_on=date(2027, 1, 1))


def test_serving_writes_the_newest_version_readers_read():
    assert contract.SCHEMA_VERSION == max(contract.READ_VERSIONS)
