"""Lint of the production manifests (no Docker engine runs in CI): the compose file validated against the Compose
Specification's JSON Schema (vendored in infra/schemas/), structure, secrets, Kafka durability, GPU sharing,
MLflow's basic auth, and every `shadow-distill ...` command parsed by the project's own CLI parser and validated
by its config model (the compose file's and docs/runbook.md's). The Kubernetes manifests: test_k8s.py; the
image: test_dockerfile.py.

    .venv/bin/python -m pytest tests/unit/test_infra.py -q
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from schemas.trajectory import DEAD_LETTER_TOPIC, DEFAULT_TOPIC

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
MULTI_GPU_ENV = INFRA / "multi-gpu.env"
COMPOSE_SCHEMA = INFRA / "schemas" / "compose-spec" / "compose-spec.json"
PROJECT_IMAGE = "${SHADOW_DISTILL_IMAGE}"
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
SECRET_NAME = re.compile(r"(^|_)(PASSWORD|SECRET|TOKEN|FERNET|API_KEY|SALT)(_|$)", re.I)
SECRET_FLAGS = {"--api-key", "--vllm-api-key", "--teacher-api-key"}
WHOLE_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name} line without '=': {line!r}"
            out[name.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env(ENV_EXAMPLE)


@pytest.fixture(scope="module", params=["one-gpu", "multi-gpu"])
def env_profile(request, env_example) -> dict[str, str]:
    """The settings compose sees: .env.example alone (one GPU), or with infra/multi-gpu.env after it."""
    return env_example if request.param == "one-gpu" else {**env_example, **read_env(MULTI_GPU_ENV)}


def interpolate(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or op != ":-"):
            return env[name]
        if op in (":-", "-"):
            return default
        raise AssertionError(f"${{{name}}} has no value in .env.example")

    return VAR.sub(one, text).replace("$$", "$")


def command_argv(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def env_items(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def cli_services(services) -> dict[str, list[str]]:
    return {name: command_argv(s) for name, s in services.items() if command_argv(s)[:1] == ["shadow-distill"]}


# ---- structure ----------------------------------------------------------------------------------------------
def test_compose_parses_and_has_the_services_the_platform_needs(services):
    expected = {"kafka-1", "kafka-2", "kafka-3", "kafka-init", "postgres", "mlflow", "airflow-api-server",
                "airflow-scheduler", "airflow-dag-processor", "vllm-student", "vllm-teacher", "serving", "scorer"}
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"


def test_every_service_has_an_image_or_a_build(services):
    bad = [n for n, s in services.items() if not (s.get("image") or s.get("build"))]
    assert not bad, f"services without image or build: {bad}"


def test_depends_on_targets_exist_and_their_conditions_hold(services):
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        deps = {d: {} for d in deps} if isinstance(deps, list) else deps
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert services[target].get("healthcheck", {}).get("test"), \
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is a one-shot job: restart must be 'no'"


def test_healthchecks_are_complete(services):
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        if hc is not None:
            assert isinstance(hc.get("test"), list), name
            assert hc["test"][0] in ("CMD", "CMD-SHELL"), name
            assert hc.get("interval"), f"{name}: healthcheck needs interval"
            assert hc.get("retries"), f"{name}: healthcheck needs retries"


def test_named_volumes_and_secrets_are_declared(compose, services):
    volumes, secrets = set(compose.get("volumes") or {}), set(compose.get("secrets") or {})
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if source.startswith((".", "/")):
                assert (INFRA / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in volumes, f"{name} uses undeclared volume {source}"
        for s in svc.get("secrets", []):
            assert s in secrets, f"{name} uses undeclared secret {s}"


# ---- configuration and secrets ------------------------------------------------------------------------------
def test_every_variable_is_listed_in_env_example(env_example):
    used = {m.group(1) for m in VAR.finditer(COMPOSE.read_text())}
    missing = sorted(used - set(env_example))
    assert not missing, f"${{VAR}}s missing from infra/.env.example: {missing}"
    unused = sorted(set(env_example) - used)
    assert not unused, f".env.example lists variables the compose file never reads: {unused}"


def test_env_example_holds_placeholders_not_secrets(env_example):
    for name, value in env_example.items():
        if SECRET_NAME.search(name) and not name.endswith("_FILE"):
            assert value.startswith("change-me"), f"{name} in .env.example must be a change-me placeholder"


def test_no_literal_secret_in_the_compose_file(services):
    for name, svc in services.items():
        for key, value in env_items(svc).items():
            if SECRET_NAME.search(key):
                assert WHOLE_REF.match(value), f"{name}: {key} must be a ${{...}} reference, not a literal"
        argv = command_argv(svc)
        text = " ".join(argv) + " " + " ".join(env_items(svc).values())
        for flag, value in zip(argv, argv[1:]):
            if flag in SECRET_FLAGS:
                assert WHOLE_REF.match(value), f"{name}: {flag} must be a ${{...}} reference"
        for password in URL_PASSWORD.findall(text):
            assert WHOLE_REF.match(password), f"{name}: a URL carries a literal password"
        literal = re.search(r"(password|passwd|secret|token)\s*[=:]\s*(?!\$\{)[^\s,;]+", text, re.I)
        assert literal is None, f"{name}: literal secret {literal.group(0)!r}"


# ---- Kafka durability ---------------------------------------------------------------------------------------
def test_kafka_is_three_kraft_nodes_replicating_three_ways_with_min_isr_two(services):
    brokers = {n: env_items(s) for n, s in services.items() if n.startswith("kafka-") and n != "kafka-init"}
    assert len(brokers) == 3
    assert sorted(e["KAFKA_NODE_ID"] for e in brokers.values()) == ["1", "2", "3"]
    for name, env in brokers.items():
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, name
        voters = [v.split("@")[1].split(":")[0] for v in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")]
        assert sorted(voters) == sorted(brokers), f"{name}: quorum voters {voters}"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2", name
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", name
        assert env.get("KAFKA_LOG_RETENTION_HOURS"), name
        assert f"PLAINTEXT://{name}:9092" == env["KAFKA_ADVERTISED_LISTENERS"], name


def test_the_topic_job_creates_both_topics_durably_with_retention(services, env_example):
    script = interpolate(" ".join(command_argv(services["kafka-init"])), env_example)
    creates = [c for c in script.split(";") if "--create" in c]
    assert {re.search(r"--topic (\S+)", c).group(1) for c in creates} == {DEFAULT_TOPIC, DEAD_LETTER_TOPIC}
    for c in creates:
        assert "--replication-factor 3" in c, c
        assert "--config min.insync.replicas=2" in c, c
        assert re.search(r"--config retention\.ms=\d+", c), c
        assert "--if-not-exists" in c, c


# ---- the project's own commands -----------------------------------------------------------------------------
def _parse(name: str, argv: list[str]):
    from shadow_distill.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown subcommand or flag
        pytest.fail(f"service {name}: `shadow-distill {' '.join(argv)}` is not a valid command (exit {exc.code}); "
                    "see the argparse message above")


def test_every_shadow_distill_command_parses_and_validates(services, env_example):
    from serving.config import ServingConfig
    from foundation.flags import model_from_args
    from shadow_scoring.config import ScoringConfig

    commands = cli_services(services)
    assert {"serving", "scorer"} <= set(commands), sorted(commands)
    for name, argv in commands.items():
        args = _parse(name, [interpolate(a, env_example) for a in argv[1:]])
        if args.command == "serve":
            cfg = model_from_args(ServingConfig, args)
            assert cfg.engine == "vllm"
            assert cfg.vllm_url == "http://vllm-student:8000"
            assert cfg.kafka_topic == DEFAULT_TOPIC
            assert cfg.spool_dir is not None
            assert cfg.follows_champion
        elif args.command == "score" and args.action == "run":
            cfg = model_from_args(ScoringConfig, args)
            assert cfg.teacher_is_http
            assert cfg.teacher_vocab_size == 49152
            assert (cfg.topic, cfg.dlq_topic) == (DEFAULT_TOPIC, DEAD_LETTER_TOPIC)
            assert cfg.metrics_port is not None


def test_a_wrong_flag_is_caught_by_the_parse(services):
    argv = cli_services(services)["serving"][1:] + ["--no-such-flag", "1"]
    with pytest.raises(pytest.fail.Exception, match="not a valid command"):
        _parse("serving", argv)


# ---- vLLM ---------------------------------------------------------------------------------------------------
def test_vllm_servers_match_what_the_gateway_and_the_scorer_rely_on(services):
    student, teacher = command_argv(services["vllm-student"]), command_argv(services["vllm-teacher"])
    assert "--enable-lora" in student
    assert student[student.index("--max-lora-rank") + 1] == "16"
    assert student[student.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert env_items(services["vllm-student"])["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    serving = command_argv(services["serving"])
    assert int(serving[serving.index("--lora-rank") + 1]) <= 16
    # The gateway and vLLM must see the adapters at the same path (vLLM loads them by path).
    mounts = {s: {v.split(":")[0]: v.split(":")[1] for v in services[s]["volumes"]}
              for s in ("serving", "vllm-student")}
    adapters_root = serving[serving.index("--adapters-root") + 1]
    assert mounts["serving"]["adapters"] == mounts["vllm-student"]["adapters"] == adapters_root
    assert "--served-model-name" in teacher
    for vllm in ("vllm-student", "vllm-teacher"):
        assert services[vllm]["deploy"]["resources"]["reservations"]["devices"], f"{vllm} needs a GPU"


def test_airflow_runs_the_projects_dags(services):
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor"):
        svc = services[name]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        env = env_items(svc)
        assert mounts[env["AIRFLOW__CORE__DAGS_FOLDER"]] == "../dags", name
        assert (INFRA / "../dags/shadow_distill_nightly.py").exists()
        assert env["SHADOW_DISTILL_NIGHTLY_CONFIG"].startswith("/run/secrets/"), name
        assert command_argv(svc)[:2] == ["airflow", name.removeprefix("airflow-")], name


# ---- the runbook --------------------------------------------------------------------------------------------
def runbook_cli_commands() -> list[list[str]]:
    """Every `shadow-distill ...` command in docs/runbook.md's code blocks, continuation lines joined."""
    import shlex

    text = (INFRA.parent / "docs" / "runbook.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["shadow-distill"]:
                commands.append(argv)
    return commands


def test_every_shadow_distill_command_in_the_runbook_parses():
    commands = runbook_cli_commands()
    assert {c[1] for c in commands} >= {"promote", "score", "store", "nightly", "stack"}
    for argv in commands:
        _parse("runbook", argv[1:])


# ---- the Compose Specification --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_validator():
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_the_vendored_schema_is_the_compose_specification():
    assert json.loads(COMPOSE_SCHEMA.read_text())["title"] == "Compose Specification"


def test_the_vendored_schema_knows_top_level_name():
    assert "name" in json.loads(COMPOSE_SCHEMA.read_text())["properties"]


def test_the_vendored_schema_knows_device_reservations_by_id():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    defs = schema.get("$defs") or schema["definitions"]
    assert "device_ids" in defs["devices"]["items"]["properties"]


def test_the_vendored_schema_is_the_file_its_source_note_names():
    note = (COMPOSE_SCHEMA.parent / "SOURCE.md").read_text()
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() in note


def test_the_vendored_schema_carries_its_apache_licence():
    assert "Apache License" in (COMPOSE_SCHEMA.parent / "LICENSE").read_text()


def test_the_compose_file_is_valid_against_the_compose_specification(compose_validator, env_profile):
    document = yaml.safe_load(interpolate(COMPOSE.read_text(), env_profile))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator.iter_errors(document)]
    assert not errors


