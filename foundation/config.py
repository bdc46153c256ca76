"""`StrictConfig`: the one configuration pattern of the project, validated where it is declared.

Every configuration object (serving, scorer, nightly run, training, gate, demo) is a frozen pydantic model that
refuses unknown keys; each field carries its bounds and a `description` (which becomes its `--flag` help), and
cross-field rules sit in a `model_validator` on the class that owns them. Building one from a file, flags or a
dict goes through `StrictConfig.parse`, which turns pydantic's error into a `ConfigError` naming the field and
the bad value (never a secret's value):

    class LoraSettings(StrictConfig):
        rank: int = Field(16, ge=1, le=256, description="LoRA rank r.")

    NightlyConfig.from_json_file("nightly.json")   # ConfigError: nightly.json: train.lora.rank: ... (got 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from foundation.errors import ConfigError

_SECRET_WORDS = ("key", "token", "secret", "password")


def describe_validation_error(exc: ValidationError, *, flag_style: bool = False) -> str:
    """`field.path: message (got value)` of pydantic's first error; secret-looking fields show `<hidden>`."""
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"])
    secret = any(w in field.lower() for w in _SECRET_WORDS)
    shown = "<hidden>" if secret else repr(first.get("input"))
    name = "--" + field.replace("_", "-") if flag_style else (field or "value")
    message = first["msg"].removeprefix("Value error, ")
    return f"{name}: {message} (got {shown})"


class StrictConfig(BaseModel):
    """Frozen, no unknown keys; subclasses declare fields with `Field(..., description=...)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, source: str | None = None) -> Self:
        """Validate `data`; a bad value raises `ConfigError` naming `source`, the field and the value."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}{describe_validation_error(exc)}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> Self:
        """Read and validate a JSON file; a missing file, bad JSON or bad value is a `ConfigError`."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
