"""The Kubernetes manifests (infra/k8s/), offline: the overlays rendered, every built-in object validated against
pinned Kubernetes schemas (kubernetes-validate), the Strimzi objects against their CRD schemas (when a copy of
the CRDs is at hand), every reference resolved, every `shadow-distill ...` command parsed by the project's own
CLI parser (the helper of test_infra.py) and the flags kept in step with the compose file.

    .venv/bin/python -m pytest tests/unit/test_k8s.py -q

The renderer below is deliberately small: kustomize's `resources`, `namespace`, `images` and `patches` (strategic
merge, containers merged by name, other lists replaced). Where a `kubectl` binary exists, its own kustomize
must produce the same objects.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from schemas.trajectory import DEAD_LETTER_TOPIC, DEFAULT_TOPIC
from test_infra import INFRA, SECRET_NAME, _parse, command_argv

ROOT = INFRA.parent
K8S = INFRA / "k8s"
OVERLAYS = ("cpu-dev", "gpu-prod")
KUBERNETES_VERSION = "1.33"
PROJECT_IMAGE = "shadow-distill"
STRIMZI_KINDS = {"Kafka": "040-Crd-kafka.yaml", "KafkaTopic": "043-Crd-kafkatopic.yaml",
                 "KafkaNodePool": "045-Crd-kafkanodepool.yaml"}
REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
SECRET_PLACEHOLDER = "from-a-secret"


# ---- a small kustomize ----------------------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def is_builtin(obj: dict) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def merge(base, patch, builtin: bool):
    """Strategic merge of `patch` into `base` (a copy): maps merge, null deletes, containers merge by name,
    every other list is replaced (what kustomize does for CRDs, and for the lists these patches touch)."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif builtin and key in ("containers", "initContainers") and isinstance(out.get(key), list):
            by_name = {c["name"]: c for c in out[key]}
            for item in value:
                by_name[item["name"]] = merge(by_name.get(item["name"], {}), item, builtin)
            out[key] = list(by_name.values())
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, builtin)
        else:
            out[key] = copy.deepcopy(value)
    return out


def pod_spec(obj: dict) -> dict | None:
    return (obj.get("spec") or {}).get("template", {}).get("spec")


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj) or {}
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def render(folder: Path) -> list[dict]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        objects += render(path) if path.is_dir() else load_docs(path)
    for entry in kustomization.get("patches", []):
        for patch in load_docs(folder / entry["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            hits = [i for i, o in enumerate(objects) if (o["kind"], o["metadata"]["name"]) == key]
            assert len(hits) == 1, f"{folder}: patch {entry['path']} matches {len(hits)} objects named {key}"
            objects[hits[0]] = merge(objects[hits[0]], patch, is_builtin(patch))
    for image in kustomization.get("images", []):
        for obj in objects:
            for c in containers(obj):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def objects(rendered, overlay) -> list[dict]:
    return rendered[overlay]


def find(objects: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if pod_spec(o) is not None]


# ---- rendering ------------------------------------------------------------------------------------------------
def test_every_overlay_renders_the_whole_platform(objects):
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    expected = {("Deployment", "serving"), ("Service", "serving"), ("HorizontalPodAutoscaler", "serving"),
                ("Deployment", "scorer"), ("Deployment", "vllm-student"), ("Deployment", "vllm-teacher"),
                ("Deployment", "mlflow"), ("Service", "mlflow"), ("Job", "feature-store-migrate"),
                ("Job", "mlflow-users"), ("Kafka", "shadow-distill"), ("KafkaNodePool", "dual-role"),
                ("KafkaTopic", "shadow-trajectories-v1"), ("KafkaTopic", "shadow-trajectories-dlq")}
    assert expected <= names, sorted(expected - names)


def test_names_are_unique_per_kind(objects):
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys))


def test_every_namespaced_object_is_in_the_namespace(objects):
    outside = [o["metadata"]["name"] for o in objects
               if o["kind"] != "Namespace" and o["metadata"].get("namespace") != "shadow-distill"]
    assert not outside


def test_no_secret_object_is_part_of_the_manifests(objects):
    assert not of_kind(objects, "Secret"), "Secrets are created by the operator, never committed"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl binary: kustomize comparison skipped")
