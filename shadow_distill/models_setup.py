"""Resolve the teacher and student folders a run uses: the real pair (prepared once, offline) or a tiny one.

The student is the teacher minus `n_drop` decoder layers chosen by the sensitivity check (cached beside the
teacher as `sensitivity.json`), or minus an explicit list.
"""

from __future__ import annotations

import json
from pathlib import Path

from foundation.errors import ConfigError


def prepare_layers(teacher_dir: Path, spec: str, n_drop: int, verbose: bool = False) -> list[int]:
    """Explicit layers ("17,18") or the sensitivity check's choice ("auto"), cached beside the teacher."""
    if spec != "auto":
        try:
            return sorted(int(x) for x in spec.split(","))
        except ValueError as exc:
            raise ConfigError(f"--drop-layers {spec!r}: expected 'auto' or a list like 17,18") from exc
    cache = teacher_dir / "sensitivity.json"
    if cache.exists() and not verbose:
        rows = json.loads(cache.read_text())["rows"]
    else:
        from model_runtime.models import load_model, load_tokenizer
        from model_runtime.pruning import layer_sensitivity

        base, found = layer_sensitivity(load_model(teacher_dir), load_tokenizer(teacher_dir))
        rows = [{"layer": r.layer, "nll": r.nll} for r in found]
        cache.write_text(json.dumps({"teacher_nll": base, "rows": rows}, indent=1))
        if verbose:
            print(f"teacher NLL on its own samples: {base:.3f}")
            for r in sorted(rows, key=lambda r: r["nll"]):
                print(f"  drop layer {r['layer']:>2}: NLL {r['nll']:.3f}")
    from model_runtime.pruning import LayerSensitivity, choose_layers

    return choose_layers([LayerSensitivity(r["layer"], r["nll"]) for r in rows], n_drop)


def resolve_models(*, tiny: bool, workdir: Path, drop_layers: str = "auto", n_drop: int = 2) -> tuple[Path, Path]:
    """(teacher_dir, student_dir). Tiny models are built inside `workdir`; real ones under the models home."""
    if tiny:
        from model_runtime.tiny import build_tiny_pair

        folder = Path(workdir) / "tiny-models"
        if (folder / "student" / "shadow_distill.json").exists():
            return folder / "teacher", folder / "student"
        return build_tiny_pair(folder)
    from model_runtime.models import build_student, ensure_teacher

    teacher_dir = ensure_teacher()
    return teacher_dir, build_student(teacher_dir, prepare_layers(teacher_dir, drop_layers, n_drop))
