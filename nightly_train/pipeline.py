"""One nightly run as plain functions, one per DAG task, each idempotent on the data interval.

The Airflow DAG (`dags/shadow_distill_nightly.py`) only calls these; `shadow-distill nightly run` calls them in
order without Airflow. Every function takes the `NightlyConfig` and the interval [start, end) and can be rerun:
- `snapshot` freezes the interval's training and held-out trajectory ids in the feature store the first time;
- `train` reuses a finished MLflow run of the same interval, or resumes the interval's checkpoints;
- `register` is idempotent in the registry on the interval key (no duplicate model version).

    shadow-distill nightly run --config nightly.json --start 2026-11-24T02:00Z --end 2026-11-25T02:00Z
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from nightly_train.config import TrainConfig

log = logging.getLogger(__name__)
RUN_TAG = "shadow_distill.interval_key"


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ifeval_path: Path | None = Field(None, description="IFEval JSONL; None = the project's own small set.")
    ifeval_subset: int | None = Field(None, ge=1, description="Seeded subset size (None = all prompts).")
    ifeval_seed: int = Field(0, description="Seed of the subset.")
    ifeval_max_tokens: int = Field(128, ge=1, description="Greedy answer length cap.")
    kl_prompts: int = Field(16, ge=2, description="Held-out prompts for the reverse-KL meter.")
    kl_max_tokens: int = Field(64, ge=1, description="Sampled tokens per held-out prompt.")
    seed: int = Field(0, description="Seed of the held-out samples (same for candidate and champion).")
    greedy_prompt: str = Field("Give three tips for staying healthy.", description="Shown before/after.")


class GateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ifeval_tolerance: float = 0.0
    alpha: float = 0.05
    kl_ratio: float = 1.0
    kl_margin: float = 0.0
    min_prompts: int = 20

    def policy(self):
        from nightly_train.gate import GatePolicy

        return GatePolicy(**self.model_dump())


class NightlyConfig(BaseModel):
    """Everything a night needs; read from a JSON file named by $SHADOW_DISTILL_NIGHTLY_CONFIG or --config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store_url: str = Field(description="Feature store SQLAlchemy URL.")
    mlflow_tracking_uri: str = Field(description="MLflow tracking (and registry) URI.")
    model_name: str | None = Field(None, description="Registered model; default 'shadow-distill-<student id>'.")
    student_dir: Path
    teacher_dir: Path
    teacher_id: str = Field(min_length=1, description="Whose stored scores to train on.")
    runs_dir: Path = Field(description="Working folders, one per interval (checkpoints, adapters, reports).")
    experiment: str = "shadow-distill-nightly"
    coverage_threshold: float = Field(0.99, gt=0.0, le=1.0, description="Scored fraction to wait for.")
    min_trajectories: int = Field(8, ge=1, description="Fewer scored trajectories than this: skip the night.")
    heldout_percent: int = Field(20, ge=1, le=90, description="Share of trajectories held out, by id hash.")
    min_heldout: int = Field(2, ge=1, description="Held-out trajectories kept even when the share rounds lower "
                                                  "(the KL gate needs at least 2 to compare).")
    retention_days: int = Field(30, ge=1, description="Trajectories older than this are purged.")
    notify_webhook: str | None = Field(None, description="POSTed a JSON summary after registration.")
    train: dict[str, Any] = Field(default_factory=dict,
                                  description="TrainConfig fields (lr, steps, LoRA...) other than paths/versions.")
    eval: EvalSettings = EvalSettings()
    gate: GateSettings = GateSettings()

    @classmethod
    def load(cls, path: str | Path) -> NightlyConfig:
        return cls.model_validate_json(Path(path).read_text())

    def registered_model(self) -> str:
        from model_runtime.models import ModelMeta

        return self.model_name or f"shadow-distill-{ModelMeta.read(self.student_dir).model_id}"


def interval_key(start: datetime, end: datetime) -> str:
    return f"{start.astimezone(UTC):%Y%m%dT%H%M%SZ}-{end.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def workdir_for(cfg: NightlyConfig, key: str) -> Path:
    path = cfg.runs_dir / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_for(cfg: NightlyConfig):
    return _open_store(cfg.store_url)


@functools.cache
def _open_store(url: str):
    """One store (engine pool, migrations applied) per URL and process, not one per call or sensor poke."""
    from feature_store import FeatureStore

    return FeatureStore.open(url)


def _registry(cfg: NightlyConfig):
    from model_registry.registry import Registry

    return Registry(cfg.mlflow_tracking_uri, cfg.registered_model())


