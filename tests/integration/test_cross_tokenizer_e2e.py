"""A teacher of another model family end to end, on real models and a real broker: SmolLM2 serves a chat request
(trajectory v2 to Kafka), an old serving pod's v1 message of the same answer shares the topic, the scorer with
`cross_tokenizer` and the Gemma 3 270M teacher lands both and stores span scores, and one training step of the
SmolLM2 student runs on them (span advantages).
"""

from __future__ import annotations

import time
import uuid

import openai
import pytest
from kafka import KafkaConsumer, TopicPartition

from feature_store.store import FeatureStore
from message_bus.topics import consumer_config
from model_runtime.gemma import GEMMA_ID, ensure_gemma
from model_runtime.models import ModelMeta, ensure_teacher
from model_runtime.tokenizers import folder_fingerprint
from nightly_train.config import TrainConfig
from nightly_train.data import PolicyLineage, Provenance, build_examples
from nightly_train.train import Distiller
from schemas.trajectory import TrajectoryV1, decode_trajectory
from serving.config import ServingConfig
from shadow_scoring.consumer import ScoringService
from tests.integration.scoring_support import produce, scorer_config, step_until, topics
from tests.support.serving import live_server

pytestmark = pytest.mark.integration

QUESTION = "Say good morning in French, in one short sentence."


def read_one(bootstrap: str, topic: str, timeout_s: float = 30.0):
    consumer = KafkaConsumer(**consumer_config(bootstrap, None, client_id="xtok-test"))
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=300).values():
                return decode_trajectory(messages[0].value)
        raise AssertionError("serving logged nothing")
    finally:
        consumer.close()


def as_v1(t) -> TrajectoryV1:
    """The same answer as an old serving pod (v1) would have logged it."""
    fields = t.model_dump(include=set(TrajectoryV1.model_fields) - {"schema_version"})
    return TrajectoryV1(**{**fields, "trajectory_id": uuid.uuid4().hex})


@pytest.fixture(scope="module")
def landed(kafka_broker, tmp_path_factory):
    """(store, the v2 trajectory, the v1 twin, the scorer's stats) after serving, producing and scoring."""
    tmp = tmp_path_factory.mktemp("xtok-e2e")
    smol, gemma = ensure_teacher(), ensure_gemma()
    topic, dlq = topics(kafka_broker.bootstrap, partitions=1)
    serving_cfg = ServingConfig(model_dir=smol, kafka_bootstrap=kafka_broker.bootstrap, kafka_topic=topic,
                                spool_dir=tmp / "spool", max_tokens_limit=64, default_max_tokens=24)
    with live_server(serving_cfg, sink="kafka") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": QUESTION}],
                                       temperature=1.0, seed=3, max_tokens=24)
        v2 = read_one(kafka_broker.bootstrap, topic)
    v1 = as_v1(v2)
    produce(kafka_broker.bootstrap, topic, [(v1.key, v1.to_bytes())])
    store_url = f"sqlite:///{tmp / 'store.db'}"
    cfg = scorer_config(kafka_broker.bootstrap, topic, dlq, store_url, gemma, student_tokenizer=str(smol),
                        cross_tokenizer=True, batch_tokens=4096)
    store = FeatureStore.open(store_url)
    with ScoringService.from_config(cfg) as service:
        step_until(service, lambda: service.stats()["messages_scored"] + service.stats()["rejected"] >= 2, timeout_s=120)
        stats = service.stats()
    return store, v2, v1, stats, smol


def test_serving_logs_the_chat_request_as_v2_with_its_messages(landed):
    _, v2, _, _, _ = landed
    assert (v2.schema_version, [m.content for m in v2.messages]) == (2, [QUESTION])


def test_a_v1_and_a_v2_message_in_one_topic_both_land(landed):
    store, v2, v1, _, _ = landed
    got = store.load_logged([v2.trajectory_id, v1.trajectory_id])
    assert [lt.trajectory.schema_version for lt in got] == [2, 1]


def test_the_gemma_teacher_scores_both(landed):
    _, _, _, stats, _ = landed
    assert (stats["messages_scored"], stats["rejected"]) == (2, 0)


def test_the_stored_scores_are_per_student_token_over_spans(landed):
    store, v2, _, _, _ = landed
    s = store.load_scored([v2.trajectory_id], GEMMA_ID)[0]
    assert len(s.teacher.span_id_C) == len(v2.completion_token_ids)


def test_both_versions_get_the_same_span_scores(landed):
    store, v2, v1, _, _ = landed
    a, b = store.load_scored([v2.trajectory_id, v1.trajectory_id], GEMMA_ID)
    assert a.teacher.teacher_logprobs_C.tolist() == b.teacher.teacher_logprobs_C.tolist()


def test_the_scores_are_stamped_with_the_students_tokenizer(landed):
    store, v2, _, _, smol = landed
    assert store.load_scored([v2.trajectory_id], GEMMA_ID)[0].student_tokenizer_fingerprint == folder_fingerprint(smol)


def test_one_training_step_of_the_student_on_the_gemma_scores(landed, tmp_path):
    store, v2, v1, _, smol = landed
    rows = store.load_scored([v2.trajectory_id, v1.trajectory_id], GEMMA_ID)
    prov = Provenance(student_base=ModelMeta.read(smol).model_id, tokenizer_fingerprint=folder_fingerprint(smol),
                      teacher_temperature=1.0, lineage=PolicyLineage(None, {}))
    cfg = TrainConfig(student_dir=smol, teacher_id=GEMMA_ID, output_dir=tmp_path, batch_size=2, max_steps=1,
                      epochs=1, lora={"rank": 4, "alpha": 8}, device="cpu")
    examples, _ = build_examples(rows, cfg, prov)
    result = Distiller(cfg, examples).run(progress=False)
    assert result.tokens_by_rule() == {"sampled_is": 2 * len(v2.completion_token_ids)}
