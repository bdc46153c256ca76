"""Build a validated pydantic config from command-line flags: one `--flag` per field, help from its description.

Used by every long-running service (`shadow-distill serve`, `shadow-distill score run`) so their flags always
match their config objects; pydantic does the validation and names the bad field.
"""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from shadow_distill.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        else:
            parser.add_argument(flag, dest=name, default=None, required=field.is_required(), help=field.description)


def model_from_args(model: type[M], args: argparse.Namespace) -> M:
    values = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        secret = any(w in field for w in ("key", "token", "secret", "password"))
        shown = "<hidden>" if secret else repr(first.get("input"))
        raise ConfigError(f"--{field.replace('_', '-')}: {first['msg']} (got {shown})") from None
