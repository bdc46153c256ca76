"""Tiny random Llama models with a real (tiny) tokenizer, built offline in about a second.

Unit tests, CI's `airflow dags test` and the fast integration test use these instead of SmolLM2: the code
paths are identical (same tokenizer API, chat template, KV cache, peft), only the numbers are meaningless.

    shadow-distill models tiny --out /tmp/tiny     # writes /tmp/tiny/teacher and /tmp/tiny/student
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model_runtime.models import ModelMeta, drop_layers, student_id

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "Write a short poem about the sea in exactly three lines.",
    "Answer in JSON format. List two colors and one animal.",
    "Explain what a neural network is, in lowercase letters only.",
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9.",
    "Please summarize the following text, and end your answer with the word done.",
    "user assistant system: hello, how are you? I am fine, thank you!",
    "Give me three bullet points * about cooking * and travel * and music.",
]


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, n_layers: int = 4, init_std: float = 0.02) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, initializer_range=init_std)


def build_tiny_pair(out: Path, seed: int = 0, n_layers: int = 4, drop: tuple[int, ...] = (2,),
                    init_std: float = 0.2) -> tuple[Path, Path]:
    """Write `out/teacher` and `out/student` (teacher minus `drop`); returns both folders.

    `init_std` 0.2 (not HF's 0.02) makes the random teacher's next-token distributions peaked, so the
    student with a layer removed is measurably far from it and distillation has something to close.
    """
    out = Path(out)
    teacher_dir, student_dir = out / "teacher", out / "student"
    tok = build_tokenizer()
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(tiny_config(len(tok), n_layers, init_std))
    teacher.generation_config.eos_token_id = tok.eos_token_id
    teacher.generation_config.pad_token_id = tok.pad_token_id
    for folder in (teacher_dir, student_dir):
        folder.mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(teacher_dir, safe_serialization=True)
    tok.save_pretrained(teacher_dir)
    ModelMeta("tiny-teacher", "teacher").write(teacher_dir)
    drop_layers(teacher, list(drop))
    teacher.save_pretrained(student_dir, safe_serialization=True)
    tok.save_pretrained(student_dir)
    ModelMeta(student_id("tiny-teacher", list(drop)), "student", "tiny-teacher", tuple(drop)).write(student_dir)
    return teacher_dir, student_dir


def build_tiny_cross_teacher(out: Path, seed: int = 1, n_layers: int = 2, init_std: float = 0.2) -> Path:
    """Write `out` (and return it): a tiny random Llama on a Gemma-like byte-fallback tokenizer with Gemma's chat
    template (`model_runtime.gemma.tiny_gemma_tokenizer`): a teacher of ANOTHER tokenizer for the tiny students,
    what the cross-tokenizer paths (model_runtime.xtok) are unit-tested with."""
    from model_runtime.gemma import tiny_gemma_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tok), n_layers, init_std))
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ModelMeta("tiny-gemma-like", "teacher").write(out)
    return out
