"""The nightly config file the local stack and the demo write (`nightly.json`): one place for their defaults.

    cfg_path = write_nightly_config(folder, store_url, mlflow_uri, teacher_dir, student_dir, tiny=True)
    NightlyConfig.from_json_file(cfg_path)
"""

from __future__ import annotations

import json
from pathlib import Path


def write_nightly_config(folder: Path, store_url: str, mlflow_uri: str, teacher_dir: Path, student_dir: Path, *,
                         tiny: bool, train: dict | None = None, eval_overrides: dict | None = None) -> Path:
    from model_runtime.models import ModelMeta

    small = {"ifeval_subset": 8, "ifeval_max_tokens": 16, "kl_prompts": 4, "kl_max_tokens": 8}
    tiny_train = {"max_steps": 6, "epochs": 3, "batch_size": 4, "learning_rate": 1e-2, "lora": {"rank": 4, "alpha": 8}}
    cfg = {
        "store_url": store_url, "mlflow_tracking_uri": mlflow_uri, "student_dir": str(student_dir),
        "teacher_dir": str(teacher_dir), "teacher_id": ModelMeta.read(teacher_dir).model_id,
        "runs_dir": str((folder / "nightly").resolve()), "min_trajectories": 4, "coverage_threshold": 1.0,
        "heldout_percent": 20,
        # One local serving process whose traffic the caller controls: the log is seen past a window's end a few
        # seconds after it (production keeps the default lateness, which covers a spool replaying late).
        "allowed_lateness_s": 3.0,
        "train": {**(tiny_train if tiny else {}), **(train or {})},
        "eval": {**(small if tiny else {}), **(eval_overrides or {})},
        # Tiny random models give a KL meter far noisier than SmolLM2's at 4 prompts: the smoke test checks the
        # loop's mechanics, so its KL rule tolerates noise (kl_margin); the real demo keeps the strict default.
        "gate": {"min_prompts": 8, "kl_margin": 5.0} if tiny else {},
    }
    path = folder / "nightly.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path
