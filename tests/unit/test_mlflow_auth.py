"""MLflow's basic auth as the platform runs it (infra/mlflow/): the auth config template, the launcher that
completes it from the environment (serve.sh, run here with a stand-in `mlflow`), the users job's plan, and -
where Flask-WTF is installed (MLflow's `auth` extra, which the image installs) - a real
`mlflow server --app-name basic-auth` on loopback with the users job run against it and the project's own
`model_registry.Registry` acting as pipeline, serving and reviewer.

    .venv/bin/python -m pytest tests/unit/test_mlflow_auth.py -q
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

MLFLOW_DIR = Path(__file__).resolve().parents[2] / "infra" / "mlflow"
TEMPLATE = MLFLOW_DIR / "basic_auth.ini"
SERVE = MLFLOW_DIR / "serve.sh"
MODEL = "student-lora"
EXPERIMENT = "shadow-distill-nightly"
ADMIN = ("admin", "admin-password-for-tests")
PIPELINE = ("shadow-pipeline", "pipeline-password-for-tests")
SERVING = ("shadow-serving", "serving-password-for-tests")
REVIEWERS = {"alice": "alice-initial-password", "bob": "bob-initial-password"}


def auth_module(name: str):
    """mlflow/server/auth/<name>.py alone: the package's __init__ needs Flask-WTF, these two modules do not."""
    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mlflow_auth_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_users():
    spec = importlib.util.spec_from_file_location("mlflow_users", MLFLOW_DIR / "users.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the config template ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(TEMPLATE)
    return parser["mlflow"]


def test_a_user_without_a_grant_gets_nothing(template):
    assert template["default_permission"] == "NO_PERMISSIONS"


def test_the_default_permission_is_one_mlflow_knows(template):
    assert template["default_permission"] in auth_module("permissions").ALL_PERMISSIONS


def test_the_template_uses_mlflows_basic_auth_function(template):
    assert template["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"


def test_the_template_holds_no_database_url(template):
    assert "database_uri" not in template


def test_the_template_holds_no_admin_password(template):
    assert "admin_password" not in template


# ---- the launcher ------------------------------------------------------------------------------------------------
@pytest.fixture
def stub_mlflow(tmp_path) -> Path:
    """A stand-in `mlflow` that records its arguments and the auth config it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "mlflow"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_OUT/argv"\n'
                    'printf "%s" "$MLFLOW_AUTH_CONFIG_PATH" > "$STUB_OUT/config_path"\n')
    stub.chmod(0o755)
    return bin_dir


def launcher_env(tmp_path: Path, bin_dir: Path, **overrides) -> dict[str, str]:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_OUT": str(tmp_path), "TMPDIR": str(tmp_path),
           "MLFLOW_AUTH_DATABASE_URI": "postgresql+psycopg://shadow:p%40ss@postgres:5432/mlflow_auth",
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 16,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "y" * 16}
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def run_launcher(tmp_path: Path, bin_dir: Path, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(SERVE), "--backend-store-uri", "sqlite:///x.db", "--port", "5000"],
                          env=launcher_env(tmp_path, bin_dir, **overrides), capture_output=True, text=True,
                          timeout=60)


def test_the_launcher_runs_the_basic_auth_app_with_its_arguments(tmp_path, stub_mlflow):
    run_launcher(tmp_path, stub_mlflow)
    assert (tmp_path / "argv").read_text().split() == ["server", "--app-name", "basic-auth",
                                                       "--backend-store-uri", "sqlite:///x.db", "--port", "5000"]


def test_the_written_config_is_private(tmp_path, stub_mlflow):
    run_launcher(tmp_path, stub_mlflow)
    mode = stat.S_IMODE(Path((tmp_path / "config_path").read_text()).stat().st_mode)
    assert mode == 0o600


def test_mlflow_reads_the_database_url_back_unchanged(tmp_path, stub_mlflow, monkeypatch):
    read_auth_config = auth_module("config").read_auth_config
    run_launcher(tmp_path, stub_mlflow)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", (tmp_path / "config_path").read_text())
    assert read_auth_config().database_uri == "postgresql+psycopg://shadow:p%40ss@postgres:5432/mlflow_auth"


def test_mlflow_reads_the_templates_default_permission(tmp_path, stub_mlflow, monkeypatch):
    read_auth_config = auth_module("config").read_auth_config
    run_launcher(tmp_path, stub_mlflow)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", (tmp_path / "config_path").read_text())
    assert read_auth_config().default_permission == "NO_PERMISSIONS"


def test_the_launcher_refuses_to_start_without_an_admin_password(tmp_path, stub_mlflow):
    result = run_launcher(tmp_path, stub_mlflow, MLFLOW_AUTH_ADMIN_PASSWORD=None)
    assert result.returncode != 0
    assert not (tmp_path / "argv").exists()


# ---- the users job's plan ----------------------------------------------------------------------------------------
@pytest.fixture
def users_env(monkeypatch, tmp_path) -> Path:
    for prefix, (user, password) in (("PIPELINE", PIPELINE), ("SERVING", SERVING)):
        monkeypatch.setenv(f"MLFLOW_{prefix}_USERNAME", user)
        monkeypatch.setenv(f"MLFLOW_{prefix}_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    reviewers = tmp_path / "reviewers.json"
    reviewers.write_text(json.dumps(REVIEWERS))
    return reviewers


def plan(reviewers: Path) -> dict[str, dict[str, str]]:
    users = load_users()
    args = users.build_parser().parse_args(["--tracking-uri", "http://mlflow:5000", "--model-name", MODEL,
                                            "--reviewers-file", str(reviewers)])
    return {name: grants for name, _, grants in users.plan(args)}


def test_the_pipeline_may_log_runs_and_change_the_model(users_env):
    assert plan(users_env)[PIPELINE[0]] == {"experiment": "EDIT", "registered_model": "EDIT"}


def test_serving_may_only_read(users_env):
    assert plan(users_env)[SERVING[0]] == {"experiment": "READ", "registered_model": "READ"}


def test_reviewers_may_change_the_model_and_read_the_runs(users_env):
    grants = plan(users_env)
    for reviewer in REVIEWERS:
        assert grants[reviewer] == {"experiment": "READ", "registered_model": "EDIT"}, reviewer


def test_a_reviewer_cannot_be_the_pipeline(users_env):
    users_env.write_text(json.dumps({PIPELINE[0]: "some-password-123"}))
    with pytest.raises(SystemExit, match="a person must review"):
        plan(users_env)


def test_there_must_be_a_reviewer(users_env):
    users_env.write_text("{}")
    with pytest.raises(SystemExit, match="non-empty"):
        plan(users_env)


# ---- a real basic-auth server ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if importlib.util.find_spec("flask_wtf") is None:
        pytest.skip("Flask-WTF (MLflow's `auth` extra) is not installed here; the image installs mlflow[auth]")
    root = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    env = {**os.environ, "TMPDIR": str(root), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{root}/auth.db", "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key-0123456789"}
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(["sh", str(SERVE), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while http_status_or_none(f"{uri}/health") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def http_status_or_none(url: str) -> int | None:
    try:
        return http_status(url)
    except OSError:
        return None


@contextlib.contextmanager
def logged_in(user: tuple[str, str]):
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def users_job(server, tmp_path_factory) -> list[list[dict]]:
    """The users job run twice (the second run must change no reviewer's password); its printed lines."""
    reviewers = tmp_path_factory.mktemp("reviewers") / "reviewers.json"
    reviewers.write_text(json.dumps(REVIEWERS))
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "MLFLOW_TRACKING_USERNAME": ADMIN[0],
           "MLFLOW_TRACKING_PASSWORD": ADMIN[1], "MLFLOW_PIPELINE_USERNAME": PIPELINE[0],
           "MLFLOW_PIPELINE_PASSWORD": PIPELINE[1], "MLFLOW_SERVING_USERNAME": SERVING[0],
           "MLFLOW_SERVING_PASSWORD": SERVING[1]}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, str(MLFLOW_DIR / "users.py"), "--model-name", MODEL,
                              "--experiment", EXPERIMENT, "--reviewers-file", str(reviewers)],
                             env=env, capture_output=True, text=True, timeout=300, check=True).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    return runs