def split_heldout(trajectory_ids: list[str], percent: int, minimum: int) -> tuple[list[str], list[str]]:
    """(train_ids, heldout_ids): the `percent` share (at least `minimum`, always leaving one to train on) whose
    id hashes rank lowest. Ranking, not a per-id threshold, so a small window can never hold out fewer than
    `minimum` by bad luck, and the split depends only on the set of ids, never on their order."""
    ranked = sorted(trajectory_ids, key=lambda i: hashlib.sha256(i.encode()).digest())
    n_heldout = min(max(minimum, round(len(ranked) * percent / 100)), len(ranked) - 1)
    heldout = set(ranked[:max(n_heldout, 0)])
    return [i for i in trajectory_ids if i not in heldout], [i for i in trajectory_ids if i in heldout]


# ---- tasks ----------------------------------------------------------------------------------------------------
def coverage(cfg: NightlyConfig, start: datetime, end: datetime) -> float:
    return store_for(cfg).coverage(cfg.teacher_id, start, end)


def enough_traffic(cfg: NightlyConfig, start: datetime, end: datetime) -> bool:
    n = store_for(cfg).count_scored(cfg.teacher_id, start, end)
    log.info("interval %s has %d scored trajectories (minimum %d)", interval_key(start, end), n, cfg.min_trajectories)
    return n >= cfg.min_trajectories


def snapshot(cfg: NightlyConfig, start: datetime, end: datetime) -> dict:
    """Freeze the interval's train/held-out ids (split by id hash, so it never depends on arrival order)."""
    store, key = store_for(cfg), interval_key(start, end)
    ids = store.scored_ids(cfg.teacher_id, start, end)
    train_ids, heldout_ids = split_heldout(ids, cfg.heldout_percent, cfg.min_heldout)
    row = store.freeze_manifest(key, start, end, cfg.teacher_id, train_ids, heldout_ids)
    return {"interval_key": key, "n_train": row.n_train, "n_heldout": row.n_heldout}


def manifest(cfg: NightlyConfig, key: str) -> tuple[list[str], list[str]]:
    row = store_for(cfg).get_manifest(key)
    if row is None:
        from foundation.errors import StoreError

        raise StoreError(f"no training manifest for interval {key}: run the snapshot task first")
    return json.loads(row.train_ids_json), json.loads(row.heldout_ids_json)


def champion_adapter(cfg: NightlyConfig, key: str) -> tuple[str | None, Path | None]:
    """(version, local adapter dir) of the current champion, or (None, None) for the bare student."""
    registry = _registry(cfg)
    champ = registry.champion()
    if champ is None:
        return None, None
    dst = workdir_for(cfg, key) / f"champion-v{champ.version}"
    if dst.is_dir() and any(dst.iterdir()):  # an earlier task of this night downloaded it (atomic rename)
        return champ.version, dst
    return champ.version, registry.download_adapter(champ.version, dst)


