"""The nightly config file the local stack and the demo write (`nightly.json`): one place for their defaults.

    cfg_path = write_nightly_config(folder, store_url, mlflow_uri, teacher_dir, student_dir, tiny=True)
    NightlyConfig.from_json_file(cfg_path)

The real (SmolLM2, CPU) settings keep evaluation affordable: IFEval on the project's 240 prompts, greedy, 64 tokens
(about 2 minutes per model on 2 cores, extrapolated from ~100 s measured at 200 prompts; once per model, as results
are cached by model identity), and 2 samples per held-out prompt for the paired KL tests. The gate keeps its
defaults (`GatePolicy`). A caller's `eval_overrides` win: an `ifeval_subset` of 20 cannot show non-inferiority.

The tiny settings (random models, for the smoke tests) check the loop's mechanics, not quality: a tiny night holds
out 6 prompts (the sign-flip tests need at least 5 at alpha 0.05) and its rules tolerate noise by wide margins, so a
normal tiny night registers a candidate; a strict gate (kl_ratio 1e-6, kl_margin 0) still fails its KL rule.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_EVAL = {"ifeval_subset": 16, "ifeval_max_tokens": 16, "kl_prompts": 8, "kl_samples_per_prompt": 2,
             "kl_max_tokens": 8}
TINY_GATE = {"min_prompts": 8, "ifeval_margin": 0.9, "kl_margin": 5.0, "forward_kl_margin": 5.0,
             "distinct_2_margin": 1.0}
REAL_EVAL = {"ifeval_max_tokens": 64, "kl_samples_per_prompt": 2}


def write_nightly_config(folder: Path, store_url: str, mlflow_uri: str, teacher_dir: Path, student_dir: Path, *,
                         tiny: bool, train: dict | None = None, eval_overrides: dict | None = None) -> Path:
    from model_runtime.models import ModelMeta

    tiny_train = {"max_steps": 6, "epochs": 3, "batch_size": 4, "learning_rate": 1e-2, "lora": {"rank": 4, "alpha": 8}}
    cfg = {
        "store_url": store_url, "mlflow_tracking_uri": mlflow_uri, "student_dir": str(student_dir),
        "teacher_dir": str(teacher_dir), "teacher_id": ModelMeta.read(teacher_dir).model_id,
        "runs_dir": str((folder / "nightly").resolve()), "min_trajectories": 4, "coverage_threshold": 1.0,
        "heldout_percent": 20, **({"min_heldout": 6} if tiny else {}),
        # One local serving process whose traffic the caller controls: the log is seen past a window's end a few
        # seconds after it (production keeps the default lateness, which covers a spool replaying late).
        "allowed_lateness_s": 3.0,
        "train": {**(tiny_train if tiny else {}), **(train or {})},
        "eval": {**(TINY_EVAL if tiny else REAL_EVAL), **(eval_overrides or {})},
        "gate": TINY_GATE if tiny else {},
    }
    path = folder / "nightly.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path
