"""A night on production-like traffic, through the real broker, scorer, store and MLflow (tiny models):

- mixed decoding (greedy, temperature 0.7 and 1, n = 2 choices, repeated prompts) and traffic from an adapter the
  registry does not know (`exp-7`): the night trains, and reports the unknown policy;
- a stopped scorer keeps the night waiting (nothing landed, the log not seen past the window's end); once it ran,
  the night freezes the whole window;
- the split is by prompt: no held-out prompt is a training prompt or a rollout prompt;
- an all-greedy window teaches through the teacher's stored top-k (the scorer's default) at the states it visited.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from mlflow import MlflowClient

from model_runtime.models import ModelMeta
from nightly_train import pipeline
from nightly_train.config import NightlyConfig
from scoring_support import produce, scorer_config, topics, wait_for
from shadow_scoring.consumer import ScoringService
from tests.support.trajectories import GREEDY, T1, T07, TEXTS, sample_trajectories

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _night_config(tmp_path, tiny_models, topic: str, group: str, **train) -> NightlyConfig:
    teacher_dir, student_dir = tiny_models
    return NightlyConfig.parse({
        "store_url": f"sqlite:///{tmp_path / 'store.db'}", "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "student_dir": str(student_dir), "teacher_dir": str(teacher_dir),
        "teacher_id": ModelMeta.read(teacher_dir).model_id, "runs_dir": str(tmp_path / "runs"),
        "log_topic": topic, "scorer_group": group, "allowed_lateness_s": 1.0, "coverage_threshold": 1.0,
        "min_trajectories": 4, "heldout_percent": 25, "min_heldout": 3,
        "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "lora": {"rank": 4, "alpha": 8},
                  "rollouts": {"enabled": True, "per_step": 2, "max_tokens": 6}, **train},
        "eval": {"ifeval_subset": 8, "ifeval_max_tokens": 8, "kl_prompts": 6, "kl_max_tokens": 8},
        "gate": {"min_prompts": 8, "kl_margin": 5.0},
    })


def _score_window(kafka_broker, cfg: NightlyConfig, topic: str, dlq: str, night: pipeline.Night) -> None:
    """Run the real scorer until the night's window is complete, then stop it."""
    scfg = scorer_config(kafka_broker.bootstrap, topic, dlq, cfg.store_url, cfg.teacher_dir,
                         group_id=cfg.scorer_group, student_tokenizer=str(cfg.student_dir))
    service, stop = ScoringService.from_config(scfg), threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: pipeline.window_complete(night)[0], 90, "the scorer to land and score the window")
    finally:
        stop.set()
        runner.join(30)


@pytest.fixture(scope="module")
def mixed_night(kafka_broker, tmp_path_factory, tiny_models):
    tmp_path = tmp_path_factory.mktemp("mixed-night")
    topic, dlq = topics(kafka_broker.bootstrap)
    cfg = _night_config(tmp_path, tiny_models, topic, f"g-{uuid.uuid4().hex[:8]}")
    end = datetime.now(UTC) - timedelta(minutes=1)
    window = (end - timedelta(hours=1), end)
    served = sample_trajectories(cfg.student_dir, TEXTS + TEXTS[:4], [GREEDY, T07, T1], window, n=2, seed=1)
    served += sample_trajectories(cfg.student_dir, TEXTS[4:8], [T1], window, adapter_version="exp-7", seed=2)
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in served])
    night = pipeline.Night(cfg, *window)
    waiting_before_scorer, seen_before = pipeline.window_complete(night)
    _score_window(kafka_broker, cfg, topic, dlq, night)
    manifest = pipeline.snapshot(night)
    return {"cfg": cfg, "night": night, "served": served, "waiting": waiting_before_scorer, "seen": seen_before,
            "manifest": manifest}


def test_a_stopped_scorer_keeps_the_night_waiting(mixed_night):
    assert mixed_night["waiting"] is False
    assert mixed_night["seen"]["landed"] == 0
    assert mixed_night["seen"]["watermark"] is None


def test_the_night_then_freezes_the_whole_window(mixed_night):
    manifest = mixed_night["manifest"]
    assert manifest.n_train + manifest.n_heldout == len(mixed_night["served"])


def test_no_held_out_prompt_is_a_training_prompt(mixed_night):
    night = mixed_night["night"]
    _, train_ids, heldout_ids = pipeline.frozen_manifest(night)
    store = night.store
    train_prompts = {t.prompt_hash for t in store.load_scored(train_ids, night.cfg.teacher_id)}
    heldout_prompts = {t.prompt_hash for t in store.load_scored(heldout_ids, night.cfg.teacher_id)}
    assert heldout_prompts
    assert train_prompts & heldout_prompts == set()