def _finished_run(cfg: NightlyConfig, key: str):
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_TAG}` = '{key}' and attributes.status = 'FINISHED'",
                              max_results=1)
    return runs[0] if runs else None


def train(cfg: NightlyConfig, start: datetime, end: datetime) -> dict:
    """Train the interval's candidate from the current champion; reuse a finished run of the same interval."""
    from mlflow import MlflowClient

    from nightly_train.data import build_examples
    from nightly_train.train import Distiller

    key = interval_key(start, end)
    done = _finished_run(cfg, key)
    if done is not None:
        log.info("interval %s already trained in run %s: reusing it", key, done.info.run_id)
        return {"run_id": done.info.run_id, "steps": int(done.data.params.get("total_steps", 0)),
                "champion_version": done.data.tags.get("champion_version") or None}
    train_ids, _ = manifest(cfg, key)
    champ_version, champ_dir = champion_adapter(cfg, key)
    workdir = workdir_for(cfg, key)
    tcfg = TrainConfig(**{**cfg.train, "student_dir": cfg.student_dir, "teacher_id": cfg.teacher_id,
                          "teacher_dir": cfg.teacher_dir, "init_adapter": champ_dir,
                          "current_version": int(champ_version or 0), "output_dir": workdir / "train"})
    trajectories = store_for(cfg).load_scored(train_ids[-tcfg.max_trajectories:], cfg.teacher_id)
    examples, report = build_examples(trajectories, tcfg)
    client = MlflowClient(cfg.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
    run_id_file = workdir / "mlflow_run_id"
    if run_id_file.exists():  # a killed attempt: continue its run and its checkpoints
        run_id = run_id_file.read_text().strip()
    else:
        run_id = client.create_run(exp_id, tags={RUN_TAG: key, "champion_version": champ_version or "",
                                                 "mlflow.runName": f"nightly-{key}"}).info.run_id
        run_id_file.write_text(run_id)
    distiller = Distiller(tcfg, examples)
    params = {k: str(v) for k, v in tcfg.model_dump().items()}
    params.update({"total_steps": str(distiller.total_steps), "n_train_trajectories": str(len(trajectories))})
    for k, v in params.items():
        try:
            client.log_param(run_id, k, v[:6000])
        except Exception:  # a param already logged by a killed attempt (same value): keep going
            pass
    for k, v in report.as_metrics().items():
        client.log_metric(run_id, k, v)

    def log_metrics(step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, f"train.{name}", value, step=step)

    result = distiller.run(log_metrics)
    client.log_artifacts(run_id, str(result.adapter_dir), "adapter")
    (workdir / "train_history.json").write_text(json.dumps(result.history))
    client.log_artifact(run_id, str(workdir / "train_history.json"))
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "steps": result.steps, "champion_version": champ_version}


def evaluate(cfg: NightlyConfig, start: datetime, end: datetime, run_id: str) -> dict:
    """IFEval (greedy) and held-out reverse/forward KL for the candidate and the champion, same prompts."""
    from model_runtime.models import load_model, load_tokenizer
    from nightly_train import ifeval
    from nightly_train.evaluate import evaluate_distillation, greedy_generate_fn
    from schemas.trajectory import SamplingParams

    key = interval_key(start, end)
    workdir = workdir_for(cfg, key)
    out_path = workdir / f"evaluation-{run_id}.json"
    if out_path.exists():
        return json.loads(out_path.read_text())
    _, heldout_ids = manifest(cfg, key)
    heldout = store_for(cfg).load_scored(heldout_ids, cfg.teacher_id)
    prompts = [t.prompt_ids for t in heldout][: cfg.eval.kl_prompts]
    if len(prompts) < 2:
        from foundation.errors import GateError

        raise GateError(f"interval {key} has {len(prompts)} held-out trajectories; the KL gate needs at least 2")
    champ_version, champ_dir = champion_adapter(cfg, key)
    cand_dir = workdir / "train" / "adapter"
    tok = load_tokenizer(cfg.student_dir)
    teacher = load_model(cfg.teacher_dir)
    if_prompts = ifeval.load_prompts(cfg.eval.ifeval_path, subset=cfg.eval.ifeval_subset, seed=cfg.eval.ifeval_seed)
    decoding = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=cfg.eval.ifeval_max_tokens)
    cache = ifeval.ResultCache(cfg.runs_dir / "ifeval-cache")
    results = {}
    for side, adapter, version in (("champion", champ_dir, champ_version), ("candidate", cand_dir, None)):
        model = student_with_adapter(cfg.student_dir, adapter)
        gen = greedy_generate_fn(model, tok, cfg.eval.ifeval_max_tokens)
        cache_key = f"v{version}" if version else ("base" if side == "champion" else None)
        if cache_key:
            if_res = cache.get_or_evaluate(cache_key, if_prompts, gen, decoding)
        else:
            if_res = ifeval.evaluate(if_prompts, gen)
        kl = evaluate_distillation(model, teacher, tok, prompts, max_tokens=cfg.eval.kl_max_tokens,
                                   seed=cfg.eval.seed, greedy_prompt=cfg.eval.greedy_prompt)
        results[side] = {"ifeval": if_res.to_dict(), "distill": {**kl.as_metrics(), "greedy_answer": kl.greedy_answer},
                         "version": version}
    results["reference"] = f"champion:v{champ_version}" if champ_version else "base"
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow_tracking_uri)
    for side in ("candidate", "champion"):
        for name, value in results[side]["distill"].items():
            if isinstance(value, float) and math.isfinite(value):
                client.log_metric(run_id, f"eval.{side}.{name}", value)
        for name, value in ifeval.IFEvalResult.from_dict(results[side]["ifeval"]).metrics().items():
            client.log_metric(run_id, f"eval.{side}.{name}", value)
    out_path.write_text(json.dumps(results, indent=1))
    client.log_artifact(run_id, str(out_path))
    return results


def student_with_adapter(student_dir: Path, adapter_dir: Path | None):
    from peft import PeftModel

    from model_runtime.models import load_model

    base = load_model(student_dir)
    if adapter_dir is None:
        return base
    # Evaluation only reads the model: fold the LoRA update into this fresh copy of the base so generation
    # runs at the base's speed (unmerged LoRA on every linear layer costs ~1.5x on CPU).
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


def gate(cfg: NightlyConfig, start: datetime, end: datetime, run_id: str, evaluation: dict) -> dict:
    from model_runtime.adapters import check_adapter_dir
    from model_runtime.models import ModelMeta
    from nightly_train.gate import GateInputs, evaluate_gate
    from nightly_train.ifeval import IFEvalResult
    from foundation.errors import AdapterError

    cand_dir = workdir_for(cfg, interval_key(start, end)) / "train" / "adapter"
    adapter_error = None
    try:
        check_adapter_dir(cand_dir, ModelMeta.read(cfg.student_dir).model_id)
    except AdapterError as exc:
        adapter_error = str(exc)
    cand, champ = (IFEvalResult.from_dict(evaluation[s]["ifeval"]) for s in ("candidate", "champion"))
    decision = evaluate_gate(cfg.gate.policy(), GateInputs(
        candidate_strict=cand.per_prompt_strict, champion_strict=champ.per_prompt_strict,
        candidate_kl=evaluation["candidate"]["distill"]["reverse_kl"],
        champion_kl=evaluation["champion"]["distill"]["reverse_kl"], adapter_error=adapter_error,
        extra_metrics={f"{s}.{k}": v for s in ("candidate", "champion")
                       for k, v in evaluation[s]["distill"].items() if isinstance(v, float)},
        candidate_prompt_set=cand.prompt_set, champion_prompt_set=champ.prompt_set,
        reference=evaluation["reference"]))
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow_tracking_uri)
    for k, v in decision.to_tags().items():
        client.set_tag(run_id, k, v)
    try:  # the reviewer's page helps approval; failing to draw it must not decide the gate
        from nightly_train.review import review_for_interval

        review_dir = review_for_interval(cfg, start, end, run_id, evaluation, decision.to_tags())
        client.log_artifacts(run_id, str(review_dir), "review")
    except Exception as exc:
        log.exception("review page for run %s failed", run_id)
        client.set_tag(run_id, "review.error", str(exc)[:4000])
    log.info("gate for %s:\n%s", run_id, decision.summary_table())
    return {"passed": decision.passed, "tags": decision.to_tags(), "table": decision.summary_table()}


def register(cfg: NightlyConfig, start: datetime, end: datetime, run_id: str, gate_result: dict,
             n_trajectories: int) -> dict:
    from model_registry.registry import RESERVED_TAGS
    from foundation.version import __version__ as code_version

    key = interval_key(start, end)
    gate_tags = {k: v for k, v in gate_result["tags"].items() if k not in RESERVED_TAGS}  # registry sets those
    tags = {**gate_tags, "data.window_start": start.astimezone(UTC).isoformat(),
            "data.window_end": end.astimezone(UTC).isoformat(), "data.trajectory_count": str(n_trajectories),
            "teacher_id": cfg.teacher_id, "code_version": code_version}
    info = _registry(cfg).register_candidate(run_id, tags=tags, gate_passed=gate_result["passed"], interval_key=key)
    store_for(cfg).record_adapter_version(
        model_name=cfg.registered_model(), version=str(info.version), run_id=run_id, source_uri=info.source,
        window_start=start, window_end=end, trajectory_count=n_trajectories, gate_passed=gate_result["passed"])
    return {"version": str(info.version), "gate_passed": gate_result["passed"]}


def notify(cfg: NightlyConfig, summary: dict) -> None:
    log.info("nightly summary: %s", json.dumps(summary))
    if cfg.notify_webhook:
        import httpx

        httpx.post(cfg.notify_webhook, json=summary, timeout=10).raise_for_status()


def purge(cfg: NightlyConfig, now: datetime) -> int:
    n = store_for(cfg).purge(now - timedelta(days=cfg.retention_days))
    log.info("purged %d trajectories older than %d days", n, cfg.retention_days)
    return n


def run_night(cfg: NightlyConfig, start: datetime, end: datetime) -> dict:
    """All tasks in order, without Airflow (the DAG runs the same functions with retries and a sensor)."""
    summary: dict[str, Any] = {"interval_key": interval_key(start, end)}
    if not enough_traffic(cfg, start, end):
        return {**summary, "skipped": "too little traffic"}
    manifest = snapshot(cfg, start, end)
    trained = train(cfg, start, end)
    evaluation = evaluate(cfg, start, end, trained["run_id"])
    decision = gate(cfg, start, end, trained["run_id"], evaluation)
    summary.update(manifest=manifest, run_id=trained["run_id"], steps=trained["steps"], gate_passed=decision["passed"])
    if decision["passed"]:
        summary.update(register(cfg, start, end, trained["run_id"], decision, manifest["n_train"]))
    notify(cfg, summary)
    return summary
