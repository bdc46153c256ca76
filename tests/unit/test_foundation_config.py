"""StrictConfig's error messages name the field and the value, never a secret."""

from __future__ import annotations

import pytest
from pydantic import Field, model_validator

from foundation.config import StrictConfig
from foundation.errors import ConfigError


class _Example(StrictConfig):
    store_url: str = "sqlite:///x.db"
    api_key: str | None = None
    rank: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _needs_key(self):
        if self.store_url.startswith("postgresql") and self.api_key is None:
            raise ValueError("a postgresql store needs api_key")
        return self


def test_a_bad_value_names_the_field_and_the_value():
    with pytest.raises(ConfigError, match=r"rank: .* \(got 0\)"):
        _Example.parse({"rank": 0})


def test_a_secret_field_is_hidden():
    with pytest.raises(ConfigError) as exc:
        _Example.parse({"api_key": 12345})
    assert "12345" not in str(exc.value)


def test_a_password_in_a_url_is_hidden():
    with pytest.raises(ConfigError) as exc:
        _Example.parse({"store_url": ["postgresql://me:hunter2@db/x"]})
    assert "hunter2" not in str(exc.value)


def test_a_rule_across_fields_shows_no_input():
    with pytest.raises(ConfigError) as exc:
        _Example.parse({"store_url": "postgresql://me:hunter2@db/x"})
    assert "needs api_key" in str(exc.value)
    assert "hunter2" not in str(exc.value)
