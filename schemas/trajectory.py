"""The trajectory message: what serving logs for every generated choice. Versions 1 and 2, read side by side.

One message per choice, keyed by `trajectory_id` (the idempotency key everywhere downstream). The trainer
learns from `prompt_token_ids`, `completion_token_ids` and `behaviour_logprobs`; a teacher that shares the
student's tokenizer scores those ids as they are.

`behaviour_logprobs[j]` is the logprob of `completion_token_ids[j]`, and `logprob_kind` says under which
distribution:
- `sampled`: the exact distribution the token was drawn from (after temperature, top-k, top-p). This is the
  behaviour policy an importance ratio needs.
- `raw`: the model's own distribution before any processing (temperature 1, no truncation). Serving records
  this for greedy decoding, where the sampled distribution is a point mass and its logprobs are all 0.

Version 2 adds what a teacher with ANOTHER tokenizer needs to re-render the trajectory (model_runtime.xtok):
the request's structured messages (or, for the completions API, that the prompt is raw text), the prompt text
exactly as rendered, and the completion text the tokens spell with each token's character offset in it.

Rolling upgrade (why both versions are read): serving pods are replaced one by one, so while new pods write v2
the old ones still write v1 into the same topic, and the topic keeps v1 messages for its retention after the
last old pod stops. Readers (the scorer, the store) therefore read both. `V1_WRITERS_RETIRED_ON` records the day
the last v1 writer stopped (None: not yet); a CI test (tests/unit/test_schema_rollout.py) reads the topic's
retention from infra/ and fails if the v1 reader is removed while `v1_may_be_in_topic`. Upgrade the readers
before the writers. The JSON Schema files beside this module (`trajectory.v1.schema.json`,
`trajectory.v2.schema.json`) are generated from these models (`python -m schemas.trajectory 2 >
schemas/trajectory.v2.schema.json`); a test keeps them equal.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from foundation.errors import InvalidTrajectory, UnknownSchemaVersion

SCHEMA_VERSION = 2  # what serving writes
READ_VERSIONS = (1, 2)  # what every reader reads
DEFAULT_TOPIC = "shadow.trajectories.v1"  # the topic's name predates v2 and stays: both versions share it
DEAD_LETTER_TOPIC = "shadow.trajectories.dlq"
SCHEMA_FILES = {v: Path(__file__).with_name(f"trajectory.v{v}.schema.json") for v in READ_VERSIONS}
SCHEMA_FILE = SCHEMA_FILES[1]
# The day the last serving pod writing v1 was stopped; None while any may still run (this release rolls v2 out).
# Set it when the rollout is done: v1 readers may go `retention` after it, not before (`v1_may_be_in_topic`).
V1_WRITERS_RETIRED_ON: date | None = None


def v1_may_be_in_topic(today: date, retention: timedelta, retired_on: date | None = V1_WRITERS_RETIRED_ON) -> bool:
    """True while the topic may still hold a v1 message: some writer may still write v1, or the last one stopped
    less than the topic's retention ago (a day of slack for the broker's segment-granular deletion)."""
    return retired_on is None or today <= retired_on + retention + timedelta(days=1)


def _is_none(value: object) -> bool:
    return value is None


def _is_zero(value: object) -> bool:
    return value == 0


def _is_false(value: object) -> bool:
    return value is False


class SamplingParams(BaseModel):
    """How the completion was decoded. `temperature == 0` means greedy; `top_k == 0` means no top-k cut.

    `min_p`, `min_tokens` and `ignore_eos` (vLLM's extras, added to v1 as optional fields) also change what was
    sampled from. Each has a neutral default and is left out of the JSON while neutral, so every message written
    before them still parses unchanged, and a message that does not use them is byte-for-byte what it was.
    A reader older than these fields refuses a message that carries one (v1 forbids unknown keys): upgrade the
    readers (the scorer) before the writers (serving).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float = Field(gt=0.0, le=1.0)
    top_k: int = Field(ge=0)
    max_tokens: int = Field(ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, exclude_if=_is_zero,
                         description="Tokens below min_p x the top token's probability were cut (0: no cut).")
    min_tokens: int = Field(default=0, ge=0, exclude_if=_is_zero,
                            description="Stop tokens (EOS included) were masked until this many tokens were out.")
    ignore_eos: bool = Field(default=False, exclude_if=_is_false,
                             description="Sampling went on past EOS.")

    @property
    def is_untruncated_temperature_one(self) -> bool:
        """True when the sampled distribution is the model's own: the case rule 1 of DESIGN.md needs.

        Any cut (top-p, top-k, min-p), masked stop tokens (`min_tokens`) or sampling past EOS (`ignore_eos`: the
        sequence is not one the model would have produced) makes it another distribution.
        """
        return (self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0 and self.min_p == 0.0
                and self.min_tokens == 0 and not self.ignore_eos)


class _Trajectory(BaseModel):
    """The fields both versions share (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int  # each version narrows it to its Literal (declared here so that it is serialized first)
    trajectory_id: str = Field(min_length=1, max_length=64)
    request_id: str = Field(min_length=1, max_length=128)
    choice_index: int = Field(ge=0)
    created_at: datetime
    caller_hash: str | None = Field(default=None, max_length=64)
    user_hash: str | None = Field(default=None, max_length=64, exclude_if=_is_none,
                                  description="Salted hash of the request's end-user id (`user`), if it had one.")
    base_model_id: str = Field(min_length=1, max_length=200)
    adapter_version: str | None = Field(default=None, max_length=64)
    sampling: SamplingParams
    prompt_token_ids: list[int] = Field(min_length=1)
    completion_token_ids: list[int]
    behaviour_logprobs: list[float]
    logprob_kind: Literal["sampled", "raw"]
    finish_reason: Literal["stop", "length"]
    shadow: bool = Field(default=False, exclude_if=_is_false, description=(
        "Answered by a candidate mirrored on a live request (shadow mode): never returned to the client, never "
        "trained on; `adapter_version` is the candidate's."))

    @field_validator("created_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("created_at must carry a timezone")
        return v.astimezone(UTC)

    @field_validator("prompt_token_ids", "completion_token_ids")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("behaviour_logprobs")
    @classmethod
    def _logprobs(cls, v: list[float]) -> list[float]:
        for lp in v:
            if not math.isfinite(lp) or lp > 1e-4:
                raise ValueError(f"behaviour logprob {lp!r} is not a finite value <= 0")
        return v

    @model_validator(mode="after")
    def _aligned(self):
        if len(self.behaviour_logprobs) != len(self.completion_token_ids):
            raise ValueError(
                f"{len(self.behaviour_logprobs)} behaviour logprobs for "
                f"{len(self.completion_token_ids)} completion tokens"
            )
        return self

    def max_token_id(self) -> int:
        return max(self.prompt_token_ids + self.completion_token_ids)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @property
    def key(self) -> bytes:
        """The Kafka message key: the trajectory id, so replays of one trajectory land on one partition."""
        return self.trajectory_id.encode("utf-8")


class TrajectoryV1(_Trajectory):
    """Version 1: token ids, plus texts for reviewers only (`completion_text` is what the client was sent)."""

    schema_version: Literal[1] = 1
    prompt_text: str | None = None
    completion_text: str | None = None


class ChatMessage(BaseModel):
    """One message of a chat request, as the caller sent it (content flattened to text, as the template saw it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(min_length=1, max_length=32)
    content: str
    name: str | None = Field(default=None, max_length=256, exclude_if=_is_none,
                             description="The message's `name`, where the caller gave one (the template read it).")


class TrajectoryV2(_Trajectory):
    """Version 2: version 1 plus what a teacher with another tokenizer needs to re-render the trajectory.

    Texts (`messages`, `prompt_text`, `completion_text`, `completion_offsets`) are left out when serving logs no
    texts (`--no-log-texts`); a cross-tokenizer scorer then decodes the token ids with the student's tokenizer."""

    schema_version: Literal[2] = 2
    prompt_kind: Literal["chat", "text"] = Field(description=(
        "`chat`: the prompt is the student's chat template rendering of `messages` (chat completions API); "
        "`text`: the prompt is raw text (completions API)."))
    messages: list[ChatMessage] | None = Field(default=None, description=(
        "The chat request's messages, in order (chat only)."))
    add_generation_prompt: bool = Field(default=True, exclude_if=lambda v: v is True,
                                        description="The template was rendered with its generation prompt.")
    continue_final_message: bool = Field(default=False, exclude_if=_is_false,
                                         description="The last message was continued, not answered.")
    prompt_text: str | None = Field(default=None, description=(
        "The prompt exactly as rendered: `prompt_token_ids` decoded with special tokens kept."))
    completion_text: str | None = Field(default=None, description=(
        "What `completion_token_ids` spell, a final stop token excluded (stop strings included: unlike v1's "
        "`completion_text`, this is not cut to what the client was sent)."))
    completion_offsets: list[int] | None = Field(default=None, description=(
        "Per completion token, how many characters of `completion_text` are spelled once it is decoded. A token "
        "that ends inside a multi-byte character repeats the previous offset (it owns no whole character); a "
        "final stop token has offset len(completion_text)."))

    @model_validator(mode="after")
    def _texts(self) -> TrajectoryV2:
        if self.prompt_kind == "text" and self.messages is not None:
            raise ValueError("messages: a `text` prompt has no messages")
        if self.prompt_kind == "text" and (self.continue_final_message or not self.add_generation_prompt):
            raise ValueError("add_generation_prompt / continue_final_message: only a `chat` prompt has them")
        offsets = self.completion_offsets
        if offsets is None:
            return self
        if self.completion_text is None:
            raise ValueError("completion_offsets: offsets without completion_text")
        if len(offsets) != len(self.completion_token_ids):
            raise ValueError(f"completion_offsets: {len(offsets)} offsets for {len(self.completion_token_ids)} "
                             "completion tokens")
        previous = 0
        for j, end in enumerate(offsets):
            if end < previous or end > len(self.completion_text):
                raise ValueError(f"completion_offsets.{j}: offset {end} after {previous} is not a non-decreasing "
                                 f"offset into a text of {len(self.completion_text)} characters")
            previous = end
        if offsets and offsets[-1] != len(self.completion_text):
            raise ValueError(f"completion_offsets: the last offset {offsets[-1]} is not the text's length "
                             f"{len(self.completion_text)}")
        return self

    @property
    def message_dicts(self) -> list[dict] | None:
        return None if self.messages is None else [{"role": m.role, "content": m.content} for m in self.messages]


Trajectory = TrajectoryV1 | TrajectoryV2
MODELS: dict[int, type[TrajectoryV1] | type[TrajectoryV2]] = {1: TrajectoryV1, 2: TrajectoryV2}


def decode_trajectory(raw: bytes | str) -> Trajectory:
    """Parse and validate one message of either version; every failure is an `InvalidTrajectory` naming the problem."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidTrajectory(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidTrajectory(f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if isinstance(version, bool) or version not in MODELS:
        raise UnknownSchemaVersion(f"schema_version {version!r} is not supported (this code reads {READ_VERSIONS})")
    try:
        return MODELS[version].model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise InvalidTrajectory(f"v{version} {where}: {first['msg']}") from exc


def json_schema(version: int = 1) -> dict:
    schema = MODELS[version].model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://shadow-distill.dev/schemas/trajectory.v{version}.schema.json"
    return schema


if __name__ == "__main__":
    import sys

    print(json.dumps(json_schema(int(sys.argv[1]) if len(sys.argv) > 1 else 1), indent=2, sort_keys=True))
