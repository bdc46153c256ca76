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

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from foundation.errors import ConfigError

_SECRET_WORDS = ("key", "token", "secret", "password")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")


def _shown(field: str, value: object) -> str:
    if any(w in field.lower() for w in _SECRET_WORDS):
        return "<hidden>"
    return _URL_PASSWORD.sub(r"\1<hidden>@", repr(value))


def describe_validation_error(exc: ValidationError, *, flag_style: bool = False) -> str:
    """`field.path: message (got value)` of pydantic's first error. Secret-looking fields show `<hidden>`, so does
    the password of a URL; a rule across fields (no single field) shows no input, which would be the whole config."""
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not field:
        return f"{'config' if flag_style else 'value'}: {message}"
    name = "--" + field.replace("_", "-") if flag_style else field
    return f"{name}: {message} (got {_shown(field, first.get('input'))})"


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
