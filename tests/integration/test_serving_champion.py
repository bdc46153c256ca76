"""Serving follows the MLflow registry's champion: real SQLite MLflow, real peft adapters of the tiny student.

Register -> approve makes serving swap; a second approval swaps again; the registry's rollback moves the
alias back and serving follows it, with outputs identical to the first time that version served. A champion
moved directly in MLflow (`set_registered_model_alias`, as the MLflow UI does) is served when its version passed
the gate, and audited; onto an ungated version it is refused, and the refusal shows on /health and /metrics.
"""

import uuid

import httpx
import pytest
from mlflow import MlflowClient

from model_registry import ADAPTER_ARTIFACT, ALIAS_CHAMPION, Registry
from model_registry.audit import UNKNOWN_ACTOR
from model_runtime.sampling import DecodeParams
from serving.adapter_watcher import AdapterWatcher, mlflow_champion_source
from serving.config import ServingConfig
from serving.engine_base import RowRequest
from tests.support.serving import embedded_engine, live_server, make_adapter

pytestmark = pytest.mark.integration

RANK = 4
GREEDY = [RowRequest((1, 300, 262, 201, 293, 275, 81, 2, 201, 1), DecodeParams(max_tokens=8, temperature=0))]


class Nightly:
    """A SQLite MLflow with one registered model, and nights that register a real adapter of the student."""

    def __init__(self, student, tmp_path):
        self.student, self.tmp_path = student, tmp_path
        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)  # also: a reviewer in the UI
        self.experiment = self.client.create_experiment(f"nightly-{uuid.uuid4().hex[:6]}",
                                                        artifact_location=str(tmp_path / "artifacts"))
        self.registry = Registry(self.uri, "student-lora")
        self.adapters_root = tmp_path / "serving-adapters"

    def night(self, seed: int, gate_passed: bool = True) -> str:
        run_id = self.client.create_run(self.experiment).info.run_id
        folder = make_adapter(self.student, self.tmp_path / f"trained-{seed}", seed=seed, rank=RANK)
        self.client.log_artifacts(run_id, str(folder), artifact_path=ADAPTER_ARTIFACT)
        self.client.set_terminated(run_id)
        return self.registry.register_candidate(run_id, tags={"data.window": f"night-{seed}"},
                                                gate_passed=gate_passed, interval_key=f"night-{seed}").version

    def watcher(self, engine) -> AdapterWatcher:
        source = mlflow_champion_source(self.uri, "student-lora", self.adapters_root / "champion-cache")
        return AdapterWatcher(source, engine, self.adapters_root, poll_s=60, base_model_id=engine.base_model_id,
                              rank=RANK)

    def move_champion_in_the_ui(self, version: str) -> None:
        self.client.set_registered_model_alias("student-lora", ALIAS_CHAMPION, version)


@pytest.fixture
def nightly(tiny_models, tmp_path) -> Nightly:
    return Nightly(tiny_models[1], tmp_path)


def served(engine):
    out = engine.submit(GREEDY).future.result(60)
    return out.adapter_version, out.rows[0].completion_ids


def test_watcher_follows_approvals_and_rollback_in_mlflow(nightly):
    with embedded_engine(nightly.student, batch_wait_ms=0) as engine:
        watcher = nightly.watcher(engine)
        assert watcher.poll_once() == "unchanged"
        assert served(engine)[0] is None  # no champion yet: the base
        first = nightly.night(1)
        assert watcher.poll_once() == "unchanged"  # a candidate is not served until a reviewer approves
        nightly.registry.approve(first, "alice")
        assert watcher.poll_once() == "swapped"
        v_first = served(engine)
        assert v_first[0] == first
        second = nightly.night(2)
        nightly.registry.approve(second, "bob")
        assert watcher.poll_once() == "swapped"
        assert served(engine)[0] == second
        nightly.registry.rollback("carol")
        assert watcher.poll_once() == "swapped"
        assert served(engine) == v_first
        assert watcher.poll_once() == "unchanged"
        assert sorted(p.name for p in (nightly.adapters_root / "champion-cache").iterdir()) == sorted([first, second])


# ---- champion moved directly in MLflow ------------------------------------------------------------------------

@pytest.fixture
def ui_gated(nightly):
    """v1 approved and served, then a reviewer makes the gated v2 champion in the MLflow UI; one poll."""
    with embedded_engine(nightly.student, batch_wait_ms=0) as engine:
        watcher = nightly.watcher(engine)
        first, second = nightly.night(1), nightly.night(2)
        nightly.registry.approve(first, "alice")
        watcher.poll_once()
        nightly.move_champion_in_the_ui(second)
        outcome = watcher.poll_once()
        yield outcome, engine, second


def test_a_gated_champion_moved_in_the_ui_is_swapped_in(ui_gated):
    assert ui_gated[0] == "swapped"


def test_a_gated_champion_moved_in_the_ui_is_served(ui_gated):
    _, engine, second = ui_gated
    assert served(engine)[0] == second


def test_a_gated_champion_moved_in_the_ui_is_audited_by_serving(nightly, ui_gated):
    move = [e for e in nightly.registry.model_audit_trail()
            if e["details"]["alias"] == ALIAS_CHAMPION and e["details"]["to"] == ui_gated[2]]
    assert [(e["actor"], e["details"]["noticed_by"]) for e in move] == [(UNKNOWN_ACTOR, "serving")]


@pytest.fixture
def ui_ungated(nightly):
    """v1 approved and served; then the UI makes the ungated v2 champion; a live server with the watcher; one poll."""
    with embedded_engine(nightly.student, batch_wait_ms=0) as engine:
        watcher = nightly.watcher(engine)
        first, ungated = nightly.night(1), nightly.night(2, gate_passed=False)
        nightly.registry.approve(first, "alice")
        watcher.poll_once()
        nightly.move_champion_in_the_ui(ungated)
        outcome = watcher.poll_once()
        with live_server(ServingConfig(model_dir=nightly.student), engine=engine, sink=None, watcher=watcher) as srv:
            yield outcome, srv, first, ungated


def test_an_ungated_champion_moved_in_the_ui_is_refused(ui_ungated):
    assert ui_ungated[0] == "refused"


def test_an_ungated_champion_leaves_the_current_adapter_serving(ui_ungated):
    _, srv, first, _ = ui_ungated
    assert served(srv.engine)[0] == first


def test_an_ungated_champion_is_not_downloaded(nightly, ui_ungated):
    assert not (nightly.adapters_root / "champion-cache" / ui_ungated[3]).exists()


def test_the_refusal_is_in_what_health_reports(ui_ungated):
    _, srv, _, ungated = ui_ungated
    assert f"version {ungated} is the registry's champion but did not pass the gate" in \
        srv.app.state.health_details()["champion"]["refused"]


def test_the_refusal_is_on_health(ui_ungated):
    _, srv, _, _ = ui_ungated
    body = httpx.get(f"{srv.url}/health", timeout=10).json()
    assert body["champion"]["refused"]


def test_the_refusal_is_on_metrics(ui_ungated):
    _, srv, _, ungated = ui_ungated
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    assert f'shadow_serving_champion_refused{{version="{ungated}"}} 1.0' in text


def test_the_refusal_is_counted_on_metrics(ui_ungated):
    _, srv, _, _ = ui_ungated
    assert "shadow_adapter_watcher_champion_refused 1.0" in httpx.get(f"{srv.url}/metrics", timeout=10).text


def test_an_ungated_champion_moved_in_the_ui_is_audited_as_ungated(nightly, ui_ungated):
    assert nightly.registry.audit_trail(ui_ungated[3])[-1]["action"] == "champion_ungated"
