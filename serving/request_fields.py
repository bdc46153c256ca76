"""Every request field is honoured or refused: the refused ones, declared here, and the strict request base.

A client that sends a field this server cannot honour must learn it from a 400 that names the field, never from
an answer that quietly ignored it (a tool list, a JSON schema, a repetition penalty...). So each field of
OpenAI's chat and completions requests and of vLLM's extras that the serving logic does not implement is
declared here as `Refused`: null, or a neutral value that asks for nothing (`tools: []`, `tool_choice: "none"`,
`response_format: {"type": "text"}`, `repetition_penalty: 1`), is accepted, so a client that spells out the
defaults is served; anything else is a 400 with `param` = the field. A few OpenAI fields only steer OpenAI's own
infrastructure (`metadata`, `prompt_cache_key`, ...); they cannot change an answer and are `NoEffect`. Any other
field is refused as OpenAI refuses it (400 `unknown_parameter`, "Unknown parameter: 'x'."): requests are
`extra="forbid"`.

The honoured fields are declared on the request models themselves (serving.protocol).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema


class RequestModel(BaseModel):
    """A request body (or part of one): unknown fields are refused, not dropped."""

    model_config = ConfigDict(extra="forbid")


def _same(value: Any, neutral: Any) -> bool:
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)  # True is not 1 here


def Refused(why: str, *neutral: Any) -> Any:  # noqa: N802 - used as a type, like `Annotated`
    """The type of a field this server cannot honour: null or one of `neutral` passes, anything else is a 400
    naming the field with `why`. Its published JSON schema (/openapi.json) is exactly what passes."""

    def check(value: Any) -> Any:
        if value is None or any(_same(value, n) for n in neutral):
            return value
        raise ValueError(why)

    note = f"Refused unless {' or '.join(['null', *(json.dumps(n) for n in neutral)])}: {why}"
    accepted = {"anyOf": [{"type": "null"}, *({"const": n} for n in neutral)], "default": None, "description": note}
    return Annotated[Any, AfterValidator(check), Field(default=None, description=note), WithJsonSchema(accepted)]


def NoEffect(what: str) -> Any:  # noqa: N802
    """The type of an OpenAI field that only steers OpenAI's own infrastructure: accepted, changes nothing."""
    return Annotated[Any, Field(default=None, description=f"Accepted; no effect on the answer here: {what}")]


_NO_STRUCTURE = "structured outputs are not supported by this server (the text is sampled freely)"
_NO_TOOLS = "tools are not supported by this server"


class RefusedVLLMFields(RequestModel):
    """vLLM's sampling and request extras that this server does not implement (both routes)."""

    repetition_penalty: Refused("repetition_penalty is not supported by this server (only 1)", 1)
    length_penalty: Refused("length_penalty applies to beam search, which this server does not do", 1)
    use_beam_search: Refused("beam search is not supported by this server", False)
    spaces_between_special_tokens: Refused("only the default (true) is supported", True)
    truncate_prompt_tokens: Refused("prompts are never truncated here; shorten the prompt")
    allowed_token_ids: Refused("allowed_token_ids is not supported by this server")
    bad_words: Refused("bad_words is not supported by this server", [])
    logits_processors: Refused("custom logits processors are not supported by this server", [])
    guided_json: Refused(_NO_STRUCTURE)
    guided_regex: Refused(_NO_STRUCTURE)
    guided_choice: Refused(_NO_STRUCTURE)
    guided_grammar: Refused(_NO_STRUCTURE)
    guided_decoding_backend: Refused(_NO_STRUCTURE)
    guided_whitespace_pattern: Refused(_NO_STRUCTURE)
    structural_tag: Refused(_NO_STRUCTURE)
    structured_outputs: Refused(_NO_STRUCTURE)
    response_format: Refused(_NO_STRUCTURE, {"type": "text"})
    priority: Refused("request priorities are not supported by this server", 0)
    request_id: Refused("send the request id as the X-Request-Id header")
    cache_salt: Refused("this server has no prefix cache to salt")
    kv_transfer_params: Refused("disaggregated serving is not supported by this server")
    vllm_xargs: Refused("vLLM extension arguments are not supported by this server")
    frequency_penalty: Refused("frequency_penalty is not supported by this server (only 0)", 0)
    presence_penalty: Refused("presence_penalty is not supported by this server (only 0)", 0)
    logit_bias: Refused("logit_bias is not supported by this server", {})


class RefusedChatFields(RequestModel):
    """Chat fields of OpenAI's document and of vLLM's chat extras that this server does not implement."""

    tools: Refused(_NO_TOOLS, [])
    tool_choice: Refused(_NO_TOOLS, "none")
    functions: Refused(_NO_TOOLS, [])
    function_call: Refused(_NO_TOOLS, "none")
    parallel_tool_calls: Refused(_NO_TOOLS)
    audio: Refused("audio output is not supported by this server")
    modalities: Refused("only text output is supported by this server", ["text"])
    prediction: Refused("predicted outputs are not supported by this server")
    reasoning_effort: Refused("this model has no reasoning controls")
    verbosity: Refused("this model has no verbosity control")
    web_search_options: Refused("web search is not supported by this server")
    moderation: Refused("moderated completions are not supported by this server")
    store: Refused("stored completions are not supported by this server", False)
    service_tier: Refused("this server has one service tier", "auto", "default")
    echo: Refused("echo is not supported by this server", False)
    chat_template: Refused("the model's own chat template is always used")
    chat_template_kwargs: Refused("the model's own chat template is always used", {})
    documents: Refused("documents are not supported by this server")
    mm_processor_kwargs: Refused("only text input is supported by this server")
    include_reasoning: Refused("this server does not parse reasoning", True)
    add_special_tokens: Refused("the chat template adds the special tokens (only false)", False)
    metadata: NoEffect("OpenAI tags stored completions with it; this server stores none")
    prompt_cache_key: NoEffect("a hint for OpenAI's prompt cache")
    prompt_cache_retention: NoEffect("a hint for OpenAI's prompt cache")
    prompt_cache_options: NoEffect("a hint for OpenAI's prompt cache")


class RefusedCompletionFields(RequestModel):
    """Legacy completions fields that this server does not implement."""

    echo: Refused("echo is not supported by this server", False)
    suffix: Refused("suffix is not supported by this server", "")
    prompt_embeds: Refused("prompt embeddings are not supported by this server")
    add_special_tokens: Refused("text prompts are tokenized with special tokens (only true)", True)


class RefusedMessageFields(RequestModel):
    """Message fields of OpenAI's document that need tools or audio; null (as a previous answer has them) passes."""

    refusal: Refused("a refusal cannot be replayed to this model")
    tool_calls: Refused(_NO_TOOLS, [])
    tool_call_id: Refused(_NO_TOOLS)
    function_call: Refused(_NO_TOOLS)
    audio: Refused("audio is not supported by this server")
    annotations: Refused("annotations are not supported by this server", [])
