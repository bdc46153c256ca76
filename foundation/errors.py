"""The one exception hierarchy of shadow-distill.

Every part raises a subclass of `ShadowDistillError`, so a CLI or a server can turn any of them into a clear
message (CLI) or a 4xx body (HTTP) without catching bare `Exception`.
"""

from __future__ import annotations


class ShadowDistillError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(ShadowDistillError, ValueError):
    """A configuration value is invalid; the message names the field and the bad value."""


class InvalidTrajectory(ShadowDistillError, ValueError):
    """A trajectory message breaks the contract (bad JSON, unknown schema version, lengths that disagree)."""


class UnknownSchemaVersion(InvalidTrajectory):
    """A trajectory carries a `schema_version` this code does not read."""


class UnalignableTrajectory(InvalidTrajectory):
    """A teacher of another tokenizer cannot align a trajectory's completion with its own tokens (the reason says
    why): dead-lettered, never trained on."""


class AlignmentError(ShadowDistillError, ValueError):
    """Token arrays that must line up (completion ids, logprobs, teacher scores) do not."""


class AdapterError(ShadowDistillError):
    """An adapter is unsafe or does not fit the base model (not safetensors, wrong base, wrong rank, bad path)."""


class StoreError(ShadowDistillError):
    """The feature store rejected an operation (schema mismatch, corrupt array)."""


class RegistryError(ShadowDistillError):
    """A model-registry action was refused (gate not passed, reviewer is the pipeline, no such version)."""


class GateError(ShadowDistillError):
    """A gate could not be evaluated (no held-out data, NaN metric)."""


class EngineError(ShadowDistillError):
    """The generation engine (embedded or an upstream vLLM) failed or is not running."""


class TeacherUnavailable(ShadowDistillError, ConnectionError):
    """The teacher server cannot be reached or is overloaded; retry later (the scorer backs off)."""


class SpoolFull(ShadowDistillError):
    """The shadow log's local spool reached its size cap; records are counted as dropped, loudly."""


class ModelNotFound(ShadowDistillError):
    """A model or tokenizer folder is missing; the message says which command creates it."""
