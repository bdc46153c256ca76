"""Lint of the production manifests (no Docker engine runs in CI): structure, secrets, Kafka durability, and
every `shadow-distill ...` command parsed by the project's own CLI parser and validated by its config model
(the compose file's and docs/runbook.md's).

    .venv/bin/python -m pytest tests/unit/test_infra.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from schemas.trajectory import DEAD_LETTER_TOPIC, DEFAULT_TOPIC

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
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


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example line without '=': {line!r}"
            out[name.strip()] = value.strip()
    return out


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
