"""Serving follows the MLflow registry's champion: real SQLite MLflow, real peft adapters of the tiny student.

Register -> approve makes serving swap; a second approval swaps again; the registry's rollback moves the
alias back and serving follows it, with outputs identical to the first time that version served.
"""

import uuid

import pytest
from mlflow import MlflowClient

from model_registry import ADAPTER_ARTIFACT, Registry
from model_runtime.sampling import DecodeParams
from serving.adapter_watcher import AdapterWatcher, mlflow_champion_source
from serving.engine_base import RowRequest
from tests.support.serving import embedded_engine, make_adapter

pytestmark = pytest.mark.integration

RANK = 4
GREEDY = [RowRequest((1, 300, 262, 201, 293, 275, 81, 2, 201, 1), DecodeParams(max_tokens=8, temperature=0))]


def test_watcher_follows_approvals_and_rollback_in_mlflow(tiny_models, tmp_path):
    student = tiny_models[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment(f"nightly-{uuid.uuid4().hex[:6]}",
                                          artifact_location=str(tmp_path / "artifacts"))
    registry = Registry(uri, "student-lora")
    adapters_root = tmp_path / "serving-adapters"

    def nightly(seed: int) -> str:
        run_id = client.create_run(experiment).info.run_id
        folder = make_adapter(student, tmp_path / f"trained-{seed}", seed=seed, rank=RANK)
        client.log_artifacts(run_id, str(folder), artifact_path=ADAPTER_ARTIFACT)
        client.set_terminated(run_id)
        return registry.register_candidate(run_id, tags={"data.window": f"night-{seed}"}, gate_passed=True,
                                           interval_key=f"night-{seed}").version

    with embedded_engine(student, batch_wait_ms=0) as engine:
        source = mlflow_champion_source(uri, "student-lora", adapters_root / "champion-cache")
        watcher = AdapterWatcher(source, engine, adapters_root, poll_s=60, base_model_id=engine.base_model_id,
                                 rank=RANK)

        def served():
            out = engine.submit(GREEDY).future.result(60)
            return out.adapter_version, out.rows[0].completion_ids

        assert watcher.poll_once() == "unchanged"
        assert served()[0] is None  # no champion yet: the base
        first = nightly(1)
        assert watcher.poll_once() == "unchanged"  # a candidate is not served until a reviewer approves
        registry.approve(first, "alice")
        assert watcher.poll_once() == "swapped"
        v_first = served()
        assert v_first[0] == first
        second = nightly(2)
        registry.approve(second, "bob")
        assert watcher.poll_once() == "swapped"
        assert served()[0] == second
        registry.rollback("carol")
        assert watcher.poll_once() == "swapped"
        assert served() == v_first
        assert watcher.poll_once() == "unchanged"
        assert sorted(p.name for p in (adapters_root / "champion-cache").iterdir()) == sorted([first, second])