def test_the_renderer_agrees_with_kubectl_kustomize(objects, overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert ours == theirs


# ---- schemas --------------------------------------------------------------------------------------------------
def test_every_built_in_object_validates_against_the_kubernetes_schemas(objects):
    import kubernetes_validate

    builtin = [o for o in objects if is_builtin(o)]
    assert builtin
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_validator_rejects_an_unknown_field():
    import kubernetes_validate

    bad = copy.deepcopy(find(render(K8S / "overlays" / "gpu-prod"), "Deployment", "serving"))
    bad["spec"]["template"]["spec"]["containers"][0]["argz"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def strimzi_crd_dir() -> Path | None:
    for candidate in (os.environ.get("SHADOW_DISTILL_STRIMZI_CRDS"), ROOT.parent / "shared/schemas/strimzi-1.2.0"):
        if candidate and all((Path(candidate) / f).exists() for f in STRIMZI_KINDS.values()):
            return Path(candidate)
    return None


def strict_crd_schema(schema):
    """The CRD schema with unknown fields rejected where the API server would reject them (strict field
    validation): every object with `properties` that neither preserves unknown fields nor sets
    additionalProperties gets additionalProperties: false."""
    if isinstance(schema, dict):
        out = {k: strict_crd_schema(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_crd_schema(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def strimzi_validators() -> dict:
    import jsonschema

    folder = strimzi_crd_dir()
    if folder is None:
        pytest.skip("Strimzi 1.2.0 CRDs not found: set SHADOW_DISTILL_STRIMZI_CRDS or place them in "
                    "../shared/schemas/strimzi-1.2.0 (infra/k8s/README.md)")
    validators = {}
    for kind, file in STRIMZI_KINDS.items():
        crd = yaml.safe_load((folder / file).read_text())
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = strict_crd_schema(version["schema"]["openAPIV3Schema"])
        # metadata is the API server's: only its type is part of the CRD schema.
        schema["properties"]["metadata"] = {"type": "object"}
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def test_strimzi_objects_validate_against_their_crds(objects, strimzi_validators):
    strimzi = [o for o in objects if o["apiVersion"].startswith("kafka.strimzi.io/")]
    assert {o["kind"] for o in strimzi} == set(STRIMZI_KINDS)
    for obj in strimzi:
        assert obj["apiVersion"] == "kafka.strimzi.io/v1", obj["metadata"]["name"]
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in strimzi_validators[obj["kind"]].iter_errors(obj)]
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"


def test_the_strimzi_validator_rejects_an_unknown_field(strimzi_validators):
    topic = copy.deepcopy(find(render(K8S / "base"), "KafkaTopic", "shadow-trajectories-v1"))
    topic["spec"]["partition"] = 3
    assert list(strimzi_validators["KafkaTopic"].iter_errors(topic))


# ---- Kafka ------------------------------------------------------------------------------------------------------
def test_kafka_is_three_kraft_nodes_each_controller_and_broker(objects):
    pools = of_kind(objects, "KafkaNodePool")
    assert sum(p["spec"]["replicas"] for p in pools if {"controller", "broker"} <= set(p["spec"]["roles"])) == 3


def test_every_node_pool_belongs_to_the_cluster(objects):
    assert {p["metadata"]["labels"]["strimzi.io/cluster"] for p in of_kind(objects, "KafkaNodePool")} == \
        {"shadow-distill"}


def test_kafka_replicates_three_ways_with_min_isr_two(objects):
    config = find(objects, "Kafka", "shadow-distill")["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == 3
    assert config["min.insync.replicas"] == 2
    assert config["offsets.topic.replication.factor"] == 3


def test_kafka_creates_no_topic_by_itself_and_never_elects_an_unclean_leader(objects):
    config = find(objects, "Kafka", "shadow-distill")["spec"]["kafka"]["config"]
    assert config["auto.create.topics.enable"] is False
    assert config["unclean.leader.election.enable"] is False


def test_the_topics_are_those_of_schemas_trajectory(objects):
    assert {t["spec"]["topicName"] for t in of_kind(objects, "KafkaTopic")} == {DEFAULT_TOPIC, DEAD_LETTER_TOPIC}


def test_every_topic_is_durable_and_has_a_retention(objects):
    for topic in of_kind(objects, "KafkaTopic"):
        spec = topic["spec"]
        assert spec["replicas"] == 3, topic["metadata"]["name"]
        assert spec["config"]["min.insync.replicas"] == 2, topic["metadata"]["name"]
        assert spec["config"]["retention.ms"] > 0, topic["metadata"]["name"]


def test_the_settings_name_the_same_topics(objects):
    data = find(objects, "ConfigMap", "shadow-distill-settings")["data"]
    assert (data["TRAJECTORY_TOPIC"], data["DLQ_TOPIC"]) == (DEFAULT_TOPIC, DEAD_LETTER_TOPIC)


def test_the_scorer_has_no_more_replicas_than_the_topic_has_partitions(objects):
    topic = next(t for t in of_kind(objects, "KafkaTopic") if t["spec"]["topicName"] == DEFAULT_TOPIC)
    assert find(objects, "Deployment", "scorer")["spec"]["replicas"] <= topic["spec"]["partitions"]


def test_the_bootstrap_address_is_the_one_strimzi_creates(objects):
    data = find(objects, "ConfigMap", "shadow-distill-settings")["data"]
    assert data["KAFKA_BOOTSTRAP"] == "shadow-distill-kafka-bootstrap:9092"


# ---- references -----------------------------------------------------------------------------------------------
def documented_secrets() -> dict[str, set[str]]:
    """The external Secrets table of infra/k8s/README.md: name -> keys."""
    out = {}
    for m in re.finditer(r"^\| `(shadow-distill-[a-z0-9-]+)` \| ([^|]+) \|", (K8S / "README.md").read_text(), re.M):
        out[m.group(1)] = set(re.findall(r"`([^`]+)`", m.group(2)))
    return out


def secret_refs(obj) -> list[tuple[str, str | None]]:
    """(secret name, key or None) for every Secret an object references."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                found.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
                items = node["secret"].get("items") or [{"key": None}]
                found.extend((node["secret"]["secretName"], i["key"]) for i in items)
            if "secretRef" in node:
                found.append((node["secretRef"]["name"], None))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(obj)
    return found


def test_the_readme_documents_the_secrets():
    assert "shadow-distill-postgres" in documented_secrets()


def test_every_secret_reference_is_a_documented_external_secret_and_key(objects):
    documented = documented_secrets()
    for obj in objects:
        for name, key in secret_refs(obj):
            assert name in documented, f"{obj['metadata']['name']}: Secret {name} is not in infra/k8s/README.md"
            assert key is None or key in documented[name], f"{obj['metadata']['name']}: {name} has no key {key}"


def test_every_configmap_reference_exists(objects):
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objects, "ConfigMap")}
    for obj in workloads(objects):
        for c in containers(obj):
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in maps, obj["metadata"]["name"]
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in maps.get(ref["name"], {}), f"{obj['metadata']['name']}: {ref}"


def test_every_volume_claim_exists(objects):
    claims = {o["metadata"]["name"] for o in of_kind(objects, "PersistentVolumeClaim")}
    for obj in workloads(objects):
        for volume in pod_spec(obj).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, obj["metadata"]["name"]


def test_every_volume_mount_names_a_volume(objects):
    for obj in workloads(objects):
        volumes = {v["name"] for v in pod_spec(obj).get("volumes", [])}
        for c in containers(obj):
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, obj["metadata"]["name"]


def services_and_strimzi_hosts(objects) -> set[str]:
    hosts = {s["metadata"]["name"] for s in of_kind(objects, "Service")}
    return hosts | {f"{k['metadata']['name']}-kafka-bootstrap" for k in of_kind(objects, "Kafka")}


def expanded(obj: dict, container: dict, objects: list[dict]) -> list[str]:
    """The container's command + args with $(VAR) expanded the way the kubelet does (env and envFrom), secrets
    replaced by a placeholder; fails on a reference that nothing defines."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(find(objects, "ConfigMap", src["configMapRef"]["name"]).get("data", {}))
    for item in container.get("env", []):
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            env[item["name"]] = SECRET_PLACEHOLDER
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[item["name"]] = find(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            env[item["name"]] = REF.sub(lambda m: env.get(m.group(1), m.group(0)), str(item.get("value", "")))

    def one(text: str) -> str:
        missing = [m.group(1) for m in REF.finditer(text) if m.group(1) not in env]
        assert not missing, f"{obj['metadata']['name']}: $({missing[0]}) is defined by nothing in its environment"
        return REF.sub(lambda m: env[m.group(1)], text)

    return [one(a) for a in list(container.get("command") or []) + list(container.get("args") or [])]


def test_every_variable_reference_resolves(objects):
    for obj in workloads(objects):
        for c in containers(obj):
            assert expanded(obj, c, objects) is not None


def test_every_url_in_a_command_names_a_service_of_the_platform(objects):
    hosts = services_and_strimzi_hosts(objects)
    for obj in workloads(objects):
        for c in containers(obj):
            for arg in expanded(obj, c, objects):
                for host in re.findall(r"https?://([^/:@\s]+)", arg):
                    assert host in hosts, f"{obj['metadata']['name']}: {host} is not a Service here"


def test_the_settings_name_services_of_the_platform(objects):
    data = find(objects, "ConfigMap", "shadow-distill-settings")["data"]
    hosts = services_and_strimzi_hosts(objects)
    assert data["KAFKA_BOOTSTRAP"].split(":")[0] in hosts
    assert re.match(r"https?://([^:/]+)", data["MLFLOW_TRACKING_URI"])[1] in hosts


def test_every_service_selects_a_workload(objects):
    templates = [w["spec"]["template"]["metadata"].get("labels", {}) for w in workloads(objects)]
    for svc in of_kind(objects, "Service"):
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), svc["metadata"]["name"]


def test_every_service_port_targets_a_named_container_port(objects):
    for svc in of_kind(objects, "Service"):
        pods = [w for w in workloads(objects)
                if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        names = {p["name"] for w in pods for c in containers(w) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names, svc["metadata"]["name"]


def test_every_deployment_selector_matches_its_pods(objects):
    for dep in of_kind(objects, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), dep["metadata"]["name"]


# ---- secrets ----------------------------------------------------------------------------------------------------
def test_no_secret_is_written_as_a_literal(objects):
    for obj in workloads(objects):
        for c in containers(obj):
            for item in c.get("env", []):
                if SECRET_NAME.search(item["name"]) and not item["name"].endswith("_URI"):
                    assert "secretKeyRef" in (item.get("valueFrom") or {}), \
                        f"{obj['metadata']['name']}: {item['name']} must come from a secretKeyRef"


def test_every_password_in_a_url_comes_from_a_secret(objects):
    for obj in workloads(objects):
        for c in containers(obj):
            secret_vars = {e["name"] for e in c.get("env", []) if "secretKeyRef" in (e.get("valueFrom") or {})}
            texts = list(c.get("args") or []) + [str(e.get("value", "")) for e in c.get("env", [])]
            for text in texts:
                for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", text):
                    assert REF.fullmatch(password) and REF.fullmatch(password)[1] in secret_vars, \
                        f"{obj['metadata']['name']}: a URL carries a password that is not a Secret reference"


# ---- the project's own commands -------------------------------------------------------------------------------
def shadow_distill_commands(objects) -> dict[str, list[str]]:
    out = {}
    for obj in workloads(objects):
        for c in containers(obj):
            argv = expanded(obj, c, objects)
            if argv[:1] == ["shadow-distill"]:
                out[obj["metadata"]["name"]] = argv
    return out


def test_every_shadow_distill_command_parses_and_validates(objects, overlay):
    from foundation.flags import model_from_args
    from serving.config import ServingConfig
    from shadow_scoring.config import ScoringConfig

    commands = shadow_distill_commands(objects)
    assert {"serving", "scorer", "feature-store-migrate"} <= set(commands), sorted(commands)
    for name, argv in commands.items():
        args = _parse(f"{overlay}/{name}", argv[1:])
        if args.command == "serve":
            cfg = model_from_args(ServingConfig, args)
            assert cfg.kafka_topic == DEFAULT_TOPIC
            assert cfg.follows_champion
        elif args.command == "score" and args.action == "run":
            cfg = model_from_args(ScoringConfig, args)
            assert (cfg.topic, cfg.dlq_topic) == (DEFAULT_TOPIC, DEAD_LETTER_TOPIC)
            assert cfg.metrics_port is not None


def test_the_migration_job_migrates_the_feature_store(objects):
    argv = shadow_distill_commands(objects)["feature-store-migrate"]
    assert argv[1:3] == ["store", "migrate"]


def test_gpu_prod_serving_is_the_vllm_gateway(rendered):
    from foundation.flags import model_from_args
    from serving.config import ServingConfig

    argv = shadow_distill_commands(rendered["gpu-prod"])["serving"]
    cfg = model_from_args(ServingConfig, _parse("gpu-prod/serving", argv[1:]))
    assert cfg.engine == "vllm"
    assert cfg.vllm_url == "http://vllm-student:8000"


def test_gpu_prod_scorer_scores_with_the_vllm_teacher(rendered):
    from foundation.flags import model_from_args
    from shadow_scoring.config import ScoringConfig

    argv = shadow_distill_commands(rendered["gpu-prod"])["scorer"]
    cfg = model_from_args(ScoringConfig, _parse("gpu-prod/scorer", argv[1:]))
    assert cfg.teacher == "http://vllm-teacher:8000"


def test_cpu_dev_runs_both_models_in_process(rendered):
    commands = shadow_distill_commands(rendered["cpu-dev"])
    engine = commands["serving"][commands["serving"].index("--engine") + 1]
    teacher = commands["scorer"][commands["scorer"].index("--teacher") + 1]
    assert engine == "embedded"
    assert teacher.startswith("/models/")


def flags(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("--")}


@pytest.fixture(scope="module")
def compose_services() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]


@pytest.mark.parametrize("name", ["vllm-student", "vllm-teacher"])
def test_the_vllm_servers_take_the_flags_of_the_compose_file(rendered, compose_services, name):
    container = containers(find(rendered["gpu-prod"], "Deployment", name))[0]
    assert flags(container["args"]) == flags(command_argv(compose_services[name]))


@pytest.mark.parametrize("name", ["serving", "scorer"])
def test_gpu_prod_serving_and_scorer_take_the_flags_of_the_compose_file(rendered, compose_services, name):
    argv = shadow_distill_commands(rendered["gpu-prod"])[name]
    assert flags(argv) == flags(command_argv(compose_services[name])), \
        f"{name}: keep infra/k8s/base/{name}.yaml's args in step with infra/docker-compose.yml"


def test_the_student_vllm_enables_runtime_lora(rendered):
    container = containers(find(rendered["gpu-prod"], "Deployment", "vllm-student"))[0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert container["args"][container["args"].index("--max-lora-rank") + 1] == "16"


# ---- GPUs and scaling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vllm-student", "vllm-teacher"])
def test_each_vllm_pod_takes_one_gpu_on_a_gpu_node(objects, name):
    dep = find(objects, "Deployment", name)
    container = containers(dep)[0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(dep)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_the_student_vllm_never_runs_more_than_one_replica(objects):
    assert find(objects, "Deployment", "vllm-student")["spec"]["replicas"] <= 1


def test_gpu_prod_runs_both_vllm_servers(rendered):
    assert [find(rendered["gpu-prod"], "Deployment", n)["spec"]["replicas"] for n in ("vllm-student", "vllm-teacher")] \
        == [1, 1]


def test_no_pod_outside_vllm_requests_a_gpu(objects):
    for obj in workloads(objects):
        if not obj["metadata"]["name"].startswith("vllm-"):
            for c in containers(obj):
                assert "nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {}), obj["metadata"]["name"]


def test_the_hpa_scales_serving_on_a_pods_metric(objects):
    hpa = find(objects, "HorizontalPodAutoscaler", "serving")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "serving"
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]


def test_the_hpa_metric_is_the_one_prometheus_adapter_serves(objects):
    rule = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())["rules"]["custom"][0]
    metric = find(objects, "HorizontalPodAutoscaler", "serving")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == rule["name"]["as"]


def test_the_adapter_rule_reads_the_counter_serving_exports():
    from serving.metrics import ServingMetrics

    rule = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())["rules"]["custom"][0]
    series = re.match(r"([a-z_]+)\{", rule["seriesQuery"])[1]
    metrics = ServingMetrics()
    metrics.observe_request("/v1/chat/completions", 200, 0.1)
    assert f'{series}{{route="/v1/chat/completions"' in metrics.render().decode()


def test_the_hpa_never_goes_below_the_disruption_budget(objects):
    hpa = find(objects, "HorizontalPodAutoscaler", "serving")
    assert hpa["spec"]["minReplicas"] >= find(objects, "PodDisruptionBudget", "serving")["spec"]["minAvailable"]


# ---- pods ---------------------------------------------------------------------------------------------------------
def project_workloads(objects) -> list[dict]:
    return [o for o in workloads(objects) if any(PROJECT_IMAGE in c["image"] for c in containers(o))]


def test_overlays_set_the_project_image_variant(rendered):
    images = {name: {c["image"] for o in project_workloads(objs) for c in containers(o)}
              for name, objs in rendered.items()}
    assert images == {"cpu-dev": {"registry.example.com/shadow-distill:0.1.0-cpu"},
                      "gpu-prod": {"registry.example.com/shadow-distill:0.1.0-cuda"}}


def dockerfile_user() -> str:
    return re.findall(r"^USER\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M)[-1]


def test_project_pods_run_as_the_images_non_root_user(objects):
    uid = int(dockerfile_user().split(":")[0])
    for obj in project_workloads(objects):
        ctx = pod_spec(obj)["securityContext"]
        assert ctx["runAsNonRoot"] is True, obj["metadata"]["name"]
        assert ctx["runAsUser"] == uid, obj["metadata"]["name"]


def test_project_containers_cannot_escalate(objects):
    for obj in project_workloads(objects):
        for c in containers(obj):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, obj["metadata"]["name"]


def mounts(obj: dict) -> dict[str, str]:
    """volume claim -> mount path, for the first container."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod_spec(obj).get("volumes", []) if "persistentVolumeClaim" in v}
    return {claims[m["name"]]: m["mountPath"] for m in containers(obj)[0].get("volumeMounts", []) if m["name"] in claims}


def test_serving_and_vllm_see_the_adapters_at_the_same_path(rendered):
    objs = rendered["gpu-prod"]
    argv = shadow_distill_commands(objs)["serving"]
    root = argv[argv.index("--adapters-root") + 1]
    paths = {mounts(find(objs, "Deployment", n))["shadow-distill-adapters"] for n in ("serving", "vllm-student")}
    assert paths == {root}


# ---- MLflow --------------------------------------------------------------------------------------------------------
def test_mlflow_runs_the_basic_auth_launcher(objects):
    container = containers(find(objects, "Deployment", "mlflow"))[0]
    assert container["command"] == ["/opt/shadow-distill/mlflow/serve.sh"]


def test_the_launcher_runs_mlflows_basic_auth_app():
    assert 'exec mlflow server --app-name basic-auth "$@"' in (INFRA / "mlflow/serve.sh").read_text()


def test_the_users_job_parses_with_its_own_parser(objects):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlflow_users", INFRA / "mlflow/users.py")
    users = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(users)
    job = find(objects, "Job", "mlflow-users")
    argv = expanded(job, containers(job)[0], objects)
    args = users.build_parser().parse_args(argv[2:])
    settings = find(objects, "ConfigMap", "shadow-distill-settings")["data"]
    assert args.model_name == settings["REGISTERED_MODEL_NAME"]
    assert args.experiment == settings["MLFLOW_NIGHTLY_EXPERIMENT"]


def mlflow_login(obj: dict) -> str | None:
    """Which key of the shadow-distill-mlflow Secret a workload logs in to MLflow with."""
    for c in containers(obj):
        for e in c.get("env", []):
            if e["name"] == "MLFLOW_TRACKING_USERNAME":
                return e["valueFrom"]["secretKeyRef"]["key"]
    return None


def test_serving_logs_in_as_the_read_only_serving_user(objects):
    assert mlflow_login(find(objects, "Deployment", "serving")) == "serving-username"


def test_only_the_users_job_holds_the_mlflow_admin_login(objects):
    assert [o["metadata"]["name"] for o in workloads(objects) if mlflow_login(o) == "admin-username"] == \
        ["mlflow-users"]


# ---- Airflow (official chart values) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow_values() -> dict:
    return yaml.safe_load((K8S / "airflow/values.yaml").read_text())


def test_airflow_uses_a_distributed_executor(airflow_values):
    assert airflow_values["executor"] in ("KubernetesExecutor", "CeleryExecutor")


def test_airflow_runs_the_version_pyproject_pins(airflow_values):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"apache-airflow=={airflow_values['airflowVersion']}" in deps


def test_airflow_runs_the_gpu_prod_project_image(airflow_values):
    image = next(i for i in yaml.safe_load((K8S / "overlays/gpu-prod/kustomization.yaml").read_text())["images"]
                 if i["name"] == PROJECT_IMAGE)
    airflow = airflow_values["images"]["airflow"]
    assert f"{airflow['repository']}:{airflow['tag']}" == f"{image['newName']}:{image['newTag']}"


def test_the_cpu_dev_airflow_values_run_the_cpu_dev_image():
    values = yaml.safe_load((K8S / "airflow/values-cpu-dev.yaml").read_text())
    image = next(i for i in yaml.safe_load((K8S / "overlays/cpu-dev/kustomization.yaml").read_text())["images"]
                 if i["name"] == PROJECT_IMAGE)
    assert values["images"]["airflow"]["tag"] == image["newTag"]


def test_the_cpu_dev_airflow_tasks_ask_for_no_gpu():
    values = yaml.safe_load((K8S / "airflow/values-cpu-dev.yaml").read_text())
    env = {e["name"]: e.get("value") for e in yaml.safe_load(values["extraEnv"])}
    assert env["SHADOW_DISTILL_TRAIN_GPUS"] == "0"


def test_airflow_reads_the_dags_baked_into_the_image(airflow_values):
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"dags/ {airflow_values['config']['core']['dags_folder']}/" in dockerfile


def test_the_nightly_config_env_names_a_file_of_a_mounted_secret(airflow_values):
    path = next(e["value"] for e in airflow_values["env"] if e["name"] == "SHADOW_DISTILL_NIGHTLY_CONFIG")
    workers = airflow_values["workers"]
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in workers["extraVolumes"] if "secret" in v}
    mounted = {m["mountPath"]: secret_volumes[m["name"]] for m in workers["extraVolumeMounts"]
               if m["name"] in secret_volumes}
    secret = mounted[str(Path(path).parent)]
    assert Path(path).name in documented_secrets()[secret]


def test_airflow_task_pods_log_in_to_mlflow_as_the_pipeline(airflow_values):
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in airflow_values["workers"]["env"]}
    assert keys == {"MLFLOW_TRACKING_USERNAME": "pipeline-username", "MLFLOW_TRACKING_PASSWORD": "pipeline-password"}


def test_airflow_task_pods_take_no_gpu_by_default(airflow_values):
    assert "nvidia.com/gpu" not in airflow_values["workers"]["resources"]["limits"]


def test_the_train_task_gets_its_gpus_from_the_dags_pod_override(airflow_values):
    env = {e["name"]: e.get("value") for e in yaml.safe_load(airflow_values["extraEnv"])}
    assert env["SHADOW_DISTILL_TRAIN_GPUS"] == "1"


def test_airflow_uses_the_external_postgresql(airflow_values):
    assert airflow_values["postgresql"]["enabled"] is False
    assert airflow_values["data"]["metadataSecretName"] in documented_secrets()


def test_every_airflow_secret_and_claim_is_known(airflow_values):
    documented = documented_secrets()
    claims = {o["metadata"]["name"] for o in of_kind(render(K8S / "base"), "PersistentVolumeClaim")}
    for name, _ in secret_refs(airflow_values):
        assert name in documented, name
    for name in (airflow_values["data"]["metadataSecretName"], airflow_values["fernetKeySecretName"]):
        assert name in documented, name
    for volume in airflow_values["workers"]["extraVolumes"]:
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_the_airflow_values_hold_no_literal_secret(airflow_values):
    text = json.dumps(airflow_values)
    assert not re.search(r'"(password|fernetKey|webserverSecretKey|apiSecretKey|jwtSecret|connection)": "', text)


def test_airflow_values_validate_against_the_charts_schema(airflow_values):
    import jsonschema

    path = os.environ.get("SHADOW_DISTILL_AIRFLOW_CHART_SCHEMA")
    if not path or not Path(path).exists():
        pytest.skip("set SHADOW_DISTILL_AIRFLOW_CHART_SCHEMA to the chart's values.schema.json to validate")
    jsonschema.validate(airflow_values, json.loads(Path(path).read_text()))
