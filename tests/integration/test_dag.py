"""The real nightly DAG under `airflow dags test`, on tiny models, a SQLite feature store and a SQLite MLflow.

Four nights over one registry, in the order production would see them:
- a normal night registers exactly one version with alias `candidate` and freezes its manifest;
- rerunning the same window changes nothing (same manifest, same MLflow run, still one version);
- a night with too little traffic short-circuits and still ends green;
- after a reviewer approves version 1, a night whose candidate cannot pass a strict KL gate registers nothing and
  moves no alias; its snapshot froze champion v1 before the reviewer moved the alias away mid-night, and every
  later task still trained on and compared with v1.
The feature store holds real trajectories: the tiny student's own samples, scored by the tiny teacher. The DAG
runs through `shadow_distill.demo.run_airflow_dag`, the same call the demo makes.

    .venv/bin/python -m pytest tests/integration/test_dag.py -q      # about 3-4 minutes on 2 cores
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from feature_store import FeatureStore
from feature_store.records import PartitionProgress
from feature_store.store import TeacherScores
from model_registry.registry import Registry
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import ModelMeta, eos_token_ids, load_model, load_tokenizer
from model_runtime.sampling import DecodeParams, sample
from model_runtime.tokenizers import folder_fingerprint
from foundation.errors import ShadowDistillError
from nightly_train import pipeline
from nightly_train.config import NightlyConfig
from nightly_train.layout import RunLayout, interval_key
from nightly_train.pipeline import RUN_TAG
from nightly_train.results import Evaluation
from schemas.trajectory import SamplingParams, TrajectoryV1
from shadow_distill.demo import Progress, run_airflow_dag
from shadow_distill.nightly_file import write_nightly_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DAY = datetime(2026, 3, 10, 2, tzinfo=UTC)
NIGHT_1 = (DAY - timedelta(days=1), DAY)
NIGHT_QUIET = (DAY, DAY + timedelta(days=1))
NIGHT_STRICT = (DAY + timedelta(days=1), DAY + timedelta(days=2))
TEXTS = ["Give three tips about sleep.", "Explain tea to a child.", "Write about bicycles.", "Why do plants grow?",
         "How do I save money?", "Describe a museum.", "Plan a short trip.", "What is a resume?",
         "Tell me about chess.", "How to bake bread?", "Name two kinds of pasta.", "Why learn to swim?"]


@dataclass
class Env:
    folder: Path
    cfg_path: Path
    strict_cfg_path: Path
    cfg: NightlyConfig

    def registry(self) -> Registry:
        return Registry(self.cfg.mlflow_tracking_uri, self.cfg.registered_model())

    def versions(self) -> list[str]:
        from mlflow import MlflowClient

        found = MlflowClient(self.cfg.mlflow_tracking_uri).search_model_versions(
            f"name = '{self.cfg.registered_model()}'")
        return sorted(str(v.version) for v in found)

    def runs_of(self, window: tuple[datetime, datetime]) -> list:
        from mlflow import MlflowClient

        client = MlflowClient(self.cfg.mlflow_tracking_uri)
        exp = client.get_experiment_by_name(self.cfg.experiment)
        return [] if exp is None else client.search_runs(
            [exp.experiment_id], f"tags.`{RUN_TAG}` = '{interval_key(*window)}'")

    def run_dag(self, window: tuple[datetime, datetime], cfg_path: Path | None = None) -> None:
        run_airflow_dag(self.folder, cfg_path or self.cfg_path, *window, Progress(0))


def _fill(store: FeatureStore, teacher_dir: Path, student_dir: Path, window: tuple[datetime, datetime],
          n: int, seed: int) -> int:
    """n trajectories sampled from the student at temperature 1 inside `window`, scored by the teacher."""
    tok = load_tokenizer(student_dir)
    student, teacher = load_model(student_dir), load_model(teacher_dir)
    prompts = [tok(TEXTS[i % len(TEXTS)]).input_ids for i in range(n)]
    params = [DecodeParams(max_tokens=8, temperature=1.0, seed=seed * 1000 + i) for i in range(n)]
    results = sample(student, prompts, params, eos_ids=eos_token_ids(tok, student), pad_id=tok.pad_token_id)
    kept = [(p, r) for p, r in zip(prompts, results) if r.completion_ids]
    scores = completion_logprobs(teacher, [p for p, _ in kept], [r.completion_ids for _, r in kept], tok.pad_token_id)
    step = (window[1] - window[0]) / (len(kept) + 1)
    items = []
    for i, ((prompt_ids, res), scored) in enumerate(zip(kept, scores)):
        kind, behaviour = res.behaviour(1.0)
        traj = TrajectoryV1(
            trajectory_id=uuid.uuid4().hex, request_id=f"req-{seed}-{i}", choice_index=0,
            created_at=window[0] + step * (i + 1), base_model_id=ModelMeta.read(student_dir).model_id,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=8, seed=params[i].seed),
            prompt_token_ids=list(prompt_ids), completion_token_ids=res.completion_ids, behaviour_logprobs=behaviour,
            logprob_kind=kind, finish_reason="stop" if res.finish_reason == "stop" else "length")
        items.append((traj, TeacherScores(np.asarray(scored.logprobs_C, dtype=np.float32))))
    return store.ingest_scored(items, ModelMeta.read(teacher_dir).model_id,
                               tokenizer_fingerprint=folder_fingerprint(teacher_dir), teacher_temperature=1.0)


def _log_seen_until_now(store: FeatureStore, cfg: NightlyConfig) -> None:
    """What the scorer records as it reads the log: here, its one partition caught up now, long after every window
    of these tests ended (the trajectories were written straight into the store)."""
    store.land([], [PartitionProgress(group_id=cfg.scorer_group, topic=cfg.log_topic, partition=0, next_offset=0,
                                      partitions_total=1, caught_up_at=datetime.now(UTC))])


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models) -> Env:
    teacher_dir, student_dir = tiny_models
    folder = tmp_path_factory.mktemp("dag")
    store_url = f"sqlite:///{folder / 'store.db'}"
    mlflow_uri = f"sqlite:///{folder / 'mlflow.db'}"
    cfg_path = write_nightly_config(folder, store_url, mlflow_uri, teacher_dir, student_dir, tiny=True)
    strict = json.loads(cfg_path.read_text())
    strict["gate"] = {**strict["gate"], "kl_ratio": 1e-6, "kl_margin": 0.0}  # no candidate is ~1e6x closer
    strict_cfg_path = folder / "nightly-strict.json"
    strict_cfg_path.write_text(json.dumps(strict))
    store = FeatureStore.open(store_url)
    cfg = NightlyConfig.from_json_file(cfg_path)
    assert _fill(store, teacher_dir, student_dir, NIGHT_1, 16, seed=1) >= 12
    assert _fill(store, teacher_dir, student_dir, NIGHT_QUIET, cfg.min_trajectories - 2, seed=2) < cfg.min_trajectories
    assert _fill(store, teacher_dir, student_dir, NIGHT_STRICT, 16, seed=3) >= 12
    _log_seen_until_now(store, cfg)
    return Env(folder, cfg_path, strict_cfg_path, cfg)


@pytest.fixture(autouse=True)
def _fast_failures(monkeypatch):
    monkeypatch.setenv("SHADOW_DISTILL_RETRIES", "0")
    monkeypatch.setenv("SHADOW_DISTILL_RETRY_DELAY_S", "1")


def _manifest(env: Env, window) -> tuple[list[str], list[str]]:
    row = FeatureStore.open(env.cfg.store_url).get_manifest(interval_key(*window))
    assert row is not None, f"no manifest for {interval_key(*window)}"
    return json.loads(row.train_ids_json), json.loads(row.heldout_ids_json)


@pytest.fixture(scope="module")
def first_night(env: Env) -> dict:
    env.run_dag(NIGHT_1)
    runs = env.runs_of(NIGHT_1)
    return {"manifest": _manifest(env, NIGHT_1), "run_ids": sorted(r.info.run_id for r in runs)}


def test_a_night_registers_one_candidate_with_its_manifest(env, first_night):
    assert env.versions() == ["1"]
    candidate = env.registry().alias("candidate")
    assert candidate is not None
    assert candidate.version == "1"
    assert candidate.gate_passed
    assert len(first_night["run_ids"]) == 1
    assert candidate.run_id == first_night["run_ids"][0]
    train_ids, heldout_ids = first_night["manifest"]
    assert train_ids
    assert heldout_ids
    assert not set(train_ids) & set(heldout_ids)
    layout = RunLayout.for_window(env.cfg.runs_dir, *NIGHT_1)
    assert layout.adapter_dir.is_dir()
    assert (layout.review_dir / "index.html").is_file()  # the review task ran


def test_rerunning_the_same_night_changes_nothing(env, first_night):
    env.run_dag(NIGHT_1)
    assert env.versions() == ["1"]
    assert _manifest(env, NIGHT_1) == first_night["manifest"]
    assert sorted(r.info.run_id for r in env.runs_of(NIGHT_1)) == first_night["run_ids"]  # training reused
    assert env.registry().alias("candidate").version == "1"


def test_a_night_with_too_little_traffic_short_circuits_green(env, first_night):
    before = env.versions()
    env.run_dag(NIGHT_QUIET)  # raises unless the run state is success
    assert env.versions() == before
    assert env.runs_of(NIGHT_QUIET) == []  # nothing trained
    assert FeatureStore.open(env.cfg.store_url).get_manifest(interval_key(*NIGHT_QUIET)) is None


def test_a_failing_candidate_registers_nothing_and_the_night_keeps_the_champion_its_snapshot_froze(env, first_night):
    registry = env.registry()
    registry.approve("1", "test-reviewer")
    strict = pipeline.Night(NightlyConfig.from_json_file(env.strict_cfg_path), *NIGHT_STRICT)
    assert pipeline.snapshot(strict).champion_version == "1"
    # A reviewer moves the alias mid-night (here: away from every version); the night must not notice.
    from mlflow import MlflowClient

    MlflowClient(env.cfg.mlflow_tracking_uri).delete_registered_model_alias(env.cfg.registered_model(), "champion")
    env.run_dag(NIGHT_STRICT, env.strict_cfg_path)
    assert env.versions() == ["1"]
    assert registry.champion() is None  # a failed gate moves no alias
    runs = env.runs_of(NIGHT_STRICT)
    assert len(runs) == 1, "the strict night must have trained a candidate"
    tags = runs[0].data.tags
    assert tags["gate.passed"] == "false"
    assert "kl" in tags["gate.failed_checks"].split(",")
    assert tags["champion_version"] == "1"  # trained on top of the champion the snapshot froze
    evaluation = Evaluation.read(strict.layout.evaluation_file(runs[0].info.run_id))
    assert evaluation.reference == "champion:v1"  # and compared with it
    registry.approve("1", "test-reviewer")


def test_a_failing_task_fails_the_run(env, tmp_path):
    bad = json.loads(env.cfg_path.read_text())
    bad["store_url"] = f"sqlite:///{tmp_path / 'missing' / 'store.db'}"  # its folder does not exist
    path = tmp_path / "nightly-bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ShadowDistillError, match="run state failed"):
        env.run_dag(NIGHT_1, path)
