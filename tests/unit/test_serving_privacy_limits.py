"""The caller salt (no public default: an env var, else a 0600 file created with a random salt, else in dev_mode
a random per-process one), the redaction matcher, the keys file's limits, and the per-key rate limiter on a
fake clock. Pure logic; the server-level behaviour is in tests/integration/test_serving_protection.py."""

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from foundation.errors import ConfigError
from serving.auth import KeyStore, hash_key
from serving.config import ServingConfig
from serving.limits import Grant, KeyLimits, RateLimiter, Refusal
from serving.privacy import Withholder, resolve_caller_salt

ENV = "SHADOW_DISTILL_CALLER_SALT"


def config(**kwargs) -> ServingConfig:
    return ServingConfig(model_dir=Path("/m"), **kwargs)


# ---- the caller salt -------------------------------------------------------------------------------------------------


def test_the_salt_variable_wins_when_set(tmp_path):
    assert resolve_caller_salt(config(caller_salt_file=tmp_path / "salt"), {ENV: "s" * 16}) == "s" * 16


def test_a_short_salt_variable_is_refused():
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_caller_salt(config(), {ENV: "short"})


def test_the_published_placeholder_salt_of_env_example_is_refused():
    with pytest.raises(ConfigError, match="placeholder"):
        resolve_caller_salt(config(), {ENV: "change-me-caller-salt"})


def test_without_the_variable_a_random_salt_is_created_in_the_salt_file(tmp_path):
    salt = resolve_caller_salt(config(caller_salt_file=tmp_path / "salt"), {})
    assert (tmp_path / "salt").read_text().strip() == salt


def test_the_created_salt_file_is_private(tmp_path):
    resolve_caller_salt(config(caller_salt_file=tmp_path / "salt"), {})
    assert stat.S_IMODE((tmp_path / "salt").stat().st_mode) == 0o600


def test_the_salt_file_is_read_again_at_the_next_start(tmp_path):
    first = resolve_caller_salt(config(caller_salt_file=tmp_path / "salt"), {})
    assert resolve_caller_salt(config(caller_salt_file=tmp_path / "salt"), {}) == first


def test_two_servers_without_a_configured_salt_never_share_one(tmp_path):
    one = resolve_caller_salt(config(caller_salt_file=tmp_path / "a"), {})
    assert resolve_caller_salt(config(caller_salt_file=tmp_path / "b"), {}) != one


def test_the_default_salt_file_lives_under_the_shadow_distill_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SHADOW_DISTILL_HOME", str(tmp_path))
    salt = resolve_caller_salt(config(), {})
    assert (tmp_path / "serving" / "caller_salt").read_text().strip() == salt


def test_a_salt_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "salt"
    path.write_text("x" * 64)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        resolve_caller_salt(config(caller_salt_file=path), {})


def test_dev_mode_hashes_with_a_random_salt_of_the_process_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SHADOW_DISTILL_HOME", str(tmp_path))
    salts = {resolve_caller_salt(config(dev_mode=True), {}) for _ in range(2)}
    assert (len(salts), list(tmp_path.iterdir())) == (2, [])


# ---- redaction -------------------------------------------------------------------------------------------------------

PATTERNS = {"email": r"[\w.+-]+@[\w-]+\.[\w.]+", "phone": r"\+?\d[\d ()-]{7,}\d"}


def test_a_text_with_an_email_is_withheld_and_reported_under_its_pattern():
    seen = []
    withheld = Withholder(PATTERNS, on_withheld=seen.append).withhold("write to ann@example.org", "ok")
    assert (withheld, seen) == (True, [["email"]])


def test_a_clean_text_is_not_withheld():
    assert Withholder(PATTERNS).withhold("hello there", "general kenobi") is False


def test_the_completion_is_checked_too():
    assert Withholder(PATTERNS).withhold("call me", "+44 20 7946 0958") is True


@pytest.mark.parametrize("patterns, needle", [({"email": "("}, "not a regex"), ({"bad name": "x"}, "pattern name")])
def test_bad_patterns_are_refused_at_configuration(patterns, needle):
    with pytest.raises(ValueError, match=needle):
        config(redact_patterns=patterns)


def test_patterns_can_come_as_json_from_a_flag():
    assert config(redact_patterns=json.dumps(PATTERNS)).redact_patterns == PATTERNS


# ---- keys file limits ------------------------------------------------------------------------------------------------