def test_the_schema_rejects_a_misspelt_key(compose_validator, env_example):
    document = yaml.safe_load(interpolate(COMPOSE.read_text(), env_example))
    document["services"]["serving"]["comand"] = document["services"]["serving"].pop("command")
    assert list(compose_validator.iter_errors(document))


# ---- the project image ------------------------------------------------------------------------------------------
def project_services(services) -> dict[str, dict]:
    return {n: s for n, s in services.items() if s.get("image") == PROJECT_IMAGE}


def test_the_project_image_serves_the_platform(services):
    assert {"serving", "scorer", "mlflow", "airflow-scheduler", "feature-store-migrate"} <= set(project_services(services))


def test_every_project_service_builds_the_image_from_the_dockerfile(services):
    for name, svc in project_services(services).items():
        build = svc["build"]
        assert (INFRA / build["context"] / build["dockerfile"]).resolve() == (INFRA / "Dockerfile").resolve(), name


def test_the_build_context_is_the_repository_root(services):
    assert {(INFRA / s["build"]["context"]).resolve() for s in project_services(services).values()} == \
        {INFRA.parent.resolve()}


def test_the_image_variant_comes_from_the_environment(services):
    assert {s["build"]["args"]["VARIANT"] for s in project_services(services).values()} == \
        {"${SHADOW_DISTILL_IMAGE_VARIANT}"}


