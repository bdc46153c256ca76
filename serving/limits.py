"""Per-API-key rate limits and token quotas, with OpenAI's 429 answers and a `Retry-After` header.

Limits are set per key in the keys file (`serving.auth.KeyEntry`: `requests_per_minute`, `tokens_per_minute`,
`tokens_per_day`); a key without them, and the open endpoint, are not limited. They are enforced per serving
process: with `ServingConfig.rate_limit_replicas = N`, each process enforces 1/N of every limit, so N replicas
behind a load balancer together allow the configured numbers (without it, N replicas allow N times them).

Per minute, a token bucket refills continuously (OpenAI's own model): a key may burst up to its limit, then
waits. Tokens are prompt plus completion tokens, as in `usage`. Before generation a request reserves its worst
case, the prompt tokens plus every choice's `max_tokens` (capped at the bucket's size, so one large request
still fits a full bucket); once answered, the unused part goes back. The daily quota (UTC days) admits a request
while the day's usage is under it and then counts what the request used, so a day may end at most one request
over. A refused request never reaches the engine: everything that was answered is also logged.

    limiter = RateLimiter(replicas=1)
    grant = limiter.admit("team", KeyLimits(requests_per_minute=60), tokens=120)   # a Grant, or a Refusal
    grant.settle(used_tokens)                                                     # after the answer
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

SECONDS_PER_MINUTE = 60.0


class KeyLimits(BaseModel):
    """One key's limits (None: unlimited), as the keys file spells them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.tokens_per_day))


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused and when to retry: OpenAI's 429 `error.type` / `error.code`."""

    type: str  # "requests" | "tokens" | "insufficient_quota"
    code: str  # "rate_limit_exceeded" | "insufficient_quota"
    message: str
    retry_after_s: float

    @property
    def retry_after(self) -> str:
        """The `Retry-After` header: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass
class Bucket:
    """A token bucket of `capacity`, refilled at `capacity` per minute; its level may go below 0 (debt)."""

    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        rate = self.capacity / SECONDS_PER_MINUTE
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_s(self, need: float) -> float:
        """Seconds until `need` is available (0 when it is)."""
        return max(0.0, (need - self.level) / (self.capacity / SECONDS_PER_MINUTE))


@dataclass
class DailyQuota:
    limit: float
    day: str = ""
    used: float = 0.0

    def roll(self, today: str) -> None:
        if today != self.day:
            self.day, self.used = today, 0.0


@dataclass
class KeyState:
    requests: Bucket | None
    tokens: Bucket | None
    daily: DailyQuota | None


@dataclass
class Grant:
    """An admitted request; `settle(used)` charges what it really used (once). Without a limiter: unlimited."""

    limiter: RateLimiter | None = None
    key: str | None = None
    reserved: float = 0.0
    settled: bool = field(default=False)

    def settle(self, used_tokens: int | None = None) -> None:
        """Charge `used_tokens` instead of the reservation (None: keep the whole reservation charged)."""
        if self.settled or self.limiter is None:
            return
        self.settled = True
        self.limiter.settle(self.key, self.reserved, self.reserved if used_tokens is None else used_tokens)


class RateLimiter:
    """Every limited key's buckets and quota in this process; thread-safe."""

    def __init__(self, replicas: int = 1, clock: Callable[[], float] = time.monotonic,
                 utc_now: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.replicas = replicas
        self.clock, self.utc_now = clock, utc_now
        self._keys: dict[str, KeyState] = {}
        self._lock = threading.Lock()

    def admit(self, key: str | None, limits: KeyLimits | None, tokens: int) -> Grant | Refusal:
        """Admit a request of at most `tokens` tokens for `key`, or say why not; nothing is taken on refusal."""
        if key is None or limits is None or not limits.any:
            return Grant()  # settles nothing
        with self._lock:
            state = self._state(key, limits)
            now, today = self.clock(), self.utc_now().date().isoformat()
            for bucket in (state.requests, state.tokens):
                if bucket is not None:
                    bucket.refill(now)
            need = min(float(tokens), state.tokens.capacity) if state.tokens else 0.0
            refusal = self._refusal(state, need, today)
            if refusal is not None:
                return refusal
            if state.requests is not None:
                state.requests.level -= 1
            if state.tokens is not None:
                state.tokens.level -= need
            return Grant(self, key, need)

    def settle(self, key: str, reserved: float, used: float) -> None:
        with self._lock:
            state = self._keys[key]
            if state.tokens is not None:
                state.tokens.level += reserved - used
            if state.daily is not None:
                state.daily.roll(self.utc_now().date().isoformat())
                state.daily.used += used

    def _state(self, key: str, limits: KeyLimits) -> KeyState:
        if key not in self._keys:
            now = self.clock()

            def share(limit: int | None) -> float | None:
                return None if limit is None else max(1.0, limit / self.replicas)

            rpm, tpm, tpd = (share(v) for v in (limits.requests_per_minute, limits.tokens_per_minute,
                                                limits.tokens_per_day))
            self._keys[key] = KeyState(None if rpm is None else Bucket(rpm, rpm, now),
                                       None if tpm is None else Bucket(tpm, tpm, now),
                                       None if tpd is None else DailyQuota(tpd))
        return self._keys[key]

    def _refusal(self, state: KeyState, need: float, today: str) -> Refusal | None:
        if state.daily is not None:
            state.daily.roll(today)
            if state.daily.used >= state.daily.limit:
                midnight = datetime.fromisoformat(today).replace(tzinfo=UTC) + timedelta(days=1)
                return Refusal("insufficient_quota", "insufficient_quota",
                               f"You exceeded this key's daily token quota ({state.daily.limit:.0f} tokens per UTC "
                               "day on this server); it renews at 00:00 UTC.",
                               (midnight - self.utc_now()).total_seconds())
        if state.requests is not None and state.requests.level < 1:
            wait = state.requests.wait_s(1)
            return Refusal("requests", "rate_limit_exceeded",
                           f"Rate limit reached for requests per minute (limit {state.requests.capacity:.0f}). "
                           f"Please try again in {wait:.1f}s.", wait)
        if state.tokens is not None and state.tokens.level < need:
            wait = state.tokens.wait_s(need)
            return Refusal("tokens", "rate_limit_exceeded",
                           f"Rate limit reached for tokens per minute (limit {state.tokens.capacity:.0f}, "
                           f"requested {need:.0f}). Please try again in {wait:.1f}s.", wait)
        return None