def test_the_keys_file_carries_per_key_limits(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "sha256": hash_key("key-a-0001"), "requests_per_minute": 5,
                                          "tokens_per_day": 1000}]}))
    assert KeyStore.from_file(path).caller("key-a-0001").limits == KeyLimits(requests_per_minute=5,
                                                                             tokens_per_day=1000)


def test_a_zero_limit_is_a_config_error(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "sha256": hash_key("key-a-0001"), "requests_per_minute": 0}]}))
    with pytest.raises(ConfigError, match="requests_per_minute"):
        KeyStore.from_file(path)


# ---- the rate limiter ------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0
        self.day = datetime(2026, 3, 1, 23, 0, tzinfo=UTC)

    def __call__(self) -> float:
        return self.t

    def utc(self) -> datetime:
        return self.day + timedelta(seconds=self.t - 1000.0)


def limiter(replicas: int = 1) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(replicas, clock=clock, utc_now=clock.utc), clock


RPM3 = KeyLimits(requests_per_minute=3)


def outcomes(lim: RateLimiter, limits: KeyLimits, n: int, tokens: int = 1) -> list[str]:
    return ["ok" if isinstance(lim.admit("k", limits, tokens), Grant) else "429" for _ in range(n)]


def test_a_key_may_burst_to_its_requests_per_minute_then_is_refused():
    assert outcomes(limiter()[0], RPM3, 4) == ["ok", "ok", "ok", "429"]


def test_the_refusal_says_when_a_request_fits_again():
    lim, _ = limiter()
    outcomes(lim, RPM3, 3)
    refusal = lim.admit("k", RPM3, 1)
    assert (refusal.type, refusal.code, refusal.retry_after) == ("requests", "rate_limit_exceeded", "20")


def test_after_retry_after_the_request_is_admitted():
    lim, clock = limiter()
    outcomes(lim, RPM3, 3)
    clock.t += lim.admit("k", RPM3, 1).retry_after_s
    assert isinstance(lim.admit("k", RPM3, 1), Grant)


def test_a_refused_request_takes_nothing():
    lim, clock = limiter()
    outcomes(lim, RPM3, 5)  # 3 admitted, 2 refused
    clock.t += 20.0  # one request's worth refilled
    assert outcomes(lim, RPM3, 2) == ["ok", "429"]


def test_each_of_n_replicas_enforces_a_nth_of_the_limit():
    assert outcomes(limiter(replicas=3)[0], KeyLimits(requests_per_minute=6), 3) == ["ok", "ok", "429"]


def test_other_keys_have_their_own_buckets():
    lim, _ = limiter()
    outcomes(lim, RPM3, 3)
    assert isinstance(lim.admit("other", RPM3, 1), Grant)


def test_a_key_without_limits_is_never_refused():
    assert outcomes(limiter()[0], KeyLimits(), 100) == ["ok"] * 100


TPM = KeyLimits(tokens_per_minute=100)


def test_a_request_reserves_its_worst_case_tokens():
    lim, _ = limiter()
    lim.admit("k", TPM, 80)
    assert isinstance(lim.admit("k", TPM, 30), Refusal)


def test_unused_reserved_tokens_go_back_once_answered():
    lim, _ = limiter()
    lim.admit("k", TPM, 80).settle(20)
    assert isinstance(lim.admit("k", TPM, 70), Grant)


def test_a_request_larger_than_the_bucket_runs_when_the_bucket_is_full_and_leaves_a_debt():
    lim, _ = limiter()
    lim.admit("k", TPM, 500).settle(300)
    refusal = lim.admit("k", TPM, 10)
    # 100 reserved of 100, 300 used: the bucket is at -200; 10 more need 210 tokens at 100/60 per second.
    assert (refusal.type, refusal.retry_after) == ("tokens", "126")


DAY = KeyLimits(tokens_per_day=50)


def test_the_daily_quota_refuses_once_used_up_with_openais_insufficient_quota():
    lim, _ = limiter()
    lim.admit("k", DAY, 40).settle(60)
    refusal = lim.admit("k", DAY, 1)
    assert (refusal.type, refusal.code) == ("insufficient_quota", "insufficient_quota")


def test_the_daily_quota_says_to_retry_at_utc_midnight():
    lim, _ = limiter()  # the clock starts at 23:00 UTC
    lim.admit("k", DAY, 40).settle(60)
    assert lim.admit("k", DAY, 1).retry_after == "3600"


def test_the_daily_quota_renews_at_utc_midnight():
    lim, clock = limiter()
    lim.admit("k", DAY, 40).settle(60)
    clock.t += 3600
    assert isinstance(lim.admit("k", DAY, 1), Grant)
