"""The nightly DAG file parses, has the promised shape and stays light to import.

Airflow reads its configuration (AIRFLOW_HOME, example DAGs) once, at import. Each check therefore runs in a
fresh interpreter with its own AIRFLOW_HOME, so the result never depends on which test imported airflow first.
The parse itself is Airflow's own `DagBag` (what the dag-processor runs), not an import of the module.

    .venv/bin/python -m pytest tests/unit/test_dag_parse.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
DAG_ID = "shadow_distill_nightly"
MAIN_CHAIN = ["wait_for_coverage", "enough_traffic", "snapshot", "train", "evaluate", "gate", "passed", "register",
              "notify"]
HEAVY = ("torch", "transformers", "mlflow", "peft")

PARSE = textwrap.dedent("""
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import CronDataIntervalTimetable

    bag = DagBag(dag_folder=sys.argv[1])
    dag = bag.dags[sys.argv[2]]
    tt = dag.timetable
    print(json.dumps({
        "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
        "dag_ids": sorted(bag.dags),
        "edges": sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids),
        "tasks": sorted(t.task_id for t in dag.tasks),
        "retries": {t.task_id: t.retries for t in dag.tasks},
        "gpus": {t.task_id: (t.executor_config or {}).get("pod_override").spec.containers[0].resources.limits[
            "nvidia.com/gpu"] for t in dag.tasks if (t.executor_config or {}).get("pod_override")},
        "retry_delay_s": {t.task_id: t.retry_delay.total_seconds() for t in dag.tasks},
        "timetable": type(tt).__name__,
        "is_cron_interval": isinstance(tt, CronDataIntervalTimetable),
        "cron": getattr(tt, "expression", None),
        "timezone": str(getattr(tt, "timezone", "")),
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
    }))
""")

IMPORT_ONLY = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("nightly_dag", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(","))))
""")


def _run(code: str, args: list[str], tmp_path: Path, **env: str) -> str:
    env_all = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "PYTHONPATH": str(REPO), **env}
    for name in ("SHADOW_DISTILL_SCHEDULE", "SHADOW_DISTILL_RETRIES", "SHADOW_DISTILL_RETRY_DELAY_S",
                 "SHADOW_DISTILL_TRAIN_GPUS"):
        if name not in env:
            env_all.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env_all, cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    return json.loads(_run(PARSE, [str(DAGS), DAG_ID], tmp_path_factory.mktemp("parse")))


def test_the_dag_folder_parses_without_import_errors(parsed):
    assert parsed["import_errors"] == {}
    assert parsed["dag_ids"] == [DAG_ID]


def test_the_task_graph_is_the_nightly_chain_with_review_after_the_gate_and_purge_after_the_snapshot(parsed):
    chain_edges = [[a, b] for a, b in zip(MAIN_CHAIN, MAIN_CHAIN[1:])]
    data_edges = [["gate", "register"], ["evaluate", "review"], ["gate", "review"], ["snapshot", "purge"]]
    assert parsed["tasks"] == sorted([*MAIN_CHAIN, "review", "purge"])
    assert parsed["edges"] == sorted([*chain_edges, *data_edges])


def test_default_schedule_is_02_00_utc_without_catchup_one_run_at_a_time(parsed):
    assert parsed["is_cron_interval"], parsed["timetable"]
    assert parsed["cron"] == "0 2 * * *"
    assert parsed["timezone"] == "UTC"
    assert parsed["catchup"] is False
    assert parsed["max_active_runs"] == 1
    assert set(parsed["retries"].values()) == {2}
    assert set(parsed["retry_delay_s"].values()) == {300.0}


def test_schedule_and_retries_follow_the_environment(tmp_path):
    out = json.loads(_run(PARSE, [str(DAGS), DAG_ID], tmp_path, SHADOW_DISTILL_SCHEDULE="30 4 * * 1-5",
                          SHADOW_DISTILL_RETRIES="5", SHADOW_DISTILL_RETRY_DELAY_S="7"))
    assert out["cron"] == "30 4 * * 1-5"
    assert set(out["retries"].values()) == {5}
    assert set(out["retry_delay_s"].values()) == {7.0}


def test_importing_the_dag_file_imports_no_heavy_library(tmp_path):
    loaded = json.loads(_run(IMPORT_ONLY, [str(DAGS / f"{DAG_ID}.py"), ",".join(HEAVY)], tmp_path))
    assert loaded == [], f"parsing the DAG imported {loaded}: keep heavy imports inside the tasks"


def test_by_default_no_task_pod_asks_for_a_gpu(parsed):
    assert parsed["gpus"] == {}


def test_only_train_and_evaluate_pods_ask_for_gpus_under_the_kubernetes_executor(tmp_path):
    out = json.loads(_run(PARSE, [str(DAGS), DAG_ID], tmp_path, SHADOW_DISTILL_TRAIN_GPUS="4"))
    assert out["gpus"] == {"train": "4", "evaluate": "1"}