def test_the_example_variant_is_one_the_dockerfile_builds(env_example):
    assert f"{env_example['SHADOW_DISTILL_IMAGE_VARIANT']})" in (INFRA / "Dockerfile").read_text()


# ---- GPUs ---------------------------------------------------------------------------------------------------------
def gpu_reservations(services) -> dict[str, dict]:
    out = {}
    for name, svc in services.items():
        for device in svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
            if "gpu" in device.get("capabilities", []):
                out[name] = device
    return out


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_the_gpu_services_are_both_vllm_servers_and_the_trainer(services):
    assert set(gpu_reservations(services)) == {"vllm-student", "vllm-teacher", "airflow-scheduler"}


def test_every_gpu_reservation_pins_its_device_from_the_environment(services):
    for name, device in gpu_reservations(services).items():
        assert [WHOLE_REF.match(d) is not None for d in device["device_ids"]] == [True], name


def test_no_gpu_reservation_also_counts_devices(services):
    assert [n for n, d in gpu_reservations(services).items() if "count" in d] == []


def test_each_vllm_takes_a_memory_fraction_from_the_environment(services):
    for name in ("vllm-student", "vllm-teacher"):
        assert WHOLE_REF.match(flag_value(command_argv(services[name]), "--gpu-memory-utilization")), name


