"""The trajectory message, version 1: what serving logs for every generated choice.

One message per choice, keyed by `trajectory_id` (the idempotency key everywhere downstream). The trainer
learns from `prompt_token_ids`, `completion_token_ids` and `behaviour_logprobs` and nothing else: texts are
for reviewers, never re-tokenized.

`behaviour_logprobs[j]` is the logprob of `completion_token_ids[j]`, and `logprob_kind` says under which
distribution:
- `sampled`: the exact distribution the token was drawn from (after temperature, top-k, top-p). This is the
  behaviour policy an importance ratio needs.
- `raw`: the model's own distribution before any processing (temperature 1, no truncation). Serving records
  this for greedy decoding, where the sampled distribution is a point mass and its logprobs are all 0.

The JSON Schema file beside this module (`trajectory.v1.schema.json`) is generated from this model
(`python -m schemas.trajectory > schemas/trajectory.v1.schema.json`); a test keeps them equal.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from foundation.errors import InvalidTrajectory, UnknownSchemaVersion

SCHEMA_VERSION = 1
DEFAULT_TOPIC = "shadow.trajectories.v1"
DEAD_LETTER_TOPIC = "shadow.trajectories.dlq"
SCHEMA_FILE = Path(__file__).with_name("trajectory.v1.schema.json")


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


class TrajectoryV1(BaseModel):
    """One generated choice, as logged by serving and consumed by the teacher scorer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
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
    prompt_text: str | None = None
    completion_text: str | None = None
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
    def _aligned(self) -> TrajectoryV1:
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


def decode_trajectory(raw: bytes | str) -> TrajectoryV1:
    """Parse and validate one message; every failure is an `InvalidTrajectory` that names the problem."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidTrajectory(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidTrajectory(f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UnknownSchemaVersion(f"schema_version {version!r} is not supported (this code reads {SCHEMA_VERSION})")
    try:
        return TrajectoryV1.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise InvalidTrajectory(f"{where}: {first['msg']}") from exc


def json_schema() -> dict:
    schema = TrajectoryV1.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://shadow-distill.dev/schemas/trajectory.v1.schema.json"
    return schema


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
