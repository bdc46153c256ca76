"""The model registry against a real MLflow: a SQLite store with local artifacts, and a real `mlflow server`.

    .venv/bin/python -m pytest tests/integration/test_registry.py -q

One SQLite store serves the module (MLflow's schema migration costs seconds); each test registers its own
model name, so tests share nothing but the database file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from safetensors.numpy import save_file

from message_bus.broker import free_port, wait_for_port
from model_registry import (
    ADAPTER_ARTIFACT,
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    ALIAS_PREVIOUS,
    PIPELINE_IDENTITY,
    Registry,
)
from model_registry.audit import UNKNOWN_ACTOR
from model_runtime.adapters import ADAPTER_META
from foundation.errors import RegistryError, ShadowDistillError

pytestmark = pytest.mark.integration

GATE_TAGS = {"gate.ifeval_prompt_strict": "0.41", "data.window": "2025-06-01/2025-06-02",
             "data.trajectories": "1200", "teacher.id": "smollm2-135m-instruct", "code.version": "abc123"}


def write_adapter(folder: Path, seed: int) -> Path:
    """A small stand-in adapter folder: real safetensors plus the two JSON files serving checks for."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"lora_A": rng.standard_normal((4, 8), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "seed": seed}))
    (folder / ADAPTER_META).write_text(json.dumps({"base_model_id": "tiny-student", "rank": 4}))
    return folder


class Runs:
    """Logs training-like runs that hold an adapter under `adapter/`, through one tracking URI."""

    def __init__(self, tracking_uri: str, work: Path, artifact_location: str | None = None) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.work = work
        self.experiment_id = self.client.create_experiment(f"nightly-{uuid.uuid4().hex[:8]}",
                                                           artifact_location=artifact_location)

    def log(self, seed: int, *, with_adapter: bool = True) -> str:
        run_id = self.client.create_run(self.experiment_id).info.run_id
        if with_adapter:
            local = write_adapter(self.work / f"adapter-{run_id}", seed)
            self.client.log_artifacts(run_id, str(local), artifact_path=ADAPTER_ARTIFACT)
        self.client.set_terminated(run_id)
        return run_id


@pytest.fixture(scope="module")
def sqlite_mlflow(tmp_path_factory) -> tuple[str, Runs]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, Runs(uri, root, artifact_location=str(root / "artifacts"))


