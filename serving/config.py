"""Configuration of the student endpoint: one validated object that `run_server` and the tests share.

Every limit the API enforces lives here, so a 400 always names a value an operator can look up. Secrets never
sit in this object's files: API keys come as sha256 hashes in a keys file (see `serving.auth`, which also holds
each key's rate limits), the admin token comes from an environment variable whose *name* is configured here,
and the caller-hash salt from one too, else from a salt file created with a random salt (`serving.privacy`).

    python -m serving.api_server --model-dir ~/.cache/shadow-distill/models/student --port 8000 \\
        --api-keys-file keys.json --kafka-bootstrap 127.0.0.1:9092 --adapters-root /srv/adapters
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from foundation.config import StrictConfig
from schemas.trajectory import DEFAULT_TOPIC


class ServingConfig(StrictConfig):
    """Everything the endpoint needs; invalid combinations fail at construction with the field named."""

    # What is served.
    model_dir: Path = Field(description="Student base folder (safetensors + tokenizer + shadow_distill.json).")
    served_model_name: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="Name clients pass as `model`; defaults to the student's model_id.")
    engine: Literal["embedded", "vllm"] = Field(
        default="embedded", description="`embedded`: transformers+peft in process; `vllm`: gateway to vllm_url.")
    device: str = Field(default="auto", description="Embedded engine device: auto | cpu | cuda | cuda:N.")
    torch_threads: int | None = Field(default=None, ge=1,
                                      description="CPU threads for torch (default: torch's); 1-2 on a busy host.")
    vllm_url: str | None = Field(default=None, description="Base URL of a vLLM server (engine=vllm).")
    vllm_model: str | None = Field(default=None, description="Name vLLM serves the base under (default: its first).")
    vllm_api_key: str | None = Field(default=None, description="Bearer key sent to vLLM, if it needs one.")

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port (tests).")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="Larger bodies get 413 before parsing.")

    # Batching (embedded engine).
    max_batch_size: int = Field(default=8, ge=1, le=1024, description="Rows (choices) per forward batch.")
    batch_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0,
                                 description="How long the worker waits for more requests to fill a batch.")
    background_idle_ms: float = Field(default=20.0, ge=0.0, le=10000.0, description=(
        "Mirrored (shadow) work runs in a batch of its own only after the worker saw no client request this long; "
        "otherwise it rides along in the free rows of client batches."))

    # Request limits.
    max_model_len: int | None = Field(default=None, ge=2,
                                      description="Prompt + completion token limit; default: the model's.")
    max_tokens_limit: int = Field(default=1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens when a request sets none.")
    max_n: int = Field(default=8, ge=1, description="Largest `n`.")
    max_choices: int = Field(default=64, ge=1, description="Largest n x number of prompts in one request.")
    max_top_logprobs: int = Field(default=20, ge=0, le=20, description="Largest top_logprobs / logprobs.")

    # Auth.
    api_keys_file: Path | None = Field(default=None, description="JSON file of sha256-hashed API keys.")
    api_key: str | None = Field(default=None, min_length=8, description="One plain key, for development only.")
    admin_token_env: str = Field(default="SHADOW_DISTILL_ADMIN_TOKEN",
                                 description="Env var holding the admin token for adapter endpoints.")
    caller_salt_env: str = Field(default="SHADOW_DISTILL_CALLER_SALT",
                                 description="Env var holding the salt of caller and user hashes (>= 16 chars).")
    caller_salt_file: Path | None = Field(
        default=None, description="Salt file used when the env var is unset; created 0600 with a random salt "
                                  "when missing (default: $SHADOW_DISTILL_HOME/serving/caller_salt). Replicas "
                                  "must share one salt.")
    dev_mode: bool = Field(default=False, description="Development: with no salt configured, hash with a random "
                                                      "salt of this process (changes at every restart).")
    rate_limit_replicas: int = Field(default=1, ge=1, le=1024,
                                     description="Serving processes behind one keys file: each enforces 1/N of "
                                                 "every key's rate limits and quotas.")

    # Adapters.
    adapters_root: Path | None = Field(default=None, description="Adapter folders must lie under this root.")
    lora_rank: int | None = Field(default=None, ge=1, description="Refuse adapters of another rank.")
    mlflow_tracking_uri: str | None = Field(default=None, description="Follow the registry's champion alias.")
    registry_model_name: str | None = Field(default=None, description="Registered model whose champion is served.")
    adapter_poll_s: float = Field(default=30.0, gt=0.0, description="Champion polling period.")

    # Shadow log.
    kafka_bootstrap: str | None = Field(default=None, description="host:port list; unset disables the shadow log.")
    kafka_topic: str = Field(default=DEFAULT_TOPIC, min_length=1)
    spool_dir: Path | None = Field(default=None, description="Local spool of the shadow log when Kafka is down.")
    log_texts: bool = Field(default=True, description="Put prompt/completion texts into trajectories (review).")
    redact_patterns: dict[str, str] = Field(
        default_factory=dict, description='Named regexes, as JSON ({"email": "[^@ ]+@[^@ ]+"}): a trajectory whose '
                                          "prompt or completion matches one is withheld from the log (counted on "
                                          "/metrics).")

    # Shadow mode (a gated candidate mirrored on live traffic; see serving/shadow_mirror.py).
    shadow_fraction: float = Field(default=0.1, gt=0.0, le=1.0, description=(
        "Share of live requests mirrored to the candidate while shadow mode is on (POST /v1/shadow)."))
    shadow_max_pending: int = Field(default=32, ge=1, description=(
        "Mirrored requests that may wait at once; more are dropped and counted (shadow work never queues "
        "without bound)."))

    @field_validator("redact_patterns", mode="before")
    @classmethod
    def _patterns_from_json(cls, v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v  # a command-line flag is JSON text

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, v: dict[str, str]) -> dict[str, str]:
        for name, regex in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", name):
                raise ValueError(f"pattern name {name!r} must be 1-64 letters, digits or _ (it is a metric label)")
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"pattern {name!r} is not a regex: {exc}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ServingConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds "
                             f"max_tokens_limit={self.max_tokens_limit}")
        if self.max_n > self.max_choices:
            raise ValueError(f"max_n={self.max_n} exceeds max_choices={self.max_choices}")
        if self.engine == "vllm" and not self.vllm_url:
            raise ValueError("engine='vllm' needs vllm_url")
        if self.api_key is not None and self.api_keys_file is not None:
            raise ValueError("set api_key (development) or api_keys_file, not both")
        if (self.mlflow_tracking_uri is None) != (self.registry_model_name is None):
            raise ValueError("mlflow_tracking_uri and registry_model_name go together "
                             f"(got {self.mlflow_tracking_uri!r}, {self.registry_model_name!r})")
        if self.mlflow_tracking_uri is not None and self.adapters_root is None:
            raise ValueError("following the champion needs adapters_root (downloads land there)")
        return self

    @property
    def follows_champion(self) -> bool:
        return self.mlflow_tracking_uri is not None
