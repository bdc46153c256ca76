"""Which logprobs a vLLM server returns, found out by asking it, and a sink that refuses trajectories it mislabels.

The trajectory contract (schemas/trajectory.py) says a `sampled` logprob is the token's logprob under the
distribution it was drawn from (after temperature, top-k, top-p). vLLM returns that only when started with
`--logprobs-mode processed_logprobs`; its default, `raw_logprobs`, returns the model's own logprobs whatever the
temperature. Nothing in a completion says which mode produced it, and for `T == 1` without truncation the two
agree, so a server started with the wrong flag breaks the contract silently for exactly the other requests.

The probe (`probe_logprob_mode`) asks two questions about one distribution, the next token after a fixed prompt:
1. a completion of one token at temperature `PROBE_TEMPERATURE` (0.5, no truncation) with the top-k logprobs;
2. the same prompt followed by the token sampled in 1 as a prompt, with `prompt_logprobs`: its last position
   is that distribution as the model has it (vLLM documents prompt logprobs as raw in every mode).
Differences of two tokens' logprobs cancel the normaliser: processed logprobs differ by 1/T times what the raw
ones do, raw logprobs by exactly as much. The ratio over the widest pair of top-k tokens decides; values that
are not a distribution (their exp sums past 1) are logits (`*_logits` modes). It reads the mode, not the
engine's internals, so it cannot tell `processed_logprobs` from a server that is right for another reason.

`TrajectoryKindGuard` wraps the shadow log's sink: until the probe says `processed_logprobs`, a trajectory whose
logprobs would be mislabelled is refused (counted, logged once per reason) instead of logged. Greedy choices
(`raw` kind) and untruncated temperature-1 choices (where raw and processed agree) are logged in every mode.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence

from schemas.trajectory import TrajectoryV1

log = logging.getLogger(__name__)

PROCESSED = "processed_logprobs"
PROBE_TEMPERATURE = 0.5
PROBE_TOP = 5
PROBE_SEED = 20250601
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MIN_SPREAD = 1e-3  # raw logprob difference below which the ratio says nothing (a flat distribution)
LOGSUMEXP_SLACK = 1e-3


def logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def classify(served: dict[int, float], raw: dict[int, float], temperature: float) -> tuple[str, str]:
    """(mode, evidence) from the top-k logprobs served at `temperature` and the raw ones of the same position."""
    common = sorted(set(served) & set(raw), key=lambda t: raw[t])
    if len(common) < 2:
        return "unknown", f"the served and raw top-{PROBE_TOP} share {len(common)} token(s)"
    low, high = common[0], common[-1]
    spread_raw = raw[high] - raw[low]
    if spread_raw < MIN_SPREAD:
        return "unknown", f"the probe distribution is flat (raw spread {spread_raw:.2g})"
    ratio = (served[high] - served[low]) / spread_raw
    scaled = abs(ratio - 1 / temperature) < abs(ratio - 1)
    normalised = logsumexp(list(served.values())) <= LOGSUMEXP_SLACK
    mode = ("processed" if scaled else "raw") + ("_logprobs" if normalised else "_logits")
    return mode, (f"at T={temperature:g} served logprob differences are {ratio:.3f} x the raw ones "
                  f"(processed: {1 / temperature:g}, raw: 1); top-{len(served)} exp-sum "
                  f"{math.exp(logsumexp(list(served.values()))):.3f}")


def probe_requests(prompt: list[int], model: str) -> tuple[dict, Callable[[int], dict]]:
    """The two `/v1/completions` bodies of the probe; the second needs the token the first sampled."""
    first = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": PROBE_TEMPERATURE, "top_p": 1.0,
             "top_k": -1, "min_p": 0.0, "seed": PROBE_SEED, "n": 1, "logprobs": PROBE_TOP,
             "return_tokens_as_token_ids": True}

    def second(token: int) -> dict:
        return {"model": model, "prompt": [*prompt, token], "max_tokens": 1, "temperature": 0.0, "n": 1,
                "prompt_logprobs": PROBE_TOP, "return_tokens_as_token_ids": True}

    return first, second


class LogprobMode:
    """What the probe found: `mode` (processed_logprobs, raw_logprobs, ..., unknown) and why. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.mode, self.evidence = "unknown", "not probed yet"

    def set(self, mode: str, evidence: str) -> None:
        with self._lock:
            changed = (mode, evidence) != (self.mode, self.evidence)
            self.mode, self.evidence = mode, evidence
        if not changed:
            return
        if mode == PROCESSED:
            log.info("vLLM logprob mode: %s (%s)", mode, evidence)
        else:
            log.error("vLLM logprob mode is %s, not %s (%s): trajectories sampled at T != 1 or truncated are NOT "
                      "logged; restart vLLM with --logprobs-mode %s", mode, PROCESSED, evidence, PROCESSED)

    @property
    def trusted(self) -> bool:
        return self.mode == PROCESSED

    def refusal(self) -> str | None:
        """Why sampled logprobs cannot be logged now; None when they can."""
        if self.trusted:
            return None
        return (f"vLLM logprob mode is {self.mode} ({self.evidence}); start vLLM with --logprobs-mode {PROCESSED}")

    def health(self) -> dict:
        with self._lock:
            mode, evidence = self.mode, self.evidence
        refusal = None if mode == PROCESSED else self.refusal()
        return {"logprob_mode": mode, "logprob_mode_evidence": evidence,
                "trajectory_logging": "ok" if refusal is None else f"refused for T != 1 or truncated: {refusal}"}


def mislabelled(traj: TrajectoryV1) -> bool:
    """True when a `sampled` trajectory's logprobs are right only under processed logprobs."""
    return traj.logprob_kind == "sampled" and not traj.sampling.is_untruncated_temperature_one


class TrajectoryKindGuard:
    """A `TrajectorySink` in front of another: refuses what the upstream's logprob mode would mislabel."""

    def __init__(self, sink, mode: LogprobMode):
        self.sink, self.mode = sink, mode
        self._lock = threading.Lock()
        self.refused = 0
        self._last_reason: str | None = None

    def submit(self, traj: TrajectoryV1) -> None:
        reason = self.mode.refusal()
        if reason is None or not mislabelled(traj):
            self.sink.submit(traj)
            return
        with self._lock:
            self.refused += 1
            first = reason != self._last_reason
            self._last_reason = reason
        if first:  # once per reason, not once per request
            log.error("shadow log: refusing trajectories sampled at T != 1 or truncated: %s", reason)

    def stats(self) -> dict:
        return {**self.sink.stats(), "refused_logprob_mode": self.refused}

    def close(self, timeout_s: float = 10.0) -> None:
        self.sink.close(timeout_s)