@pytest.fixture
def reg(sqlite_mlflow) -> Registry:
    return Registry(sqlite_mlflow[0], model_name=f"student-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def runs(sqlite_mlflow) -> Runs:
    return sqlite_mlflow[1]


def register(reg: Registry, runs: Runs, night: str, *, passed: bool = True, seed: int = 0):
    return reg.register_candidate(runs.log(seed), tags=GATE_TAGS, gate_passed=passed, interval_key=night)


def actions(entries: list[dict]) -> list[str]:
    return [e["action"] for e in entries]


def test_candidate_alias_only_when_gate_passed(reg, runs):
    failed = register(reg, runs, "2025-06-01", passed=False)
    assert failed.tags["gate.passed"] == "false"
    assert not failed.gate_passed
    assert reg.alias(ALIAS_CANDIDATE) is None
    assert failed.aliases == ()
    assert {k: failed.tags[k] for k in GATE_TAGS} == GATE_TAGS
    assert failed.source.endswith(f"/{ADAPTER_ARTIFACT}")
    assert failed.run_id

    passed = register(reg, runs, "2025-06-02")
    assert passed.tags["gate.passed"] == "true"
    assert passed.aliases == (ALIAS_CANDIDATE,)
    assert reg.alias(ALIAS_CANDIDATE).version == passed.version != failed.version
    assert reg.champion() is None  # the pipeline never makes a champion


def test_register_is_idempotent_per_interval_key(reg, runs):
    first = register(reg, runs, "2025-06-03")
    again = register(reg, runs, "2025-06-03", seed=1)  # a retried night, even with a fresh run
    assert again.version == first.version
    assert again.run_id == first.run_id
    assert len(runs.client.search_model_versions(f"name = '{reg.model_name}'")) == 1
    assert actions(reg.audit_trail(first.version)) == ["register"]


def test_rerun_completes_an_interrupted_candidate_move(reg, runs):
    v1 = register(reg, runs, "2025-06-04")
    runs.client.delete_registered_model_alias(reg.model_name, ALIAS_CANDIDATE)  # crash before the alias move
    assert register(reg, runs, "2025-06-04").aliases == (ALIAS_CANDIDATE,)
    v2 = register(reg, runs, "2025-06-05")
    assert register(reg, runs, "2025-06-04").aliases == ()  # a newer candidate is not taken back
    assert reg.alias(ALIAS_CANDIDATE).version == v2.version != v1.version


def test_register_refuses_bad_input_and_creates_nothing(reg, runs):
    run_id = runs.log(0)
    bad_tags = [{"gate.passed": "true"}, {"audit.0001": "{}"}, {"mlflow.password": "x"},
                {"store.url": "postgresql://svc:hunter2@db/x"}, {"trajectories": 12}]
    for tags in bad_tags:
        with pytest.raises(RegistryError, match=repr(next(iter(tags)))):
            reg.register_candidate(run_id, tags=tags, gate_passed=True, interval_key="2025-06-06")
    with pytest.raises(RegistryError) as caught:
        reg.register_candidate(run_id, tags={"store.url": "postgresql://svc:hunter2@db/x"}, gate_passed=True,
                               interval_key="2025-06-06")
    assert "hunter2" not in str(caught.value)  # a refused secret is never echoed
    with pytest.raises(RegistryError, match="no artifacts under 'adapter'"):
        reg.register_candidate(runs.log(0, with_adapter=False), tags={}, gate_passed=True, interval_key="k")
    with pytest.raises(RegistryError, match="cannot register run 'no-such-run'"):
        reg.register_candidate("no-such-run", tags={}, gate_passed=True, interval_key="k")
    with pytest.raises(RegistryError, match="interval_key"):
        reg.register_candidate(run_id, tags={}, gate_passed=True, interval_key="x' or name != '")
    assert runs.client.search_model_versions(f"name = '{reg.model_name}'") == []


def test_approve_refuses_ungated_pipeline_empty_and_unknown(reg, runs):
    failed = register(reg, runs, "2025-06-07", passed=False)
    gated = register(reg, runs, "2025-06-08")
    refusals = [
        ((failed.version, "alice"), rf"approve version {failed.version} .* by 'alice': it did not pass the gate"),
        ((gated.version, PIPELINE_IDENTITY), "is the pipeline itself"),
        ((gated.version, " " + PIPELINE_IDENTITY.upper()), "is the pipeline itself"),
        ((gated.version, "  "), rf"approve version {gated.version} .*the reviewer is empty"),
        (("99", "alice"), f"model '{reg.model_name}' has no version 99"),
        (("latest", "alice"), "'latest' is not a positive integer"),
    ]
    for (version, reviewer), message in refusals:
        with pytest.raises(RegistryError, match=message):
            reg.approve(version, reviewer)
    assert reg.champion() is None
    assert reg.model_audit_trail()[-1]["details"]["alias"] == ALIAS_CANDIDATE


def test_approve_moves_champion_to_previous_and_is_idempotent(reg, runs):
    v1, v2 = register(reg, runs, "2025-06-09"), register(reg, runs, "2025-06-10")
    first = reg.approve(v1.version, "alice")
    assert first.aliases == (ALIAS_CHAMPION,)
    assert reg.alias(ALIAS_PREVIOUS) is None
    second = reg.approve(v2.version, "bob")
    assert reg.champion().version == v2.version
    assert reg.alias(ALIAS_PREVIOUS).version == v1.version
    assert second.tags["approved_by"] == "bob"
    assert datetime.fromisoformat(second.tags["approved_at"]).utcoffset().total_seconds() == 0

    trail_before = reg.audit_trail(v2.version)
    assert reg.approve(v2.version, "carol").tags["approved_by"] == "bob"  # already champion: no-op
    assert reg.audit_trail(v2.version) == trail_before
    assert reg.alias(ALIAS_PREVIOUS).version == v1.version


def test_rollback_restores_previous_and_a_second_rollback_undoes_it(reg, runs):
    v1, v2 = register(reg, runs, "2025-06-11"), register(reg, runs, "2025-06-12")
    reg.approve(v1.version, "alice")
    with pytest.raises(RegistryError, match=f"roll back {reg.model_name} .*'dave'.*no 'previous' version"):
        reg.rollback("dave")
    reg.approve(v2.version, "alice")

    restored = reg.rollback("dave")
    assert restored.version == v1.version
    assert reg.champion().version == v1.version
    demoted = reg.version(v2.version)
    assert demoted.aliases == (ALIAS_CANDIDATE, ALIAS_PREVIOUS)
    assert demoted.tags["rolled_back_by"] == "dave"
    assert reg.rollback("erin").version == v2.version
    assert reg.alias(ALIAS_PREVIOUS).version == v1.version
    with pytest.raises(RegistryError, match="actor is empty"):
        reg.rollback("")


def test_aliases_moved_outside_are_followed(reg, runs):
    v1, v2 = register(reg, runs, "2025-06-13"), register(reg, runs, "2025-06-14")
    ui = MlflowClient(tracking_uri=reg.tracking_uri, registry_uri=reg.tracking_uri)  # a reviewer in the UI
    ui.set_registered_model_alias(reg.model_name, ALIAS_CHAMPION, v1.version)
    assert reg.champion().version == v1.version
    ui.set_registered_model_alias(reg.model_name, ALIAS_CHAMPION, v2.version)
    assert reg.champion().version == v2.version
    ui.delete_registered_model_alias(reg.model_name, ALIAS_CHAMPION)
    assert reg.champion() is None


# ---- aliases moved outside shadow-distill (the MLflow UI) ---------------------------------------------------

def ui_client(reg: Registry) -> MlflowClient:
    return MlflowClient(tracking_uri=reg.tracking_uri, registry_uri=reg.tracking_uri)  # a reviewer in the UI


@pytest.fixture
def ui_approved(reg, runs):
    """v1 approved with `promote approve`, then v2 made champion in the MLflow UI, then reconciled once."""
    v1, v2 = register(reg, runs, "2025-07-01"), register(reg, runs, "2025-07-02")
    reg.approve(v1.version, "alice")
    ui_client(reg).set_registered_model_alias(reg.model_name, ALIAS_CHAMPION, v2.version)
    reg.reconcile_aliases()
    return reg, v1, v2


def last_champion_move(reg: Registry) -> dict:
    return [e for e in reg.model_audit_trail() if e["details"]["alias"] == ALIAS_CHAMPION][-1]


def test_a_ui_champion_move_is_audited_with_an_unknown_actor(ui_approved):
    reg, _, _ = ui_approved
    assert last_champion_move(reg)["actor"] == UNKNOWN_ACTOR


def test_a_ui_champion_move_is_audited_from_and_to_its_versions(ui_approved):
    reg, v1, v2 = ui_approved
    details = last_champion_move(reg)["details"]
    assert (details["from"], details["to"]) == (v1.version, v2.version)


def test_a_ui_champion_move_carries_the_versions_gate_evidence(ui_approved):
    reg, _, _ = ui_approved
    assert last_champion_move(reg)["details"]["gate"] == {"gate.ifeval_prompt_strict": "0.41", "gate.passed": "true"}


def test_a_ui_champion_move_says_when_it_was_noticed_not_when_it_happened(ui_approved):
    reg, _, _ = ui_approved
    assert "no author and no time" in last_champion_move(reg)["details"]["mlflow"]


def test_a_ui_approval_is_on_the_versions_trail_as_an_approve(ui_approved):
    reg, _, v2 = ui_approved
    entry = reg.audit_trail(v2.version)[-1]
    assert (entry["action"], entry["actor"]) == ("approve", UNKNOWN_ACTOR)


def test_a_ui_approval_can_be_rolled_back_like_any_other(ui_approved):
    reg, v1, _ = ui_approved
    assert reg.rollback("bob").version == v1.version


def test_reconcile_records_a_move_once(ui_approved):
    reg, _, _ = ui_approved
    assert reg.reconcile_aliases() == []


def test_a_ui_move_to_an_ungated_version_is_audited_as_such(reg, runs):
    failed = register(reg, runs, "2025-07-03", passed=False)
    ui_client(reg).set_registered_model_alias(reg.model_name, ALIAS_CHAMPION, failed.version)
    reg.reconcile_aliases()
    assert reg.audit_trail(failed.version)[-1]["action"] == "champion_ungated"


def test_every_registry_action_reconciles_first(reg, runs):
    v1, v2 = register(reg, runs, "2025-07-04"), register(reg, runs, "2025-07-05")
    ui_client(reg).set_registered_model_alias(reg.model_name, ALIAS_CHAMPION, v1.version)
    reg.approve(v2.version, "carol")
    moves = [(e["actor"], e["details"]["to"]) for e in reg.model_audit_trail() if e["details"]["alias"] == ALIAS_CHAMPION]
    assert moves == [(UNKNOWN_ACTOR, v1.version), ("carol", v2.version)]


def test_audit_trail_records_each_action(reg, runs):
    v1, v2 = register(reg, runs, "2025-06-15"), register(reg, runs, "2025-06-16")
    reg.approve(v1.version, "alice")
    reg.approve(v2.version, "bob")
    reg.rollback("carol")

    assert actions(reg.audit_trail(v2.version)) == ["register", "approve", "rollback"]
    register_entry, approve_entry, rollback_entry = reg.audit_trail(v2.version)
    assert register_entry["actor"] == PIPELINE_IDENTITY
    assert register_entry["details"]["gate_passed"] is True
    assert approve_entry["actor"] == "bob"
    assert approve_entry["details"]["replaced_champion"] == v1.version
    assert rollback_entry["details"] == {"from": v2.version, "to": v1.version, "role": "demoted"}
    assert actions(reg.audit_trail(v1.version)) == ["register", "approve", "rollback"]

    moves = [(e["details"]["alias"], e["details"]["from"], e["details"]["to"], e["actor"])
             for e in reg.model_audit_trail()]
    assert moves == [
        (ALIAS_CANDIDATE, None, v1.version, PIPELINE_IDENTITY),
        (ALIAS_CANDIDATE, v1.version, v2.version, PIPELINE_IDENTITY),
        (ALIAS_CHAMPION, None, v1.version, "alice"),
        (ALIAS_PREVIOUS, None, v1.version, "bob"),
        (ALIAS_CHAMPION, v1.version, v2.version, "bob"),
        (ALIAS_CHAMPION, v2.version, v1.version, "carol"),
        (ALIAS_PREVIOUS, v1.version, v2.version, "carol"),
    ]
    assert [e["at"] for e in reg.model_audit_trail()
            if datetime.fromisoformat(e["at"]).utcoffset().total_seconds() != 0] == []


def test_download_returns_the_adapter_files(reg, runs, tmp_path):
    v1 = register(reg, runs, "2025-06-17", seed=7)
    dst = reg.download_adapter(v1.version, tmp_path / "adapters" / f"v{v1.version}")
    expected = write_adapter(tmp_path / "expected", seed=7)
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in expected.iterdir())
    assert [p.name for p in expected.iterdir() if (dst / p.name).read_bytes() != p.read_bytes()] == []
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # no staging folder left behind
    with pytest.raises(RegistryError, match="exists and is not empty"):
        reg.download_adapter(v1.version, dst)