def gpu_budget(services, env: dict[str, str]) -> dict[str, float]:
    """device id -> the fraction of its memory the services pinned to it may take."""
    budget: dict[str, float] = {}
    for name, device in gpu_reservations(services).items():
        device_id = interpolate(device["device_ids"][0], env)
        if name == "airflow-scheduler":
            share = interpolate(services[name]["labels"]["io.shadow-distill.gpu-memory-headroom"], env)
        else:
            share = interpolate(flag_value(command_argv(services[name]), "--gpu-memory-utilization"), env)
        budget[device_id] = budget.get(device_id, 0.0) + float(share)
    return budget


def test_gpu_memory_on_every_device_adds_up_to_less_than_one(services, env_profile):
    over = {d: round(total, 3) for d, total in gpu_budget(services, env_profile).items() if total >= 1.0}
    assert not over, f"GPU memory over-committed per device: {over}"


def test_the_one_gpu_default_puts_everything_on_device_zero(services, env_example):
    assert set(gpu_budget(services, env_example)) == {"0"}


def test_the_multi_gpu_profile_gives_each_gpu_service_its_own_device(services, env_example):
    assert len(gpu_budget(services, {**env_example, **read_env(MULTI_GPU_ENV)})) == 3


def test_the_multi_gpu_profile_only_overrides_known_variables(env_example):
    assert set(read_env(MULTI_GPU_ENV)) <= set(env_example)


