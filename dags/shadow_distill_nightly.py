"""Nightly on-policy distillation of the student's LoRA adapter (Airflow 3, TaskFlow).

    wait_for_coverage -> enough_traffic -> snapshot -> train -> evaluate -> gate -> review
                                              |                                \\-> passed? -> register -> notify
                                              \\-> purge (always, once the manifest is frozen)

Every task calls `nightly_train.pipeline` with the night (config + data interval) and hands the next task one
small typed value (`nightly_train.results`, as JSON): the snapshot freezes the champion in the manifest, and
every later task reads it from there. Each task is idempotent on the data interval, so a rerun of the same night
reuses the same manifest and registers no duplicate version. Heavy imports happen inside tasks only: parsing
this file imports nothing but Airflow.

Configuration: $SHADOW_DISTILL_NIGHTLY_CONFIG names a NightlyConfig JSON file; $SHADOW_DISTILL_SCHEDULE a cron
(default 02:00 UTC); $SHADOW_DISTILL_RETRIES and $SHADOW_DISTILL_RETRY_DELAY_S the retry policy (2, 300 s);
$SHADOW_DISTILL_TRAIN_GPUS the GPUs of the train task's pod under the KubernetesExecutor (0: the executor's
default pod; the nightly file's `train.processes` runs that many torchrun ranks). A run's `conf` may pin the
window: {"window_start": ISO, "window_end": ISO}.

    airflow dags test shadow_distill_nightly 2026-11-25 --conf '{"window_start": "...", "window_end": "..."}'
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, PokeReturnValue, dag, get_current_context, task

SCHEDULE = os.environ.get("SHADOW_DISTILL_SCHEDULE", "0 2 * * *")
RETRIES = int(os.environ.get("SHADOW_DISTILL_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("SHADOW_DISTILL_RETRY_DELAY_S", "300")))
TRAIN_GPUS = int(os.environ.get("SHADOW_DISTILL_TRAIN_GPUS", "0"))  # KubernetesExecutor: GPUs of the train pod


def _gpu_pod(gpus: int) -> dict:
    """`executor_config` giving this task's pod `gpus` GPUs on a GPU node (KubernetesExecutor), none when 0: only
    train (one torchrun rank per GPU: the nightly file's `train.processes`) and evaluate need one; the other tasks'
    pods stay on CPU nodes."""
    if gpus <= 0:
        return {}
    from kubernetes.client import models as k8s

    resources = k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)})
    return {"pod_override": k8s.V1Pod(spec=k8s.V1PodSpec(
        containers=[k8s.V1Container(name="base", resources=resources)],
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]))}


def _night():
    """The night this run covers: the config file named by the environment, and the run's data interval (or the
    window pinned in its conf)."""
    from nightly_train.config import NightlyConfig
    from nightly_train.pipeline import Night

    path = os.environ.get("SHADOW_DISTILL_NIGHTLY_CONFIG")
    if not path:
        raise RuntimeError("set SHADOW_DISTILL_NIGHTLY_CONFIG to the nightly config JSON file")
    ctx = get_current_context()
    conf = ctx["dag_run"].conf or {}
    if conf.get("window_start") and conf.get("window_end"):
        start, end = datetime.fromisoformat(conf["window_start"]), datetime.fromisoformat(conf["window_end"])
    else:
        start, end = ctx["data_interval_start"], ctx["data_interval_end"]
    return Night(NightlyConfig.from_json_file(path), start, end)


@dag(
    dag_id="shadow_distill_nightly",
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": RETRIES, "retry_delay": RETRY_DELAY},
    tags=["shadow-distill"],
    doc_md=__doc__,
)
def shadow_distill_nightly():
    @task.sensor(poke_interval=30, timeout=4 * 3600, mode="reschedule")
    def wait_for_coverage() -> PokeReturnValue:
        from nightly_train import pipeline

        complete, seen = pipeline.window_complete(_night())
        return PokeReturnValue(is_done=complete, xcom_value=seen)

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def enough_traffic(_seen: dict) -> bool:
        from nightly_train import pipeline

        return pipeline.enough_traffic(_night())

    @task
    def snapshot() -> dict:
        from nightly_train import pipeline

        return pipeline.snapshot(_night()).to_xcom()

    @task(executor_config=_gpu_pod(TRAIN_GPUS))
    def train(_manifest: dict) -> dict:
        from nightly_train import pipeline

        return pipeline.train(_night()).to_xcom()

    @task(executor_config=_gpu_pod(min(TRAIN_GPUS, 1)))
    def evaluate(trained: dict) -> dict:
        from nightly_train import pipeline
        from nightly_train.results import Trained

        return pipeline.evaluate(_night(), Trained.from_xcom(trained)).to_xcom()

    @task
    def gate(evaluation: dict) -> dict:
        from nightly_train import pipeline
        from nightly_train.results import Evaluation

        return pipeline.gate(_night(), Evaluation.from_xcom(evaluation)).to_xcom()

    @task
    def review(evaluation: dict, outcome: dict) -> str:
        from nightly_train import pipeline
        from nightly_train.results import Evaluation, GateOutcome

        return str(pipeline.review(_night(), Evaluation.from_xcom(evaluation), GateOutcome.from_xcom(outcome)))

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def passed(outcome: dict) -> bool:
        return bool(outcome["passed"])

    @task
    def register(outcome: dict) -> dict:
        from nightly_train import pipeline
        from nightly_train.results import GateOutcome

        return pipeline.register(_night(), GateOutcome.from_xcom(outcome)).to_xcom()

    @task
    def notify(summary: dict) -> None:
        from nightly_train import pipeline

        pipeline.notify(_night().cfg, summary)

    @task(trigger_rule="all_done")
    def purge() -> int:
        from nightly_train import pipeline

        return pipeline.purge(_night())

    manifest = snapshot()
    enough_traffic(wait_for_coverage()) >> manifest
    evaluation = evaluate(train(manifest))
    outcome = gate(evaluation)
    review(evaluation, outcome)
    registered = register(outcome)
    passed(outcome) >> registered
    notify(registered)
    # Purge is a leaf of its own, after the manifest is frozen: it runs whatever the night's outcome, and a
    # failed task elsewhere still fails the run (a leaf that always succeeds would mark a broken night green).
    manifest >> purge()


shadow_distill_nightly()
