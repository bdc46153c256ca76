"""End to end on a real broker: `build_sink` wires the ShadowLogger, a served choice arrives on the topic as a
valid TrajectoryV1 equal to what the client received, opt-outs never reach Kafka, and /metrics shows the
shadow log's counters; and `python -m serving.api_server` flushes the log when it is stopped.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from kafka import KafkaConsumer, TopicPartition

from message_bus.broker import free_port, wait_for_port
from message_bus.topics import consumer_config, ensure_topics
from schemas.trajectory import decode_trajectory
from serving.config import ServingConfig
from tests.support.serving import live_server

pytestmark = pytest.mark.integration


def read_topic(bootstrap: str, topic: str, want: int, timeout_s: float = 20.0) -> list:
    consumer = KafkaConsumer(**consumer_config(bootstrap, None, client_id="serving-test"))
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        found, deadline = [], time.monotonic() + timeout_s
        while len(found) < want and time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=300).values():
                found.extend(decode_trajectory(m.value) for m in messages)
        return found
    finally:
        consumer.close()


def test_served_choices_reach_kafka_as_valid_trajectories(tiny_models, kafka_broker, tmp_path):
    topic = f"test.serving.{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_broker.bootstrap, {topic: 1})
    config = ServingConfig(model_dir=tiny_models[1], kafka_bootstrap=kafka_broker.bootstrap, kafka_topic=topic,
                           spool_dir=tmp_path / "spool", max_tokens_limit=64, default_max_tokens=8)
    with live_server(config, sink="kafka") as srv:  # build_sink(config): the production ShadowLogger
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model=srv.model, prompt="hello", n=2, max_tokens=5, seed=4,
                                      extra_body={"return_token_ids": True}, extra_headers={"X-Request-Id": "kafka-1"})
        client.completions.create(model=srv.model, prompt="hello", max_tokens=2,
                                  extra_headers={"X-Request-Id": "kafka-off", "X-Shadow-Log": "off"})
        logged = read_topic(kafka_broker.bootstrap, topic, 2)
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert sorted((t.request_id, t.choice_index) for t in logged) == [("kafka-1", 0), ("kafka-1", 1)]
    for traj in sorted(logged, key=lambda t: t.choice_index):
        choice = r.choices[traj.choice_index]
        assert traj.completion_token_ids == choice.model_extra["token_ids"]
        assert traj.prompt_token_ids == choice.model_extra["prompt_token_ids"]
        assert traj.completion_text == choice.text
        assert traj.sampling.seed == 4 + traj.choice_index
    assert "shadow_log_accepted 2.0" in metrics
    assert "shadow_log_kafka_connected" in metrics


def test_cli_server_serves_with_a_key_and_flushes_the_shadow_log_on_sigterm(tiny_models, kafka_broker, tmp_path):
    topic = f"test.serving.cli.{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_broker.bootstrap, {topic: 1})
    port, key = free_port(), "sk-cli-0123456789"
    cmd = [sys.executable, "-m", "serving.api_server", "--model-dir", str(tiny_models[1]), "--port", str(port),
           "--device", "cpu", "--torch-threads", "1", "--api-key", key, "--kafka-bootstrap", kafka_broker.bootstrap,
           "--kafka-topic", topic, "--spool-dir", str(tmp_path / "spool"), "--max-tokens-limit", "32",
           "--default-max-tokens", "4"]
    repo = Path(__file__).resolve().parents[2]
    salt = {"SHADOW_DISTILL_CALLER_SALT": "cli-salt-0123456789abcdef"}
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, **salt},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port("127.0.0.1", port, timeout_s=60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        model = client.models.list().data[0].id
        client.completions.create(model=model, prompt="hi", max_tokens=3, extra_headers={"X-Request-Id": "cli-1"})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode in (0, -signal.SIGTERM), output[-2000:]  # uvicorn re-raises the signal it handled
    assert "shadow log closed" in output
    assert "engine stopped" in output
    assert [t.request_id for t in read_topic(kafka_broker.bootstrap, topic, 1)] == ["cli-1"]