def test_the_teacher_starts_after_the_student_has_taken_its_share(services):
    assert services["vllm-teacher"]["depends_on"]["vllm-student"]["condition"] == "service_healthy"


# ---- MLflow basic auth --------------------------------------------------------------------------------------------
def load_users_module():
    spec = importlib.util.spec_from_file_location("mlflow_users", INFRA / "mlflow" / "users.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_runs_the_basic_auth_launcher_of_the_image(services):
    assert command_argv(services["mlflow"])[0] == "/opt/shadow-distill/mlflow/serve.sh"


def test_the_image_carries_the_launcher_where_compose_runs_it():
    assert "COPY --chown=50000:0 infra/mlflow/ /opt/shadow-distill/mlflow/" in (INFRA / "Dockerfile").read_text()


def test_mlflow_gets_every_setting_its_launcher_requires(services):
    required = set(re.findall(r': "\$\{([A-Z_]+):\?', (INFRA / "mlflow" / "serve.sh").read_text()))
    assert required <= set(env_items(services["mlflow"])), sorted(required - set(env_items(services["mlflow"])))


def test_the_auth_database_is_a_database_postgres_init_creates(services):
    uri = env_items(services["mlflow"])["MLFLOW_AUTH_DATABASE_URI"]
    assert uri.rsplit("/", 1)[1] in " ".join(command_argv(services["postgres-init"]))


def test_the_users_job_runs_the_users_script_of_the_image(services):
    assert command_argv(services["mlflow-users"])[:2] == ["python", "/opt/shadow-distill/mlflow/users.py"]


def test_the_users_job_parses_with_its_own_parser(services, env_example):
    argv = [interpolate(a, env_example) for a in command_argv(services["mlflow-users"])]
    args = load_users_module().build_parser().parse_args(argv[2:])
    serving = [interpolate(a, env_example) for a in command_argv(services["serving"])]
    assert args.model_name == flag_value(serving, "--registry-model-name")


def test_the_users_job_reads_the_reviewers_from_its_secret(services):
    argv = command_argv(services["mlflow-users"])
    assert flag_value(argv, "--reviewers-file") == f"/run/secrets/{services['mlflow-users']['secrets'][0]}"


def test_the_users_job_runs_after_mlflow_is_healthy(services):
    assert services["mlflow-users"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def mlflow_logins(services) -> dict[str, str]:
    """service -> the ${VAR} it logs in to MLflow with."""
    return {n: env_items(s)["MLFLOW_TRACKING_USERNAME"] for n, s in services.items()
            if "MLFLOW_TRACKING_USERNAME" in env_items(s)}


def test_the_dag_tasks_log_in_as_the_pipeline_user(services):
    assert mlflow_logins(services)["airflow-scheduler"] == "${MLFLOW_PIPELINE_USERNAME}"


def test_serving_logs_in_as_the_read_only_serving_user(services):
    assert mlflow_logins(services)["serving"] == "${MLFLOW_SERVING_USERNAME}"


def test_only_the_users_job_logs_in_as_the_admin(services):
    assert [n for n, user in mlflow_logins(services).items() if user == "${MLFLOW_ADMIN_USERNAME}"] == ["mlflow-users"]


def test_the_nightly_experiment_is_the_nightly_configs_default(env_example):
    from nightly_train.config import NightlyConfig

    assert NightlyConfig.model_fields["experiment"].default == env_example["MLFLOW_NIGHTLY_EXPERIMENT"]
