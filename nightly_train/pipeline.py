"""One nightly run as plain functions, one per DAG task, each idempotent on the data interval.

The Airflow DAG (`dags/shadow_distill_nightly.py`) only calls these; `shadow-distill nightly run` calls them in
order without Airflow (`run_night`). Data moves one way, as the small typed values of `nightly_train.results`:

    snapshot(night) -> Manifest       freezes the window's train/held-out ids *and the champion* in the store
    train(night) -> Trained           from the manifest's champion; reuses a finished run, or resumes checkpoints
    evaluate(night, trained) -> Evaluation        candidate vs that same champion, same prompts and seeds
    gate(night, evaluation) -> GateOutcome        pure checks (`nightly_train.gate`), tags on the MLflow run
    review(night, evaluation, gate)               the reviewer's page, its own task
    register(night, gate) -> Registered           idempotent in the registry on the interval key

Every path of the night comes from `RunLayout`; the champion is looked up in the registry once, by `snapshot`.

    shadow-distill nightly run --config nightly.json --start 2026-11-24T02:00Z --end 2026-11-25T02:00Z
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from foundation.errors import GateError, StoreError
from nightly_train.config import NightlyConfig, TrainConfig
from nightly_train.layout import RUN_TAG, RunLayout, interval_key
from nightly_train.results import Evaluation, GateOutcome, Manifest, Registered, SideEvaluation, Trained

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Night:
    """One data interval [start, end) under one configuration: what every task of the night is called with."""

    cfg: NightlyConfig
    start: datetime
    end: datetime

    @property
    def key(self) -> str:
        return interval_key(self.start, self.end)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.cfg.runs_dir, self.key).ensure()

    @property
    def store(self):
        from feature_store import shared_store

        return shared_store(self.cfg.store_url)

    def registry(self):
        from model_registry.registry import Registry

        return Registry(self.cfg.mlflow_tracking_uri, self.cfg.registered_model())

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(self.cfg.mlflow_tracking_uri)


def split_heldout(index: list[tuple[str, str]], percent: int, minimum: int) -> tuple[list[str], list[str]]:
    """(train_ids, heldout_ids) of `index` = [(trajectory_id, prompt_hash)], split *by prompt*: the `percent` share
    of distinct prompts (at least `minimum`, always leaving one prompt to train on) whose hashes rank lowest is held
    out with every trajectory of those prompts, so n > 1 choices and repeated prompts never land on both sides and
    no held-out prompt is ever a training or rollout prompt. Ranking, not a per-prompt threshold, so a small window
    never holds out fewer than `minimum` by bad luck; the split depends only on the set, never on its order."""
    prompts = sorted({h for _, h in index}, key=lambda h: hashlib.sha256(h.encode()).digest())
    n_heldout = min(max(minimum, round(len(prompts) * percent / 100)), len(prompts) - 1)
    heldout = set(prompts[:max(n_heldout, 0)])
    return [i for i, h in index if h not in heldout], [i for i, h in index if h in heldout]


# ---- the manifest and the champion it froze --------------------------------------------------------------------
def window_status(night: Night):
    """How much of the window landed and was scored, and how far the log was read (`feature_store.WindowStatus`)."""
    return night.store.window_status(night.cfg.teacher_id, night.start, night.end, topic=night.cfg.log_topic,
                                     group_id=night.cfg.scorer_group)


def window_complete(night: Night) -> tuple[bool, dict[str, Any]]:
    """(may the night freeze its window?, what the sensor saw): the log was read past the window's end (plus the
    allowed lateness) on every partition and enough of what landed is scored. A night never freezes a window it
    has not seen in full: a stopped scorer, a Kafka backlog or a spool still replaying keep this False."""
    status = window_status(night)
    done = status.complete(night.end, night.cfg.allowed_lateness_s, night.cfg.coverage_threshold)
    seen = {"landed": status.landed, "scored": status.scored, "rejected": status.rejected,
            "watermark": status.watermark.isoformat() if status.watermark else None, "complete": done}
    log.info("window %s: %s", night.key, seen)
    return done, seen


def enough_traffic(night: Night) -> bool:
    n = night.store.count_scored(night.cfg.teacher_id, night.start, night.end)
    log.info("interval %s has %d scored trajectories (minimum %d)", night.key, n, night.cfg.min_trajectories)
    return n >= night.cfg.min_trajectories


def snapshot(night: Night) -> Manifest:
    """Freeze the interval's train/held-out ids (split by id hash) and the current champion, once."""
    cfg, store = night.cfg, night.store
    if store.get_manifest(night.key) is None:
        index = store.scored_prompt_index(cfg.teacher_id, night.start, night.end)
        train_ids, heldout_ids = split_heldout(index, cfg.heldout_percent, cfg.min_heldout)
        champ = night.registry().champion()
        store.freeze_manifest(night.key, night.start, night.end, cfg.teacher_id, train_ids, heldout_ids,
                              champion_version=champ.version if champ else None)
    return frozen_manifest(night)[0]


