"""`store forget` on a live stack (tiny models): serving with its Kafka shadow log, the real broker, the scorer, the
store, MLflow and a night's tasks. Alice asks to be forgotten:
- serving's admin endpoint stops logging her and gives the hash; `shadow-distill store forget` erases her rows and
  scores, and the review page of the night that showed one of her held-out trajectories;
- Bob's rows are untouched; a night run afterwards trains on none of Alice's trajectories.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from mlflow import MlflowClient

from feature_store import FeatureStore
from nightly_train import pipeline
from nightly_train.config import NightlyConfig
from scoring_support import scorer_config, topics, wait_for
from serving.auth import KeyEntry, KeyStore, hash_key
from serving.config import ServingConfig
from shadow_distill.cli import main as cli
from shadow_distill.nightly_file import write_nightly_config
from shadow_scoring.consumer import ScoringService
from tests.support.serving import live_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
ADMIN = "admin-token-for-tests"
SALT = "forget-live-salt-0123456789"
KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789"}


def _send(server, name: str, n: int, offset: int) -> None:
    for i in range(n):
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {KEYS[name]}"},
                       json={"model": server.model, "max_tokens": 6, "temperature": 1.0, "seed": offset + i,
                             "messages": [{"role": "user", "content": f"{name} asks question {offset + i}"}]})
        assert r.status_code == 200, r.text


def _window_scored(cfg, night, served: int) -> None:
    wait_for(lambda: pipeline.window_complete(night)[0] and night.store.count_scored(cfg.teacher_id, night.start,
                                                                                     night.end) >= served,
             120, "the scorer to land and score the window")


@pytest.fixture(scope="module")
def stack(kafka_broker, tiny_models, tmp_path_factory):
    teacher_dir, student_dir = tiny_models
    folder = tmp_path_factory.mktemp("forget-live")
    topic, dlq = topics(kafka_broker.bootstrap)
    cfg_path = write_nightly_config(folder, f"sqlite:///{folder / 'store.db'}", f"sqlite:///{folder / 'mlflow.db'}",
                                    teacher_dir, student_dir, tiny=True)
    raw = json.loads(cfg_path.read_text())
    raw.update(log_topic=topic, scorer_group="forget-live", allowed_lateness_s=1.0, min_heldout=6)
    cfg_path.write_text(json.dumps(raw))
    cfg = NightlyConfig.from_json_file(cfg_path)
    FeatureStore.open(cfg.store_url)
    keys = KeyStore([KeyEntry(name=n, sha256=hash_key(k)) for n, k in KEYS.items()])
    serving_cfg = ServingConfig(model_dir=student_dir, kafka_bootstrap=kafka_broker.bootstrap, kafka_topic=topic,
                                spool_dir=folder / "spool")
    scfg = scorer_config(kafka_broker.bootstrap, topic, dlq, cfg.store_url, teacher_dir, group_id="forget-live",
                         student_tokenizer=str(student_dir))
    service, stop = ScoringService.from_config(scfg), threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        with live_server(serving_cfg, sink="kafka", keys=keys, admin_token=ADMIN, caller_salt=SALT) as server:
            yield {"cfg": cfg, "cfg_path": cfg_path, "server": server}
    finally:
        stop.set()
        runner.join(30)


@pytest.fixture(scope="module")
def first_night(stack):
    cfg, server = stack["cfg"], stack["server"]
    start = datetime.now(UTC)
    _send(server, "alice", 8, 0)
    _send(server, "bob", 8, 100)
    time.sleep(1.5)
    night = pipeline.Night(cfg, start, datetime.now(UTC))
    _window_scored(cfg, night, 16)
    pipeline.snapshot(night)
    trained = pipeline.train(night)
    evaluation = pipeline.evaluate(night, trained)
    pipeline.review(night, evaluation, pipeline.gate(night, evaluation))
    return night, trained.run_id


@pytest.fixture(scope="module")
def forgotten(stack, first_night):
    cfg, server = stack["cfg"], stack["server"]
    night, run_id = first_night
    before = {"scored": len(night.store.scored_ids(cfg.teacher_id)),
              "review": [a.path for a in MlflowClient(cfg.mlflow_tracking_uri).list_artifacts(run_id, "review")]}
    answer = httpx.post(f"{server.url}/v1/admin/forget", json={"caller": "alice"}, timeout=30,
                        headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert cli(["store", "forget", "--url", cfg.store_url, "--caller-hash", answer["hash"], "--actor", "dpo",
                "--config", str(stack["cfg_path"])]) == 0
    return {"hash": answer["hash"], "before": before}


def _stored_callers(cfg) -> list[str]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from schemas.tables import TrajectoryRow

    with Session(FeatureStore.open(cfg.store_url).engine) as s:
        return list(s.execute(select(TrajectoryRow.caller_hash)).scalars())


def test_the_callers_rows_are_gone_from_the_store(stack, forgotten):
    callers = _stored_callers(stack["cfg"])
    assert forgotten["hash"] not in callers
    assert len(callers) == forgotten["before"]["scored"] - 8  # Bob's eight stay


def test_the_review_page_that_showed_them_is_purged_from_mlflow(stack, first_night, forgotten):
    client = MlflowClient(stack["cfg"].mlflow_tracking_uri)
    _, run_id = first_night
    assert forgotten["before"]["review"]  # there was a page to purge
    assert client.list_artifacts(run_id, "review") == []
    assert "erasure" in client.get_run(run_id).data.tags["review.purged"]


def test_a_night_run_afterwards_trains_on_none_of_them(stack, forgotten):
    cfg, server = stack["cfg"], stack["server"]
    start = datetime.now(UTC)
    _send(server, "alice", 4, 200)
    _send(server, "bob", 8, 300)
    time.sleep(1.5)
    night = pipeline.Night(cfg, start, datetime.now(UTC) + timedelta(seconds=1))
    _window_scored(cfg, night, 8)
    pipeline.snapshot(night)
    manifest, train_ids, heldout_ids = pipeline.frozen_manifest(night)
    trained = pipeline.train(night)
    run = MlflowClient(cfg.mlflow_tracking_uri).get_run(trained.run_id)
    assert manifest.n_train + manifest.n_heldout == 8  # Bob's eight; Alice's four were never logged
    assert forgotten["hash"] not in _stored_callers(cfg)
    assert int(run.data.params["n_train_trajectories"]) == manifest.n_train