def test_global_mlflow_settings_are_ignored(reg, runs, monkeypatch, tmp_path):
    """Other code in the process may point MLflow's globals elsewhere; the registry uses only its own URIs."""
    nowhere = "http://127.0.0.1:9"  # nothing listens: any use of the globals fails at once
    for name, value in {"MLFLOW_TRACKING_URI": nowhere, "MLFLOW_REGISTRY_URI": nowhere,
                        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}.items():
        monkeypatch.setenv(name, value)
    fresh = Registry(reg.tracking_uri, reg.model_name)
    v1 = register(fresh, runs, "2025-06-18")
    assert fresh.approve(v1.version, "alice").aliases == (ALIAS_CANDIDATE, ALIAS_CHAMPION)
    assert any(fresh.download_adapter(v1.version, tmp_path / "a").iterdir())


# ---- through a real `mlflow server`, as serving and reviewers reach it ---------------------------------------

class MlflowServer:
    """`mlflow server` (SQLite, proxied artifacts) on a free loopback port, its output in `root/server.log`."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (root / "server.log").open("w")
        self._proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self._proc.returncode}: "
                            f"{(self.root / 'server.log').read_text()[-2000:]}")
            try:
                wait_for_port("127.0.0.1", self.port, timeout_s=1)
                return self.url
            except ShadowDistillError:
                pass
        pytest.fail(f"mlflow server not listening on {self.url} after {timeout_s:.0f} s")

    def stop(self) -> None:
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)  # its own session: the CLI and its uvicorn child
            self._proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._log.close()


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory):
    """Started before the first test of the module so its boot (10-20 s on 2 cores) overlaps the SQLite tests."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