@pytest.fixture(scope="module")
def candidate(server, users_job, tmp_path_factory) -> str:
    """The pipeline logs a night's run with an adapter folder and registers it (gate passed): the version."""
    from mlflow import MlflowClient

    from model_registry.registry import Registry

    adapter = tmp_path_factory.mktemp("adapter")
    (adapter / "adapter_config.json").write_text("{}")
    with logged_in(PIPELINE):
        client = MlflowClient(server)
        run = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id)
        client.log_artifacts(run.info.run_id, str(adapter), "adapter")
        return Registry(server, MODEL).register_candidate(run.info.run_id, tags={}, gate_passed=True,
                                                          interval_key="night-1").version


def refused(fn) -> str | None:
    """The MLflow error code of a refused call, None if it went through."""
    from mlflow.exceptions import MlflowException

    try:
        fn()
    except MlflowException as exc:
        return exc.error_code
    return None


def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server)


def registry(server):
    from model_registry.registry import Registry

    return Registry(server, MODEL)


def test_the_health_endpoint_needs_no_login(server):
    assert http_status(f"{server}/health") == 200


def test_an_anonymous_request_is_refused(server):
    assert http_status(f"{server}/api/2.0/mlflow/experiments/search?max_results=1") == 401


def test_the_users_job_creates_every_user(users_job):
    assert {line["user"] for line in users_job[0] if line["account"] == "created"} == \
        {PIPELINE[0], SERVING[0], *REVIEWERS}


