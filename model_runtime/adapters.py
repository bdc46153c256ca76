"""LoRA adapters (peft): create, save, check and attach, safetensors only.

An adapter folder holds exactly `adapter_config.json`, `adapter_model.safetensors` and `ADAPTER_META` (the
`model_id` of the base it was trained on and its rank). Serving refuses any other file (no pickles), an
adapter for another base, a rank other than the configured one, and a path outside its adapters root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from foundation.errors import AdapterError

ADAPTER_META = "shadow_distill_adapter.json"
ALLOWED_FILES = {"adapter_config.json", "adapter_model.safetensors", ADAPTER_META, "README.md"}


@dataclass(frozen=True)
class AdapterMeta:
    base_model_id: str
    rank: int

    @classmethod
    def read(cls, folder: Path) -> AdapterMeta:
        try:
            data = json.loads((folder / ADAPTER_META).read_text())
            return cls(str(data["base_model_id"]), int(data["rank"]))
        except (OSError, KeyError, ValueError) as exc:
            raise AdapterError(f"{folder}: unreadable {ADAPTER_META}: {exc}") from exc


def save_adapter(peft_model, out: Path, base_model_id: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    rank = int(next(iter(peft_model.peft_config.values())).r)
    (out / ADAPTER_META).write_text(json.dumps({"base_model_id": base_model_id, "rank": rank}, indent=2))
    return out


def random_adapter(student_dir: Path, out: Path, seed: int, rank: int = 4, scale: float = 0.5) -> Path:
    """A LoRA adapter (q/v projections) with random A and B that visibly moves the student's logits: a stand-in
    for a trained adapter in tests and benches (serving, shadow mode), saved like any other."""
    import torch
    from peft import LoraConfig, get_peft_model

    from model_runtime.models import ModelMeta, load_model

    model = get_peft_model(load_model(student_dir, "cpu", torch.float32),
                           LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return save_adapter(model, Path(out), ModelMeta.read(student_dir).model_id)


def check_adapter_dir(folder: Path, base_model_id: str, *, rank: int | None = None,
                      root: Path | None = None) -> AdapterMeta:
    """Refuse an adapter folder that is unsafe or does not fit; return its metadata when it does."""
    if "\x00" in str(folder):
        raise AdapterError("adapter path contains a NUL byte")
    folder = Path(folder)
    if root is not None:
        resolved, root_resolved = folder.resolve(), Path(root).resolve()
        if not resolved.is_relative_to(root_resolved):
            raise AdapterError(f"adapter path {folder} escapes its root {root}")
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    links = sorted(p.name for p in folder.iterdir() if p.is_symlink())
    if links:
        raise AdapterError(f"adapter {folder} holds symbolic links {links}; copy the files in instead")
    names = {p.name for p in folder.iterdir()}
    unexpected = sorted(names - ALLOWED_FILES)
    if unexpected:
        raise AdapterError(f"adapter {folder} holds files other than safetensors and configs: {unexpected}")
    for required in ("adapter_config.json", "adapter_model.safetensors", ADAPTER_META):
        if required not in names:
            raise AdapterError(f"adapter {folder} lacks {required}")
    meta = AdapterMeta.read(folder)
    if meta.base_model_id != base_model_id:
        raise AdapterError(f"adapter {folder} was trained on base {meta.base_model_id!r}, not {base_model_id!r}")
    if rank is not None and meta.rank != rank:
        raise AdapterError(f"adapter {folder} has rank {meta.rank}, serving expects rank {rank}")
    return meta
