"""Build a validated config from command-line flags: one `--flag` per field, help from its description.

Used by every long-running service (`shadow-distill serve`, `shadow-distill score run`) so their flags always
match their config objects; pydantic does the validation and the error names the flag.
"""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from foundation.config import describe_validation_error
from foundation.errors import ConfigError

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
        raise ConfigError(describe_validation_error(exc, flag_style=True)) from None