@pytest.fixture(scope="module")
def trained(mixed_night):
    """Train the mixed night, recording which prompts the trainer was given to roll out."""
    from nightly_train import train as train_module

    seen: dict = {}
    original = train_module.Distiller.__init__

    def recording_init(self, cfg, examples, rollout_prompts=None):
        seen["rollout_prompts"] = [list(p) for p in rollout_prompts or []]
        original(self, cfg, examples, rollout_prompts)

    train_module.Distiller.__init__ = recording_init
    try:
        result = pipeline.train(mixed_night["night"])
    finally:
        train_module.Distiller.__init__ = original
    return {"result": result, **seen}


def test_no_held_out_prompt_is_a_rollout_prompt(mixed_night, trained):
    night = mixed_night["night"]
    _, _, heldout_ids = pipeline.frozen_manifest(night)
    heldout_prompts = {tuple(t.prompt_ids) for t in night.store.load_scored(heldout_ids, night.cfg.teacher_id)}
    rollout = {tuple(p) for p in trained["rollout_prompts"]}
    assert rollout
    assert rollout & heldout_prompts == set()


def test_a_night_with_exp_7_traffic_trains_and_reports_the_unknown_policy(mixed_night, trained):
    run = MlflowClient(mixed_night["cfg"].mlflow_tracking_uri).get_run(trained["result"].run_id)
    assert trained["result"].steps == 3
    assert run.data.metrics["data.policies.unknown"] >= 1
    assert run.data.metrics["data.trajectories.topk_analytic"] >= 1  # greedy, T 0.7 and exp-7 rows via top-k


def test_every_rule_trained_on_some_tokens(mixed_night, trained):
    metrics = MlflowClient(mixed_night["cfg"].mlflow_tracking_uri).get_run(trained["result"].run_id).data.metrics
    assert metrics["train.tokens_total.sampled_is"] > 0
    assert metrics["train.tokens_total.topk_analytic"] > 0
    assert metrics["train.tokens_total.rollout"] > 0


def test_an_all_greedy_window_trains_on_the_teachers_top_k_at_its_states(kafka_broker, tmp_path, tiny_models):
    """Greedy traffic's importance weights mean nothing, but its states are on-policy: rule 2 trains on them through
    the top-k the scorer stores by default, and the exact reverse KL at those states falls. (Tiny random models do
    not generalise across prompts, so the held-out meter is shown moving on SmolLM2: test_real_model_night.py.)"""
    import torch

    from model_runtime.logprobs import completion_logits
    from model_runtime.models import load_model
    from nightly_train.evaluate import student_with_adapter
    from nightly_train.losses import full_reverse_kl

    topic, dlq = topics(kafka_broker.bootstrap)
    cfg = _night_config(tmp_path, tiny_models, topic, f"g-{uuid.uuid4().hex[:8]}", max_steps=12, epochs=6,
                        rollouts={"enabled": False}, learning_rate=3e-3)
    end = datetime.now(UTC) - timedelta(minutes=1)
    window = (end - timedelta(hours=1), end)
    served = sample_trajectories(cfg.student_dir, TEXTS, [GREEDY], window, seed=3)
    produce(kafka_broker.bootstrap, topic, [(t.key, t.to_bytes()) for t in served])
    night = pipeline.Night(cfg, *window)
    _score_window(kafka_broker, cfg, topic, dlq, night)
    manifest = pipeline.snapshot(night)
    trained = pipeline.train(night)
    _, train_ids, _ = pipeline.frozen_manifest(night)
    states = night.store.load_scored(train_ids, cfg.teacher_id)
    teacher = load_model(cfg.teacher_dir)

    def exact_reverse_kl(model) -> float:
        prompts, comps = [t.prompt_ids for t in states], [t.completion_ids for t in states]
        with torch.no_grad():
            s = completion_logits(model, prompts, comps, 0)
            t = completion_logits(teacher, prompts, comps, 0)
        return full_reverse_kl(s.logits_BCV, t.logits_BCV, s.mask_BC).item()

    metrics = MlflowClient(cfg.mlflow_tracking_uri).get_run(trained.run_id).data.metrics
    assert trained.steps == 12
    assert metrics["data.trajectories.topk_analytic"] == manifest.n_train
    before = exact_reverse_kl(student_with_adapter(cfg.student_dir, None))
    after = exact_reverse_kl(student_with_adapter(cfg.student_dir, night.layout.adapter_dir))
    assert after < 0.9 * before, (before, after)
