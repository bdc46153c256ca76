"""The whole shadow loop once, on tiny models with the real broker, SQLite, MLflow server and Airflow.

serve -> Kafka -> teacher scoring -> feature store -> `airflow dags test` (train, gate, register) -> approval ->
serving hot-loads the approved adapter. This is `shadow-distill demo --tiny`, asserted.
"""

import pytest

from shadow_distill.demo import DemoConfig, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_the_loop_closes_end_to_end(tmp_path):
    summary = run_demo(DemoConfig(tiny=True, workdir=tmp_path, train_requests=16, eval_requests=4, max_tokens=8,
                                  concurrency=4))
    assert summary["request_errors"] == []
    # Every served choice is logged, stored once and scored: nothing lost, nothing twice.
    assert summary["requests_served"] == 24
    assert summary["trajectories_stored"] == summary["trajectories_scored"] == summary["requests_served"]
    assert summary["training_steps"] > 0
    # The gate passed, the reviewer approved, and serving reports the approved version.
    assert summary["promoted_version"] == "1"
    assert summary["serving_adapter_version"] == "1"
    for side in ("champion", "candidate"):
        assert summary[f"heldout_{side}"]["reverse_kl"] == summary[f"heldout_{side}"]["reverse_kl"]  # not NaN
        assert 0.0 <= summary[f"ifeval_{side}"]["prompt_strict"] <= 1.0
    before, after = summary["traffic_reverse_kl_before"], summary["traffic_reverse_kl_after"]
    assert before[2] > 0
    assert after[2] > 0  # both windows of fresh traffic were measured
    assert list(tmp_path.glob("*/summary.json"))
