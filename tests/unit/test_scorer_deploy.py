"""The scorer as deployed (infra/docker-compose.yml) and as the local stack starts it (shadow_distill/stack.py):
it stores the teacher's top-k, and it is told the student's tokenizer so a mismatched teacher is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from foundation.flags import model_from_args
from shadow_scoring.config import ScoringConfig

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _env() -> dict[str, str]:
    out = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def _interpolate(text: str, env: dict[str, str]) -> str:
    for name, value in env.items():
        text = text.replace("${" + name + "}", value)
    return text


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]


@pytest.fixture(scope="module")
def compose_scorer(services) -> ScoringConfig:
    from shadow_distill.cli import build_parser

    argv = [_interpolate(a, _env()) for a in services["scorer"]["command"][1:]]
    return model_from_args(ScoringConfig, build_parser().parse_args(argv))


def test_the_compose_scorer_stores_top_k(compose_scorer):
    assert compose_scorer.topk == 20


def test_the_compose_teacher_serves_as_many_logprobs_as_the_scorer_asks(services, compose_scorer):
    teacher = [_interpolate(a, _env()) for a in services["vllm-teacher"]["command"]]
    assert int(teacher[teacher.index("--max-logprobs") + 1]) >= compose_scorer.topk


def test_the_compose_scorer_is_told_both_tokenizers(compose_scorer):
    env = _env()
    assert (compose_scorer.teacher_tokenizer, compose_scorer.student_tokenizer) == (
        env["TEACHER_MODEL_DIR"], env["STUDENT_MODEL_DIR"])


def test_the_compose_scorer_mounts_the_model_folders(services, compose_scorer):
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["scorer"].get("volumes", [])}
    for folder in (compose_scorer.teacher_tokenizer, compose_scorer.student_tokenizer):
        assert any(folder.startswith(target + "/") and source == "models" for target, source in mounts.items())


class _RecordingSupervisor:
    def __init__(self):
        self.cmd: list[str] = []

    def start(self, name, cmd, **kw):
        self.cmd = cmd


def test_the_local_stack_starts_the_scorer_with_the_students_tokenizer_and_top_k(tmp_path):
    from shadow_distill import stack
    from shadow_distill.cli import build_parser

    sup = _RecordingSupervisor()
    stack.start_scorer(sup, "127.0.0.1:9092", "sqlite:///s.db", tmp_path / "teacher", tmp_path / "student")
    cfg = model_from_args(ScoringConfig, build_parser().parse_args(sup.cmd[1:]))
    assert (cfg.student_tokenizer, cfg.topk) == (str(tmp_path / "student"), 20)
