"""Nightly on-policy distillation of the student's LoRA adapter (Airflow 3, TaskFlow).

wait for scoring coverage -> enough traffic? -> snapshot -> train -> evaluate -> gate? -> register -> notify
                                                         \-> purge (always, once the manifest is frozen)
Every task calls `nightly_train.pipeline` and is idempotent on the data interval, so a rerun of the same night
reuses the same manifest and registers no duplicate version. Heavy imports happen inside tasks only: parsing
this file imports nothing but Airflow.

Configuration: $SHADOW_DISTILL_NIGHTLY_CONFIG names a NightlyConfig JSON file; $SHADOW_DISTILL_SCHEDULE a cron
(default 02:00 UTC); $SHADOW_DISTILL_RETRIES and $SHADOW_DISTILL_RETRY_DELAY_S the retry policy (2, 300 s). A run's `conf` may pin the window: {"window_start": ISO, "window_end": ISO}.

    airflow dags test shadow_distill_nightly 2026-11-25 --conf '{"window_start": "...", "window_end": "..."}'
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, PokeReturnValue, dag, get_current_context, task

SCHEDULE = os.environ.get("SHADOW_DISTILL_SCHEDULE", "0 2 * * *")
RETRIES = int(os.environ.get("SHADOW_DISTILL_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("SHADOW_DISTILL_RETRY_DELAY_S", "300")))


def _config():
    from nightly_train.pipeline import NightlyConfig

    path = os.environ.get("SHADOW_DISTILL_NIGHTLY_CONFIG")
    if not path:
        raise RuntimeError("set SHADOW_DISTILL_NIGHTLY_CONFIG to the nightly config JSON file")
    return NightlyConfig.load(path)


def _window() -> tuple[datetime, datetime]:
    """The run's data interval, or the window pinned in its conf."""
    ctx = get_current_context()
    conf = ctx["dag_run"].conf or {}
    if conf.get("window_start") and conf.get("window_end"):
        return datetime.fromisoformat(conf["window_start"]), datetime.fromisoformat(conf["window_end"])
    return ctx["data_interval_start"], ctx["data_interval_end"]


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

        cfg = _config()
        covered = pipeline.coverage(cfg, *_window())
        return PokeReturnValue(is_done=covered >= cfg.coverage_threshold, xcom_value=covered)

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def enough_traffic(_coverage: float) -> bool:
        from nightly_train import pipeline

        return pipeline.enough_traffic(_config(), *_window())

    @task
    def snapshot() -> dict:
        from nightly_train import pipeline

        return pipeline.snapshot(_config(), *_window())

    @task
    def train(manifest: dict) -> dict:
        from nightly_train import pipeline

        return {**pipeline.train(_config(), *_window()), "n_train": manifest["n_train"]}

    @task
    def evaluate(trained: dict) -> dict:
        from nightly_train import pipeline

        return {**trained, "evaluation": pipeline.evaluate(_config(), *_window(), trained["run_id"])}

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def gate(evaluated: dict) -> dict | bool:
        from nightly_train import pipeline

        decision = pipeline.gate(_config(), *_window(), evaluated["run_id"], evaluated["evaluation"])
        return {**evaluated, "gate": decision} if decision["passed"] else False

    @task
    def register(gated: dict) -> dict:
        from nightly_train import pipeline

        reg = pipeline.register(_config(), *_window(), gated["run_id"], gated["gate"], gated["n_train"])
        return {"run_id": gated["run_id"], **reg}

    @task
    def notify(summary: dict) -> None:
        from nightly_train import pipeline

        pipeline.notify(_config(), summary)

    @task(trigger_rule="all_done")
    def purge() -> int:
        from nightly_train import pipeline

        return pipeline.purge(_config(), _window()[1])

    manifest = snapshot()
    enough_traffic(wait_for_coverage()) >> manifest
    notify(register(gate(evaluate(train(manifest)))))
    # Purge is a leaf of its own, after the manifest is frozen: it runs whatever the night's outcome, and a
    # failed task elsewhere still fails the run (a leaf that always succeeds would mark a broken night green).
    manifest >> purge()


shadow_distill_nightly()
