"""API keys (Bearer) for /v1 and the admin token for adapter control.

The keys file holds sha256 hashes only, so no secret sits in a file or a config map:

    {"keys": [{"name": "team-search", "sha256": "<64 hex>", "shadow_log": true,
               "requests_per_minute": 600, "tokens_per_minute": 200000, "tokens_per_day": 20000000},
              {"name": "legal", "sha256": "<64 hex>", "shadow_log": false}]}

`shadow_log: false` keeps every request of that key out of the trajectory log. The optional limits are enforced
per serving process (`serving.limits`, 429 with `Retry-After` past them); a key without them is unlimited.
Create a key and its entry:

    python -m serving.auth new-key --name team-search      # prints the key once, and the JSON entry

With no key configured, /v1 is open and a warning is logged (as vLLM does). The admin token comes from an
environment variable; without it the adapter endpoints are disabled.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from foundation.errors import ConfigError
from serving.limits import KeyLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    name: str | None  # None: the endpoint is open (no keys configured)
    shadow_log: bool = True
    limits: KeyLimits | None = None  # None: unlimited


ANONYMOUS = Caller(None, True)


class KeyEntry(KeyLimits):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    shadow_log: bool = True

    @property
    def limits(self) -> KeyLimits:
        return KeyLimits(requests_per_minute=self.requests_per_minute, tokens_per_minute=self.tokens_per_minute,
                         tokens_per_day=self.tokens_per_day)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> KeysFile:
        for field in ("name", "sha256"):
            values = [getattr(k, field) for k in self.keys]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"duplicate key {field}s: {dupes}")
        return self


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class KeyStore:
    """Maps a presented key to its `Caller`; `is_open` when no key is configured."""

    def __init__(self, entries: list[KeyEntry]):
        self._entries = list(entries)

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        try:
            return cls(KeysFile.model_validate_json(Path(path).read_text()).keys)
        except OSError as exc:
            raise ConfigError(f"api_keys_file {path}: {exc}") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "file"
            raise ConfigError(f"api_keys_file {path}: {where}: {first['msg']}") from exc

    @classmethod
    def single(cls, key: str, name: str = "dev") -> KeyStore:
        return cls([KeyEntry(name=name, sha256=hash_key(key))])

    @classmethod
    def open(cls) -> KeyStore:
        return cls([])

    @property
    def is_open(self) -> bool:
        return not self._entries

    def caller(self, key: str | None) -> Caller | None:
        """The caller for `key`, ANONYMOUS when open, None when the key is missing or unknown."""
        if self.is_open:
            return ANONYMOUS
        if not key:
            return None
        digest = hash_key(key)
        match = None
        for entry in self._entries:  # compare every entry in constant time; no early exit
            if hmac.compare_digest(entry.sha256, digest):
                match = entry
        return Caller(match.name, match.shadow_log, match.limits) if match else None


class AdminToken:
    def __init__(self, token: str | None):
        self._digest = hash_key(token) if token else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, presented: str | None) -> bool:
        return bool(self._digest and presented and hmac.compare_digest(self._digest, hash_key(presented)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.auth", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("new-key", help="generate a key; print it once and its keys-file entry")
    new.add_argument("--name", required=True)
    new.add_argument("--no-shadow-log", action="store_true", help="keep this caller out of the trajectory log")
    for limit in KeyLimits.model_fields:
        new.add_argument("--" + limit.replace("_", "-"), type=int, default=None, help="optional limit (per key)")
    args = parser.parse_args(argv)
    key = "sd-" + secrets.token_urlsafe(32)
    limits = {k: getattr(args, k) for k in KeyLimits.model_fields}
    entry = KeyEntry(name=args.name, sha256=hash_key(key), shadow_log=not args.no_shadow_log, **limits)
    print(f"key (shown once): {key}")
    print(json.dumps(entry.model_dump(exclude_none=True)))


if __name__ == "__main__":
    main()
