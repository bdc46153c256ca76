"""The nightly file is one typed tree, validated when it loads: a bad value anywhere names its field at once."""

from __future__ import annotations

import json

import pytest

from foundation.errors import ConfigError
from nightly_train.config import NightlyConfig, TrainConfig, TrainSettings
from nightly_train.gate import GatePolicy
from nightly_train.layout import RunLayout, interval_key


def _write(tmp_path, **overrides) -> str:
    cfg = {"store_url": "sqlite:///s.db", "mlflow_tracking_uri": "sqlite:///m.db", "student_dir": "s",
           "teacher_dir": "t", "teacher_id": "teacher", "runs_dir": str(tmp_path / "runs"), **overrides}
    path = tmp_path / "nightly.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_train_section_is_typed_when_the_file_loads(tmp_path):
    cfg = NightlyConfig.from_json_file(_write(tmp_path, train={"learning_rate": 3e-4, "lora": {"rank": 8}}))
    assert isinstance(cfg.train, TrainSettings)
    assert cfg.train.lora.rank == 8


def test_a_bad_train_value_fails_at_load_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lora\.rank: .*\(got 0\)"):
        NightlyConfig.from_json_file(_write(tmp_path, train={"lora": {"rank": 0}}))


def test_an_unknown_train_key_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rte"):
        NightlyConfig.from_json_file(_write(tmp_path, train={"learning_rte": 1e-4}))


def test_a_bad_gate_value_fails_at_load_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"gate\.alpha: .*\(got 1\.5\)"):
        NightlyConfig.from_json_file(_write(tmp_path, gate={"alpha": 1.5}))


def test_the_gate_section_is_the_gate_policy(tmp_path):
    cfg = NightlyConfig.from_json_file(_write(tmp_path, gate={"min_prompts": 8}))
    assert cfg.gate == GatePolicy(min_prompts=8)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        NightlyConfig.from_json_file(tmp_path / "nope.json")


def test_train_config_for_a_run_keeps_the_settings(tmp_path):
    settings = TrainSettings(batch_size=3, epochs=2)
    run = TrainConfig.for_run(settings, student_dir=tmp_path, teacher_id="t", output_dir=tmp_path / "out")
    assert run.batch_size == 3
    assert run.epochs == 2
    assert run.output_dir == tmp_path / "out"


def test_run_layout_names_every_path_of_a_night(tmp_path):
    from datetime import UTC, datetime

    start, end = datetime(2026, 11, 24, 2, tzinfo=UTC), datetime(2026, 11, 25, 2, tzinfo=UTC)
    layout = RunLayout.for_window(tmp_path, start, end)
    assert interval_key(start, end) == "20261124T020000Z-20261125T020000Z"
    assert layout.adapter_dir == tmp_path / "20261124T020000Z-20261125T020000Z" / "train" / "adapter"
    assert layout.champion_dir("3") == layout.root / "champion-v3"
    assert layout.evaluation_file("abc") == layout.root / "evaluation-abc.json"
    assert layout.ifeval_cache_dir == tmp_path / "ifeval-cache"


def test_the_eval_section_sets_the_samples_per_held_out_prompt(tmp_path):
    cfg = NightlyConfig.from_json_file(_write(tmp_path, eval={"kl_samples_per_prompt": 2}))
    assert cfg.eval.kl_samples_per_prompt == 2


def test_too_few_kl_prompts_for_the_gates_alpha_fail_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.kl_prompts=4 can never pass .* use at least 5"):
        NightlyConfig.from_json_file(_write(tmp_path, eval={"kl_prompts": 4}))
    lenient = NightlyConfig.from_json_file(_write(tmp_path, eval={"kl_prompts": 4}, gate={"alpha": 0.1}))
    assert lenient.eval.kl_prompts == 4