def frozen_manifest(night: Night) -> tuple[Manifest, list[str], list[str]]:
    """(manifest, train ids, held-out ids) as the snapshot froze them."""
    row = night.store.get_manifest(night.key)
    if row is None:
        raise StoreError(f"no training manifest for interval {night.key}: run the snapshot task first")
    manifest = Manifest(interval_key=night.key, n_train=row.n_train, n_heldout=row.n_heldout,
                        champion_version=row.champion_version)
    return manifest, json.loads(row.train_ids_json), json.loads(row.heldout_ids_json)


def champion_adapter(night: Night, version: str | None) -> Path | None:
    """The local folder of champion `version` (downloaded once per night, atomically), None for the base."""
    if version is None:
        return None
    dst = night.layout.champion_dir(version)
    if dst.is_dir() and any(dst.iterdir()):
        return dst
    return night.registry().download_adapter(version, dst)


# ---- train ------------------------------------------------------------------------------------------------------
def _finished_run(night: Night):
    client = night.mlflow()
    exp = client.get_experiment_by_name(night.cfg.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`{RUN_TAG}` = '{night.key}' and attributes.status = 'FINISHED'", max_results=1)
    return runs[0] if runs else None


def _open_run(night: Night, champion_version: str | None) -> str:
    """The night's MLflow run: the one a killed attempt left (its id is in the layout), else a new one."""
    path = night.layout.mlflow_run_id_file
    if path.exists():
        return path.read_text().strip()
    client = night.mlflow()
    exp = client.get_experiment_by_name(night.cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(night.cfg.experiment)
    run_id = client.create_run(exp_id, tags={RUN_TAG: night.key, "champion_version": champion_version or "",
                                             "mlflow.runName": f"nightly-{night.key}"}).info.run_id
    path.write_text(run_id)
    return run_id


def provenance(night: Night, champion_version: str | None):
    """What the night's trajectories must match (the student's base, tokenizer and teacher temperature), and the
    registry's lineage tree, from which a sample's staleness is measured. The teacher's tokenizer must be the
    student's unless `cross_tokenizer` is set: a mismatch is refused here, naming both fingerprints."""
    from model_runtime.models import ModelMeta
    from model_runtime.tokenizers import folder_fingerprint, require_shared_tokenizer
    from nightly_train.data import PolicyLineage, Provenance

    cfg = night.cfg
    if cfg.cross_tokenizer:
        fingerprint = folder_fingerprint(cfg.student_dir)  # cross rows stamp the student tokenizer they project onto
    else:
        fingerprint = require_shared_tokenizer(cfg.student_dir, folder_fingerprint(cfg.teacher_dir),
                                               str(cfg.teacher_dir))
    return Provenance(student_base=ModelMeta.read(cfg.student_dir).model_id, tokenizer_fingerprint=fingerprint,
                      teacher_temperature=cfg.train.teacher_temperature,
                      lineage=PolicyLineage(champion_version, night.registry().lineage_parents()))


def train(night: Night) -> Trained:
    """Train the interval's candidate from the manifest's champion; reuse a finished run of the same interval.

    One process by default; `train.processes` > 1 runs the same `fit` under torchrun (`nightly_train.distributed`),
    one rank per GPU (gloo on the CPU). Either way this task logs the adapter and finishes the MLflow run."""
    cfg, layout = night.cfg, night.layout
    manifest = frozen_manifest(night)[0]
    done = _finished_run(night)
    if done is not None:
        log.info("interval %s already trained in run %s: reusing it", night.key, done.info.run_id)
        return Trained(interval_key=night.key, run_id=done.info.run_id, reused=True,
                       steps=int(done.data.params.get("total_steps", 0)), champion_version=manifest.champion_version)
    champion_adapter(night, manifest.champion_version)  # downloaded once here, not by every rank
    run_id = _open_run(night, manifest.champion_version)
    if cfg.train.processes > 1:
        _fit_under_torchrun(night, run_id, cfg.train.processes)
    else:
        fit(night, run_id)
    client = night.mlflow()
    client.log_artifacts(run_id, str(layout.adapter_dir), "adapter")
    client.log_artifact(run_id, str(layout.history_file))
    client.set_terminated(run_id, "FINISHED")
    steps = int(client.get_run(run_id).data.params.get("total_steps", 0))
    return Trained(interval_key=night.key, run_id=run_id, steps=steps, champion_version=manifest.champion_version)


def fit(night: Night, run_id: str) -> None:
    """The night's examples and rollout prompts, then the distillation loop. Under torchrun every rank runs this;
    only the main rank logs to MLflow and writes the history (the trainer writes the adapter on it alone)."""
    from nightly_train.data import build_examples, rollout_prompts
    from nightly_train.train import Distiller

    cfg, layout = night.cfg, night.layout
    manifest, train_ids, _ = frozen_manifest(night)
    tcfg = TrainConfig.for_run(cfg.train, student_dir=cfg.student_dir, teacher_id=cfg.teacher_id,
                               teacher_dir=cfg.teacher_dir, output_dir=layout.train_dir,
                               init_adapter=champion_adapter(night, manifest.champion_version))
    prov = provenance(night, manifest.champion_version)
    tcfg = without_topk_rules(tcfg) if cross_tokenizer_teacher(cfg) else tcfg
    trajectories = night.store.load_scored(train_ids[-tcfg.max_trajectories:], cfg.teacher_id)
    examples, report = build_examples(trajectories, tcfg, prov)
    prompts = rollout_prompts(trajectories, prov)
    distiller = Distiller(tcfg, examples, prompts)
    main = distiller.ranks.is_main
    client = night.mlflow()
    log.info("interval %s: %d trajectories -> %s; policies %s; %d rollout prompts; %d steps on %d process(es)",
             night.key, len(trajectories), dict(report.trajectories), dict(report.policies), len(prompts),
             distiller.total_steps, distiller.ranks.world)
    if main:
        params = {k: str(v) for k, v in tcfg.model_dump().items()}
        params.update({"total_steps": str(distiller.total_steps), "n_train_trajectories": str(len(trajectories)),
                       "n_rollout_prompts": str(len(prompts))})
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
    if main:
        for rule, n in result.tokens_by_rule().items():
            client.log_metric(run_id, f"train.tokens_total.{rule}", n)
        layout.history_file.write_text(json.dumps(result.history))


def cross_tokenizer_teacher(cfg: NightlyConfig) -> bool:
    from model_runtime.tokenizers import folder_fingerprint

    return cfg.cross_tokenizer and folder_fingerprint(cfg.student_dir) != folder_fingerprint(cfg.teacher_dir)


def without_topk_rules(tcfg: TrainConfig) -> TrainConfig:
    """The top-k rules compare next-token distributions over one vocabulary, which a teacher of another tokenizer
    does not share: train with rule 1 (span advantages) and rollouts only, and say so."""
    if tcfg.loss == "sampled_token" and not tcfg.gkd.enabled:
        log.info("cross-tokenizer teacher: training on span advantages (rule 1, rollouts); top-k rules are off")
        return tcfg
    log.warning("cross-tokenizer teacher: top-k rules are off (loss %s -> sampled_token, gkd off): they need one "
                "vocabulary; training on span advantages (rule 1, rollouts)", tcfg.loss)
    return tcfg.model_copy(update={"loss": "sampled_token", "gkd": tcfg.gkd.model_copy(update={"enabled": False})})


def _fit_under_torchrun(night: Night, run_id: str, processes: int) -> None:
    """`fit` on `processes` ranks (torchrun, one host). The night's config travels as a private temporary file: it
    holds the store URL, a secret."""
    import subprocess
    import sys
    import tempfile

    from foundation.errors import ShadowDistillError

    with tempfile.TemporaryDirectory(prefix="nightly-train-") as tmp:
        cfg_path = Path(tmp) / "nightly.json"
        cfg_path.touch(mode=0o600)
        cfg_path.write_text(night.cfg.model_dump_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "nightly_train.launch", "--config", str(cfg_path), "--window-start", night.start.isoformat(),
               "--window-end", night.end.isoformat(), "--run-id", run_id]  # no prefix of a torchrun option
        log.info("training interval %s on %d processes: %s", night.key, processes, " ".join(cmd[:6]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise ShadowDistillError(f"distributed training of {night.key} failed (exit {proc.returncode}):\n{tail}")


# ---- evaluate, gate, review -------------------------------------------------------------------------------------
def evaluate(night: Night, trained: Trained) -> Evaluation:
    """IFEval (greedy) and the held-out meter for the candidate and the manifest's champion, paired by prompt.

    Both sides answer the same held-out prompts with the same sampling seeds (`eval.kl_samples_per_prompt` each)
    and are scored against one set of teacher samples (forward KL), so the gate compares them prompt by prompt.
    IFEval results are cached by model identity (base id + weights digests): yesterday's candidate, tonight's
    champion, is scored once."""
    from model_runtime.models import ModelMeta, eos_token_ids, load_tokenizer, pick_device
    from nightly_train import ifeval
    from nightly_train.evaluate import (evaluate_distillation, greedy_generate_fn, student_with_adapter,
                                        teacher_reference)
    from nightly_train.teacher_bridge import TeacherBridge
    from nightly_train.identity import model_identity
    from schemas.trajectory import SamplingParams

    cfg, layout, run_id, ev = night.cfg, night.layout, trained.run_id, night.cfg.eval
    out_path = layout.evaluation_file(run_id)
    if out_path.exists():
        return Evaluation.read(out_path)
    manifest, _, heldout_ids = frozen_manifest(night)
    heldout = night.store.load_scored(heldout_ids, cfg.teacher_id)
    prompts = list({tuple(t.prompt_ids): t.prompt_ids for t in heldout}.values())[: ev.kl_prompts]
    if len(prompts) < 2:
        raise GateError(f"interval {night.key} has {len(prompts)} held-out prompts; the KL gate needs at least 2")
    champ_version = manifest.champion_version
    tok = load_tokenizer(cfg.student_dir)
    teacher = TeacherBridge.load(cfg.teacher_dir, tok, eos_token_ids(tok), pick_device(cfg.train.device))
    reference = teacher_reference(teacher, tok, prompts, samples_per_prompt=ev.kl_samples_per_prompt,
                                  max_tokens=ev.kl_max_tokens, seed=ev.seed, temperature=cfg.train.teacher_temperature)
    if_prompts = ifeval.load_prompts(ev.ifeval_path, subset=ev.ifeval_subset, seed=ev.ifeval_seed)
    decoding = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=ev.ifeval_max_tokens)
    cache = ifeval.ResultCache(layout.ifeval_cache_dir)
    sides = {}
    for side, adapter, version in (("champion", champion_adapter(night, champ_version), champ_version),
                                   ("candidate", layout.adapter_dir, None)):
        model = student_with_adapter(cfg.student_dir, adapter, cfg.train.device)
        identity = model_identity(cfg.student_dir, adapter)
        if_res = cache.get_or_evaluate(identity, if_prompts, greedy_generate_fn(model, tok, ev.ifeval_max_tokens),
                                       decoding)
        kl = evaluate_distillation(model, teacher, tok, prompts, max_tokens=ev.kl_max_tokens, seed=ev.seed,
                                   greedy_prompt=ev.greedy_prompt, teacher_temperature=cfg.train.teacher_temperature,
                                   samples_per_prompt=ev.kl_samples_per_prompt, reference=reference)
        sides[side] = SideEvaluation(version=version, model=identity.to_dict(), ifeval=if_res.to_dict(),
                                     distill={**kl.as_metrics(), "greedy_answer": kl.greedy_answer,
                                              "per_prompt": kl.per_prompt()})
    base_ref = f"base:{ModelMeta.read(cfg.student_dir).model_id}"
    evaluation = Evaluation(interval_key=night.key, run_id=run_id, **sides,
                            reference=f"champion:v{champ_version}" if champ_version else base_ref)
    client = night.mlflow()
    for side in ("candidate", "champion"):
        for name, value in evaluation.side(side).distill.items():
            if isinstance(value, float) and math.isfinite(value):
                client.log_metric(run_id, f"eval.{side}.{name}", value)
        for name, value in ifeval.IFEvalResult.from_dict(evaluation.side(side).ifeval).metrics().items():
            client.log_metric(run_id, f"eval.{side}.{name}", value)
    client.log_artifact(run_id, str(evaluation.write(out_path)))
    return evaluation


def gate(night: Night, evaluation: Evaluation) -> GateOutcome:
    """The gate's verdict on the candidate (pure, `nightly_train.gate`), written as tags on the night's run."""
    from foundation.errors import AdapterError
    from model_runtime.adapters import check_adapter_dir
    from model_runtime.models import ModelMeta
    from nightly_train.gate import GateInputs, evaluate_gate

    adapter_error = None
    try:
        check_adapter_dir(night.layout.adapter_dir, ModelMeta.read(night.cfg.student_dir).model_id)
    except AdapterError as exc:
        adapter_error = str(exc)
    decision = evaluate_gate(night.cfg.gate, GateInputs.from_evaluation(evaluation.model_dump(),
                                                                        adapter_error=adapter_error))
    client = night.mlflow()
    for k, v in decision.to_tags().items():
        client.set_tag(evaluation.run_id, k, v)
    log.info("gate for %s:\n%s", evaluation.run_id, decision.summary_table())
    return GateOutcome(interval_key=night.key, run_id=evaluation.run_id, passed=decision.passed,
                       tags=decision.to_tags(), table=decision.summary_table())


def review(night: Night, evaluation: Evaluation, outcome: GateOutcome, *, n_cases: int = 4) -> Path:
    """The reviewer's page for the night's candidate, logged as the run's `review/` artifact folder."""
    from nightly_train.review import build_review

    manifest, _, heldout_ids = frozen_manifest(night)
    heldout = night.store.load_scored(heldout_ids[:n_cases], night.cfg.teacher_id)
    out = build_review(night.cfg.student_dir, night.cfg.teacher_dir, night.layout, evaluation, outcome, heldout,
                       champion_dir=champion_adapter(night, manifest.champion_version), live=live_evidence(night))
    night.mlflow().log_artifacts(evaluation.run_id, str(out), "review")
    return out


def live_evidence(night: Night):
    """The live comparison of the night's registered candidate in shadow mode (empty before any shadow traffic)."""
    from nightly_train.live import compare_live

    version = night.registry().version_of_interval(night.key)
    if version is None:
        return []
    return compare_live(night.store.shadow_pairs(night.cfg.teacher_id, version.version), version.version)


# ---- register, notify, purge ------------------------------------------------------------------------------------
def register(night: Night, outcome: GateOutcome) -> Registered:
    from foundation.version import __version__ as code_version
    from model_registry.registry import RESERVED_TAGS

    manifest = frozen_manifest(night)[0]
    gate_tags = {k: v for k, v in outcome.tags.items() if k not in RESERVED_TAGS}  # the registry sets those
    tags = {**gate_tags, "data.window_start": night.start.astimezone(UTC).isoformat(),
            "data.window_end": night.end.astimezone(UTC).isoformat(), "data.trajectory_count": str(manifest.n_train),
            "teacher_id": night.cfg.teacher_id, "code_version": code_version}
    info = night.registry().register_candidate(outcome.run_id, tags=tags, gate_passed=outcome.passed,
                                               interval_key=night.key, parent_version=manifest.champion_version)
    night.store.record_adapter_version(
        model_name=night.cfg.registered_model(), version=str(info.version), run_id=outcome.run_id,
        source_uri=info.source, window_start=night.start, window_end=night.end, trajectory_count=manifest.n_train,
        gate_passed=outcome.passed)
    return Registered(interval_key=night.key, run_id=outcome.run_id, version=str(info.version),
                      gate_passed=outcome.passed)


def notify(cfg: NightlyConfig, summary: dict[str, Any]) -> None:
    log.info("nightly summary: %s", json.dumps(summary))
    if cfg.notify_webhook:
        import httpx

        httpx.post(cfg.notify_webhook, json=summary, timeout=10).raise_for_status()


def purge(night: Night) -> int:
    """Retention: trajectories older than `retention_days`, and the review pages (they show their texts) of the
    nights whose window ended before that."""
    from nightly_train.retention import purge_review_pages

    cutoff = night.end - timedelta(days=night.cfg.retention_days)
    n = night.store.purge(cutoff)
    purge_review_pages(night.cfg, older_than=cutoff, reason=f"retention ({night.cfg.retention_days} days)")
    log.info("purged %d trajectories older than %d days", n, night.cfg.retention_days)
    return n


def run_night(night: Night) -> dict[str, Any]:
    """All tasks in order, without Airflow (the DAG runs the same functions with retries and a sensor)."""
    summary: dict[str, Any] = {"interval_key": night.key}
    complete, seen = window_complete(night)
    if not complete:
        raise StoreError(f"window {night.key} is not seen in full yet ({seen}); wait for the scorer, or run later")
    if not enough_traffic(night):
        return {**summary, "skipped": "too little traffic"}
    manifest = snapshot(night)
    trained = train(night)
    evaluation = evaluate(night, trained)
    outcome = gate(night, evaluation)
    summary.update(manifest=manifest.to_xcom(), run_id=trained.run_id, steps=trained.steps, gate_passed=outcome.passed)
    if outcome.passed:
        summary.update(register(night, outcome).to_xcom())
    review(night, evaluation, outcome)
    notify(night.cfg, summary)
    return summary
