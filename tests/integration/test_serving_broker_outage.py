"""Serving under a broker outage: requests keep being answered, and every served choice is logged exactly once.

A burst of requests runs through the official client while the broker first stops answering (SIGSTOP) and later
dies and comes back empty on the same port. Tansu keeps nothing across a restart, so what Kafka acknowledged before
the kill is the broker's loss, counted from the shadow log's `sent` counter at that moment; everything else served
must be in the topic afterwards.
"""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from message_bus.broker import TansuBroker
from message_bus.topics import ensure_topics
from serving.config import ServingConfig
from tests.integration.test_serving_kafka import read_topic
from tests.support.serving import live_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _burst(client, model, n, tag, latencies):
    def one(i):
        t0 = time.monotonic()
        r = client.completions.create(model=model, prompt=f"hello {i}", max_tokens=4, temperature=1.0,
                                      extra_headers={"X-Request-Id": f"{tag}-{i}"})
        latencies.append(time.monotonic() - t0)
        return len(r.choices)

    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(one, range(n)))


@pytest.mark.parametrize("outage", ["paused", "killed"])
def test_served_count_equals_logged_count_across_a_broker_outage(tiny_models, tmp_path, outage):
    topic = f"test.outage.{uuid.uuid4().hex[:8]}"
    with TansuBroker() as broker:
        ensure_topics(broker.bootstrap, {topic: 2})
        config = ServingConfig(model_dir=tiny_models[1], kafka_bootstrap=broker.bootstrap, kafka_topic=topic,
                               spool_dir=tmp_path / "spool", max_tokens_limit=16, default_max_tokens=4)
        latencies: list[float] = []
        with live_server(config, sink="kafka") as srv:  # build_sink(config): the production ShadowLogger
            sink = srv.sink
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
            served = _burst(client, srv.model, 10, "before", latencies)
            time.sleep(1.0)  # let the first burst be acknowledged
            lost_by_broker = 0
            if outage == "paused":
                broker.pause()
            else:
                lost_by_broker = sink.stats()["sent"]  # acknowledged, then gone with the broker's memory
                broker.kill()
            served += _burst(client, srv.model, 20, "during", latencies)
            if outage == "killed":  # unacknowledged records must reach the durable spool
                deadline = time.monotonic() + 30
                while sink.stats()["spooled"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert sink.stats()["spooled"] > 0, sink.stats()
            if outage == "paused":
                broker.resume()
            else:
                broker.start()
                ensure_topics(broker.bootstrap, {topic: 2})
            served += _burst(client, srv.model, 10, "after", latencies)
            logged = read_topic(broker.bootstrap, topic, served - lost_by_broker, timeout_s=90)
    ids = [t.trajectory_id for t in logged]
    assert len(ids) == len(set(ids)), "a trajectory was logged twice"
    assert served == 40
    assert len(ids) + lost_by_broker == served, (len(ids), lost_by_broker, sink.stats())
    if outage == "killed":  # everything not yet acknowledged when the broker died arrived after its restart
        assert {t.request_id.split("-")[0] for t in logged} >= {"during", "after"}
    assert max(latencies) < 30  # requests were answered throughout, not held up by the outage
