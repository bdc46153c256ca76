"""Model identity is content, never a name: a rebuilt base or another adapter is another model; a copy is not."""

from __future__ import annotations

import json
import shutil

import pytest

from model_runtime.adapters import random_adapter
from model_runtime.tiny import build_tiny_pair
from nightly_train.identity import adapter_sha256, base_sha256, model_identity


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    _, student_dir = tiny_models
    root = tmp_path_factory.mktemp("adapters")
    return random_adapter(student_dir, root / "a1", seed=1), random_adapter(student_dir, root / "a2", seed=2)


def test_the_same_weights_give_the_same_identity(tiny_models, adapters):
    _, student_dir = tiny_models
    assert model_identity(student_dir, adapters[0]) == model_identity(student_dir, adapters[0])


def test_a_copied_adapter_keeps_its_identity(tiny_models, adapters, tmp_path):
    copy = shutil.copytree(adapters[0], tmp_path / "downloaded-v3")  # what the registry download gives back
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/elsewhere/student"  # where it came from is not what it computes
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapter_sha256(copy) == adapter_sha256(adapters[0])


def test_another_adapter_is_another_model(adapters):
    assert adapter_sha256(adapters[0]) != adapter_sha256(adapters[1])


def test_a_rescaled_adapter_with_the_same_tensors_is_another_model(adapters, tmp_path):
    copy = shutil.copytree(adapters[0], tmp_path / "rescaled")
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 2 * cfg["lora_alpha"]
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapter_sha256(copy) != adapter_sha256(adapters[0])


def test_a_rebuilt_base_under_the_same_id_is_another_model(tiny_models, tmp_path):
    _, student_dir = tiny_models
    _, rebuilt = build_tiny_pair(tmp_path / "rebuilt", seed=1)  # same model id, other random weights
    before, after = model_identity(student_dir, None), model_identity(rebuilt, None)
    assert before.base_model_id == after.base_model_id
    assert before.base_sha256 != after.base_sha256
    assert before.key != after.key


def test_the_key_names_base_and_adapter(tiny_models, adapters):
    _, student_dir = tiny_models
    ident = model_identity(student_dir, adapters[0])
    assert ident.key == f"{ident.base_model_id}@{base_sha256(student_dir)[:12]}+adapter:{ident.adapter_sha256[:12]}"
    assert model_identity(student_dir, None).key.endswith("+no-adapter")
    assert model_identity(student_dir, None).to_dict()["adapter_sha256"] is None