def test_promotion_through_mlflow_server(mlflow_server, tmp_path):
    url, root = mlflow_server.wait_ready(), mlflow_server.root
    runs = Runs(url, tmp_path)  # artifacts proxied by the server (mlflow-artifacts:/)
    pipeline = Registry(url, model_name="student-served")
    v1 = pipeline.register_candidate(runs.log(1), tags=GATE_TAGS, gate_passed=True, interval_key="n1")
    run_2 = runs.log(2)
    v2 = pipeline.register_candidate(run_2, tags=GATE_TAGS, gate_passed=True, interval_key="n2")
    assert v1.source.startswith("mlflow-artifacts:")
    assert pipeline.alias(ALIAS_CANDIDATE).version == v2.version
    assert pipeline.register_candidate(run_2, tags={}, gate_passed=True, interval_key="n2").version == v2.version
    assert len(runs.client.search_model_versions("name = 'student-served'")) == 2

    reviewer, serving = Registry(url, "student-served"), Registry(url, "student-served")
    reviewer.approve(v1.version, "alice")
    reviewer.approve(v2.version, "bob")
    assert serving.champion().version == v2.version
    assert serving.alias(ALIAS_PREVIOUS).version == v1.version

    dst = serving.download_adapter(v2.version, tmp_path / "served")
    expected = write_adapter(tmp_path / "expected", seed=2)
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in expected.iterdir())
    assert [p.name for p in expected.iterdir() if (dst / p.name).read_bytes() != p.read_bytes()] == []
    assert any((root / "artifacts").rglob("adapter_model.safetensors"))  # stored by the server, not locally

    assert reviewer.rollback("carol").version == v1.version
    assert serving.champion().version == v1.version
    MlflowClient(tracking_uri=url, registry_uri=url).set_registered_model_alias(
        "student-served", ALIAS_CHAMPION, v2.version)  # moved in the UI
    assert serving.champion().version == v2.version
