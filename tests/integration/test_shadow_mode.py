"""Shadow mode end to end on tiny models, a real SQLite MLflow registry and a real feature store:

- a gated candidate is loaded beside the champion and mirrored on live requests; the client gets exactly the
  champion's answer, the candidate's answer is logged once as a shadow trajectory with the candidate's version;
- a version that did not pass the gate is refused with a clear error; a candidate that fails to load leaves the
  champion serving and says why in /health;
- stored and scored, shadow trajectories never enter a training window, and the live paired comparison reads
  them (candidate vs champion on the same requests).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from mlflow import MlflowClient

from feature_store import FeatureStore
from model_registry import ADAPTER_ARTIFACT, Registry
from nightly_train.live import compare_live
from serving.config import ServingConfig
from shadow_scoring.teacher import EmbeddedTeacher
from tests.support.serving import live_server, make_adapter, wait_logged

pytestmark = pytest.mark.integration

RANK = 4
ADMIN = "admin-token-for-tests"
MODEL = "tiny-student-lora"


@pytest.fixture(scope="module")
def registry(tiny_models, tmp_path_factory):
    """v1: gated, the champion; v2: gated, the candidate; v3: failed the gate."""
    student, tmp = tiny_models[1], tmp_path_factory.mktemp("shadow-registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment(f"nightly-{uuid.uuid4().hex[:6]}", artifact_location=str(tmp / "art"))
    reg = Registry(uri, MODEL)
    for seed, passed in ((1, True), (2, True), (3, False)):
        run_id = client.create_run(experiment).info.run_id
        client.log_artifacts(run_id, str(make_adapter(student, tmp / f"a{seed}", seed=seed, rank=RANK)),
                             artifact_path=ADAPTER_ARTIFACT)
        client.set_terminated(run_id)
        reg.register_candidate(run_id, tags={}, gate_passed=passed, interval_key=f"night-{seed}")
    reg.approve("1", "alice")
    return uri


@pytest.fixture
def server(tiny_models, tmp_path, registry):
    from serving.adapter_watcher import AdapterWatcher, mlflow_champion_source

    root = tmp_path / "adapters"
    config = ServingConfig(model_dir=tiny_models[1], adapters_root=root, lora_rank=RANK, mlflow_tracking_uri=registry,
                           registry_model_name=MODEL, shadow_fraction=1.0, batch_wait_ms=2)
    with live_server(config, admin_token=ADMIN) as srv:
        watcher = AdapterWatcher(mlflow_champion_source(registry, MODEL, root / "champion-cache"), srv.engine, root,
                                 poll_s=60, base_model_id=srv.engine.base_model_id, rank=RANK)
        assert watcher.poll_once() == "swapped"  # the champion, v1
        yield srv


def _admin(server, method: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{server.url}/v1/shadow", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN}"})


def _chat(server, seed: int, temperature: float = 0.0) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": server.model, "messages": [{"role": "user", "content": f"say something {seed}"}],
        "max_tokens": 6, "temperature": temperature, "seed": seed})
    assert r.status_code == 200, r.text
    return r.json()


def _wait_shadow(server, n: int) -> None:
    deadline = time.monotonic() + 30
    while server.app.state.mirror.status()["mirrored"] < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_mirrored_request_returns_exactly_the_champions_answer(server):
    before = _chat(server, seed=5)
    assert _admin(server, "POST", {"version": "2"}).status_code == 200
    mirrored = _chat(server, seed=5)
    _wait_shadow(server, 1)
    assert mirrored["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
    assert mirrored["system_fingerprint"].endswith("adapter=1")


def test_both_answers_are_logged_once_with_their_versions(server):
    assert _admin(server, "POST", {"version": "2"}).status_code == 200
    answer = _chat(server, seed=6)
    request_id = answer["id"].removeprefix("chatcmpl-")
    _wait_shadow(server, 1)
    logged = wait_logged(server.sink, lambda t: t.request_id == request_id, n=2)
    by_kind = {t.shadow: t for t in logged}
    assert len(logged) == 2
    assert by_kind[False].adapter_version == "1"
    assert by_kind[True].adapter_version == "2"
    assert by_kind[True].sampling == by_kind[False].sampling


def test_a_version_that_did_not_pass_the_gate_is_refused(server):
    r = _admin(server, "POST", {"version": "3"})
    assert r.status_code == 400
    assert "did not pass the gate" in r.json()["error"]["message"]
    assert server.app.state.mirror.target is None


def test_a_candidate_that_fails_to_load_leaves_the_champion_serving_and_says_why(server):
    r = _admin(server, "POST", {"version": "99"})
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert r.status_code == 400
    assert health["adapter_version"] == "1"
    assert "99" in health["shadow"]["last_error"]
    assert _chat(server, seed=7)["system_fingerprint"].endswith("adapter=1")


def test_stopping_shadow_mode_unloads_the_candidate(server):
    assert _admin(server, "POST", {"version": "2"}).status_code == 200
    r = _admin(server, "DELETE")
    assert r.json()["stopped"] == "2"
    assert server.engine.named_adapters() == {}


def test_stored_shadow_trajectories_never_enter_a_training_window_and_feed_the_live_comparison(server, tmp_path,
                                                                                              tiny_models):
    assert _admin(server, "POST", {"version": "2"}).status_code == 200
    start = datetime.now(UTC) - timedelta(seconds=1)
    for seed in range(6):
        _chat(server, seed=100 + seed, temperature=1.0)
    _wait_shadow(server, 6)
    logged = wait_logged(server.sink, lambda t: t.created_at >= start, n=12)
    store = FeatureStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    teacher = EmbeddedTeacher(tiny_models[0], device="cpu")
    store.ingest_scored(list(zip(logged, teacher.score(logged))), teacher.teacher_id)
    window = (start, datetime.now(UTC) + timedelta(seconds=1))
    index = store.scored_prompt_index(teacher.teacher_id, *window)
    shadow_ids = {t.trajectory_id for t in logged if t.shadow}
    pairs = store.shadow_pairs(teacher.teacher_id, "2")
    (comparison,) = compare_live(pairs, "2")
    assert len(shadow_ids) == 6
    assert {tid for tid, _ in index} & shadow_ids == set()
    assert len(index) == 6
    assert store.count_scored(teacher.teacher_id, *window) == 6
    assert len(pairs) == 6
    assert comparison.n_pairs == 6
    assert comparison.kind == "t1"


def test_the_live_comparison_appears_in_promote_status_and_approval_can_require_it(server, tmp_path, tiny_models,
                                                                                 registry, capsys):
    import json

    from shadow_distill.cli import main as cli

    assert _admin(server, "POST", {"version": "2"}).status_code == 200
    for seed in range(4):
        _chat(server, seed=200 + seed, temperature=1.0)
    _wait_shadow(server, 4)
    logged = wait_logged(server.sink, lambda t: t.request_id and t.sampling.seed is not None, n=8)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    teacher = EmbeddedTeacher(tiny_models[0], device="cpu")
    FeatureStore.open(store_url).ingest_scored(list(zip(logged, teacher.score(logged))), teacher.teacher_id)
    config = tmp_path / "nightly.json"
    config.write_text(json.dumps({"store_url": store_url, "mlflow_tracking_uri": registry, "model_name": MODEL,
                                  "student_dir": str(tiny_models[1]), "teacher_dir": str(tiny_models[0]),
                                  "teacher_id": teacher.teacher_id, "runs_dir": str(tmp_path / "runs")}))
    capsys.readouterr()
    assert cli(["promote", "status", "--config", str(config)]) == 0
    live = json.loads(capsys.readouterr().out)["candidate"]["live"]
    refused = cli(["promote", "approve", "--version", "2", "--reviewer", "bob", "--config", str(config),
                   "--min-live-pairs", "1000"])
    tags = Registry(registry, MODEL).version("2").tags
    assert live["pairs"] >= 4
    assert live["comparisons"][0]["kind"] == "t1"
    assert tags["live.t1.pairs"] == str(live["pairs"])
    assert refused == 2
    assert "1000" in capsys.readouterr().err
