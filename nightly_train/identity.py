"""Model identity: what a cached evaluation is a property of, by content, never by a name.

A greedy IFEval result depends on the weights alone, so it can be cached and reused across nights: yesterday's
candidate is tonight's champion. The cache key must change whenever the weights do. Names do not: "base" or "v3"
stay the same when someone rebuilds the student with other layers dropped or re-registers an adapter, and a stale
result would then be compared with a fresh one. The identity is therefore
- the base model id (`shadow_distill.json`) and the sha256 of the base's config and safetensors bytes;
- the sha256 of the adapter's `adapter_model.safetensors` bytes plus its config's numeric fields (rank, alpha,
  target modules: a re-scaled adapter with the same tensors is another model), or None for the bare base.

    ident = model_identity(student_dir, adapter_dir)     # ModelIdentity(base_model_id=..., adapter_sha256=...)
    ident.key    # "tiny-teacher-drop2@3f2a9c1b0d4e+adapter:9b1c2d3e4f50"
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# Fields of adapter_config.json that name where the adapter came from, not what it computes.
_CONFIG_PROVENANCE = frozenset({"base_model_name_or_path", "revision", "peft_version", "auto_mapping"})
_base_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


@dataclass(frozen=True)
class ModelIdentity:
    base_model_id: str
    base_sha256: str
    adapter_sha256: str | None  # None = the bare base, no adapter

    @property
    def key(self) -> str:
        tail = f"adapter:{self.adapter_sha256[:12]}" if self.adapter_sha256 else "no-adapter"
        return f"{self.base_model_id}@{self.base_sha256[:12]}+{tail}"

    def to_dict(self) -> dict[str, str | None]:
        return {"base_model_id": self.base_model_id, "base_sha256": self.base_sha256,
                "adapter_sha256": self.adapter_sha256, "key": self.key}


def _feed(h, path: Path) -> None:
    h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def base_sha256(model_dir: Path) -> str:
    """sha256 over the base's config.json and every *.safetensors file (sorted by name); memoized per process on
    (path, name, size, mtime) so the nightly evaluate hashes a 500 MB base once."""
    model_dir = Path(model_dir)
    files = sorted([*model_dir.glob("*.safetensors"), model_dir / "config.json"], key=lambda p: p.name)
    files = [p for p in files if p.is_file()]
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"{model_dir} holds no safetensors weights")
    stamp = (str(model_dir.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _base_cache:
        h = hashlib.sha256()
        for p in files:
            _feed(h, p)
        _base_cache[stamp] = h.hexdigest()
    return _base_cache[stamp]


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 of the adapter's safetensors bytes and the computing fields of its config."""
    adapter_dir = Path(adapter_dir)
    h = hashlib.sha256()
    _feed(h, adapter_dir / ADAPTER_WEIGHTS)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    h.update(json.dumps({k: v for k, v in cfg.items() if k not in _CONFIG_PROVENANCE}, sort_keys=True).encode())
    return h.hexdigest()


def model_identity(base_dir: Path, adapter_dir: Path | None) -> ModelIdentity:
    from model_runtime.models import ModelMeta

    return ModelIdentity(ModelMeta.read(Path(base_dir)).model_id, base_sha256(base_dir),
                         adapter_sha256(adapter_dir) if adapter_dir is not None else None)
