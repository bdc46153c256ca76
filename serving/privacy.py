"""Callers' data, protected before a trajectory leaves serving: the secret salt of caller and user hashes, and
the redaction hook that keeps trajectories matching a configured pattern out of the log.

The salt. Caller (API key name) and end-user (`user`) ids reach the log only as salted sha256 hashes, so the
salt is what keeps them from being reversed: key names and user ids are guessable, a hash without the salt is
not. There is no default salt. `resolve_caller_salt` takes, in order: `$caller_salt_env` if set; else the salt
file (`caller_salt_file`, default `$SHADOW_DISTILL_HOME/serving/caller_salt`), created 0600 with a random salt
the first time and refused when others can read it; in `dev_mode` only, a random salt that lives as long as the
process (hashes then change at every restart, fine for a laptop, useless for per-caller accounting). Every
replica must read the same salt (one secret, or one file on shared storage), or one caller gets one hash per
replica.

Redaction. `Withholder` runs named regexes (`ServingConfig.redact_patterns`, e.g. e-mail addresses and phone
numbers) over a trajectory's prompt and completion text before it is submitted. A match withholds the whole
trajectory: it never leaves the process, and `/metrics` counts it per pattern. It is not half-redacted, because
a trajectory carries its text twice: as texts for reviewers and as the token ids the trainer learns from. Masking
the texts would leave the same characters in the ids; rewriting the ids would break the behaviour logprobs,
which belong to the ids that were sampled. The texts are checked whether or not `log_texts` keeps them in the
trajectory, for the same reason.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from foundation.errors import ConfigError
from serving.config import ServingConfig

log = logging.getLogger(__name__)
SALT_BYTES = 32
MIN_SALT_CHARS = 16


def default_salt_file() -> Path:
    from model_runtime.models import home

    return home() / "serving" / "caller_salt"


PLACEHOLDER_PREFIX = "change-me"  # what infra/.env.example ships for every secret


def resolve_caller_salt(config: ServingConfig, environ: Mapping[str, str] = os.environ) -> str:
    """The salt of caller and user hashes (see the module docstring for the order); never a constant."""
    salt = environ.get(config.caller_salt_env)
    if salt:
        if len(salt) < MIN_SALT_CHARS:
            raise ConfigError(f"${config.caller_salt_env} has {len(salt)} characters; a caller salt needs at "
                              f"least {MIN_SALT_CHARS} (it is all that keeps caller ids from being guessed)")
        if salt.lower().startswith(PLACEHOLDER_PREFIX):
            raise ConfigError(f"${config.caller_salt_env} is still the {PLACEHOLDER_PREFIX}... placeholder of "
                              "infra/.env.example: a published salt reverses caller ids; set a random one")
        return salt
    if config.dev_mode and config.caller_salt_file is None:
        log.warning("dev_mode: caller hashes use a random salt of this process; they change at every restart")
        return secrets.token_hex(SALT_BYTES)
    return read_or_create_salt(config.caller_salt_file or default_salt_file())


def read_or_create_salt(path: Path) -> str:
    """The salt in `path`; when the file is missing, a new random one, written 0600 (its folder 0700)."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_salt(path)
    except OSError as exc:
        raise ConfigError(f"caller_salt_file {path}: cannot create it: {exc.strerror or exc}") from None
    salt = secrets.token_hex(SALT_BYTES)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
    log.info("created a random caller salt in %s (keep it: caller hashes depend on it)", path)
    return salt


def _read_salt(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"caller_salt_file {path} is accessible to other users (mode {stat.S_IMODE(mode):o}); "
                          "chmod 600 it")
    salt = path.read_text().strip()
    if len(salt) < MIN_SALT_CHARS:
        raise ConfigError(f"caller_salt_file {path} holds {len(salt)} characters; a caller salt needs at least "
                          f"{MIN_SALT_CHARS}")
    return salt


class Withholder:
    """Which configured patterns a trajectory's texts match; reports every withheld trajectory's patterns."""

    def __init__(self, patterns: Mapping[str, str], on_withheld: Callable[[list[str]], None] | None = None):
        self.patterns = {name: re.compile(regex) for name, regex in patterns.items()}
        self.on_withheld = on_withheld

    def withhold(self, *texts: str) -> bool:
        """True (and reported) when a pattern occurs in one of `texts`: the trajectory must not be logged."""
        matched = [name for name, rx in self.patterns.items() if any(rx.search(t) for t in texts)]
        if matched and self.on_withheld is not None:
            self.on_withheld(matched)
        return bool(matched)
