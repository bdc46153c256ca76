"""Wire models of the OpenAI-compatible API (plus the vLLM extras the gateway and trainers rely on).

Every request field is honoured, or refused with a 400 whose `param` names it (serving.request_fields declares
the refused ones, and refuses any field neither OpenAI nor vLLM defines, as OpenAI does). Range checks live on
the fields, so a bad value comes back as a 400 naming the parameter. Responses follow OpenAI's published
schemas (tests/unit/test_serving_openai_conformance.py checks them against OpenAI's own document); vLLM's
`prompt_token_ids` / `token_ids` / `prompt_logprobs` appear only when asked for.

Honoured vLLM extras: `top_k`, `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`,
`skip_special_tokens`, `prompt_logprobs`, `return_token_ids`, `return_tokens_as_token_ids`, and for chat
`add_generation_prompt` and `continue_final_message`. `user` (and chat's `safety_identifier`) is the end user's
id: it is stored in trajectories only as a salted hash. A message's `name` reaches the chat template; a template
that does not render names refuses it (serving_chat), rather than dropping it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from serving.request_fields import (
    Refused,
    RefusedChatFields,
    RefusedCompletionFields,
    RefusedMessageFields,
    RefusedVLLMFields,
    RequestModel,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64


def _omit_none(value: Any) -> bool:
    return value is None


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- requests


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    include_obfuscation: Refused("this server adds no obfuscation padding to stream chunks", False)
    continuous_usage_stats: Refused("usage is reported once, in the last chunk", False)


class SamplingFields(RefusedVLLMFields):
    """Fields shared by chat and completions requests."""

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="vLLM extra; -1 or 0 disables.")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0,
                                description="vLLM extra: drop tokens below min_p x the top token's probability.")
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0,
                                   description="vLLM extra: stop tokens (EOS too) cannot end the choice before this.")
    ignore_eos: bool | None = Field(default=None, description="vLLM extra: keep sampling past EOS.")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS,
                                             description="vLLM extra: token ids that end a choice like EOS.")
    include_stop_str_in_output: bool | None = Field(
        default=None, description="vLLM extra: keep the stop string (or stop token) in the text.")
    skip_special_tokens: bool | None = Field(default=None, description="vLLM extra: false shows special tokens.")
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=512,
                             description="The end user's id; trajectories keep only its salted hash.")
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20,
                                        description="vLLM extra: top-k logprobs of every prompt token (no stream).")
    return_token_ids: bool | None = False
    return_tokens_as_token_ids: bool | None = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must have 1..{MAX_STOP_CHARS} characters, got {s!r:.40}")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def alternatives(self) -> int:
        """Top-logprob alternatives wanted per token (0: none)."""
        return 0

    @property
    def end_user(self) -> str | None:
        """The end user's id, if the request names one."""
        return self.user


class ContentPart(RequestModel):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"content part of type {self.type!r} is not supported (text only)")
        return self


class ChatMessage(RefusedMessageFields):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, min_length=1, max_length=256,
                             description="Passed to the chat template; refused where the template ignores names.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatCompletionRequest(RefusedChatFields, SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    safety_identifier: str | None = Field(default=None, max_length=512,
                                          description="The end user's id (OpenAI's successor of `user`).")
    add_generation_prompt: bool | None = Field(
        default=None, description="vLLM extra: end the prompt with the assistant header (default: true unless "
                                  "continue_final_message).")
    continue_final_message: bool | None = Field(
        default=None, description="vLLM extra: leave the final message open for the model to continue.")

    @field_validator("continue_final_message")
    @classmethod
    def _one_prompt_ending(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        if v and info.data.get("add_generation_prompt"):
            raise ValueError("cannot be set with add_generation_prompt=true")
        return v

    @field_validator("safety_identifier")
    @classmethod
    def _one_end_user(cls, v: str | None, info: ValidationInfo) -> str | None:
        user = info.data.get("user")
        if v is not None and user is not None and v != user:
            raise ValueError("names another end user than `user`; send one of them")
        return v

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def alternatives(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    @property
    def end_user(self) -> str | None:
        return self.safety_identifier or self.user

    @property
    def generation_prompt(self) -> bool:
        """Whether the prompt ends with the assistant header (vLLM's default: unless continuing)."""
        if self.add_generation_prompt is not None:
            return self.add_generation_prompt
        return not self.continue_final_message


class CompletionRequest(RefusedCompletionFields, SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(isinstance(p, (list, str)) and len(p) == 0 for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v != n:
            raise ValueError(f"best_of={v} != n={n} is not supported")
        return v

    @property
    def alternatives(self) -> int:
        return self.logprobs or 0


class AdminRequestModel(BaseModel):
    """vLLM's adapter-control bodies; fields this server has no use for (vLLM's `lora_int_id`) are ignored."""

    model_config = ConfigDict(extra="ignore")


class LoadLoRAAdapterRequest(AdminRequestModel):
    """vLLM's wire format; the name becomes the adapter version stamped on trajectories."""

    lora_name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@+-]+$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(AdminRequestModel):
    lora_name: str = Field(min_length=1, max_length=64)


class ForgetRequest(AdminRequestModel):
    """Erase a caller (an API key's name), or one end user (`user`) of that key, from the shadow log."""

    caller: str = Field(min_length=1, max_length=200, description="The API key's name, as in the keys file.")
    user: str | None = Field(default=None, min_length=1, max_length=512,
                             description="The request `user` to erase (only that end user of the key).")


class ShadowRequest(AdminRequestModel):
    """Mirror a share of live requests to a gated candidate (shadow mode)."""

    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@+-]+$",
                         description="Registry version of the candidate; it must carry gate.passed=true.")
    fraction: float | None = Field(default=None, gt=0.0, le=1.0,
                                   description="Share of live requests to mirror (default: shadow_fraction).")


# --------------------------------------------------------------------------------------------- responses


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo
    status_code: int = Field(default=400, exclude=True)
    headers: dict[str, str] = Field(default_factory=dict, exclude=True)  # e.g. Retry-After on a 429


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type_: str | None = None) -> ErrorResponse:
    kind = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code), status_code=status)


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class PromptLogprob(ResponseModel):
    """vLLM's entry for one token at one prompt position."""

    logprob: float
    rank: int | None = None  # 1: the most likely token at that position
    decoded_token: str | None = None


PromptLogprobsOut = list[dict[str, PromptLogprob] | None]  # per prompt position (None first), keyed by token id


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)
    refusal: list[ChatTokenLogprob] | None = None  # required by OpenAI's schema (nullable); never a refusal here


class ChatMessageOut(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None  # required by OpenAI's schema (nullable); this model never refuses by itself


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = Field(default=None, exclude_if=_omit_none)  # names the adapter version
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)
    prompt_logprobs: PromptLogprobsOut | None = Field(default=None, exclude_if=_omit_none)


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = Field(default=None, exclude_if=_omit_none)
    system_fingerprint: str | None = Field(default=None, exclude_if=_omit_none)
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)
    token_ids: list[int] | None = Field(default=None, exclude_if=_omit_none)
    prompt_logprobs: PromptLogprobsOut | None = Field(default=None, exclude_if=_omit_none)


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(default=None, exclude_if=_omit_none)
    system_fingerprint: str | None = Field(default=None, exclude_if=_omit_none)


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "shadow-distill"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    adapter_version: str | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
