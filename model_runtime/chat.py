"""Prompt token ids from chat messages, with the model's own chat template (shipped in its tokenizer).

Serving, the evaluators and the demo build prompts here, so a prompt is tokenized one way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def user_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