def test_a_second_run_keeps_the_reviewers_passwords(users_job):
    assert {line["user"]: line["account"] for line in users_job[1]} == \
        {PIPELINE[0]: "password set", SERVING[0]: "password set", **{r: "kept" for r in REVIEWERS}}


def test_the_pipeline_registers_a_candidate(server, candidate):
    with logged_in(SERVING):
        assert registry(server).alias("candidate").version == candidate


def test_serving_downloads_the_adapter(server, candidate, tmp_path):
    with logged_in(SERVING):
        folder = registry(server).download_adapter(candidate, tmp_path / "v")
    assert (folder / "adapter_config.json").exists()


def test_serving_cannot_move_an_alias(server, candidate):
    with logged_in(SERVING):
        assert refused(lambda: client(server).set_registered_model_alias(MODEL, "champion", candidate)) == \
            "PERMISSION_DENIED"


def test_serving_cannot_tag_a_version(server, candidate):
    with logged_in(SERVING):
        assert refused(lambda: client(server).set_model_version_tag(MODEL, candidate, "gate.passed", "true")) == \
            "PERMISSION_DENIED"


def test_a_reviewer_approves_the_candidate(server, candidate):
    with logged_in(("alice", REVIEWERS["alice"])):
        assert registry(server).approve(candidate, reviewer="alice").version == candidate


def test_a_reviewer_cannot_log_runs(server, users_job):
    with logged_in(("bob", REVIEWERS["bob"])):
        experiment = client(server).get_experiment_by_name(EXPERIMENT).experiment_id
        assert refused(lambda: client(server).create_run(experiment)) == "PERMISSION_DENIED"


def test_a_reviewer_cannot_delete_the_model(server, users_job):
    with logged_in(("bob", REVIEWERS["bob"])):
        assert refused(lambda: client(server).delete_registered_model(MODEL)) == "PERMISSION_DENIED"


def test_a_user_without_grants_cannot_read_the_model(server, users_job):
    from mlflow.server.auth.client import AuthServiceClient

    with logged_in(ADMIN):
        AuthServiceClient(server).create_user("carol", "carol-password-for-tests")
    with logged_in(("carol", "carol-password-for-tests")):
        assert refused(lambda: client(server).get_registered_model(MODEL)) == "PERMISSION_DENIED"


def test_a_wrong_password_is_refused(server, users_job):
    with logged_in(("alice", "not-alices-password")):
        assert refused(lambda: client(server).get_registered_model(MODEL)) == "UNAUTHENTICATED"


def test_mlflow_has_no_per_alias_grant_so_the_pipeline_could_move_champion(server, candidate):
    """A limit, asserted so that it is seen: the pipeline's EDIT (needed for versions, tags and `candidate`)
    also lets it move `champion`. Only Airflow holds that login; serving checks the gate tag itself."""
    with logged_in(PIPELINE):
        assert refused(lambda: client(server).set_registered_model_alias(MODEL, "champion", candidate)) is None
