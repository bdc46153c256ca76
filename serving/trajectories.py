"""Build one `TrajectoryV1` per generated choice, and the sink protocol that ships them.

The trajectory is the contract with the rest of the platform (schemas/trajectory.py, DESIGN.md): token ids
exactly as sampled, one behaviour logprob per completion token with its kind, the adapter version that
produced it, and the sampling parameters. The caller is recorded as a salted sha256 of the API key's *name*,
never of the key.

A sink's `submit` never blocks and never raises (the request path calls it); the Kafka sink is
`serving.shadow_log.ShadowLogger`. `MemorySink` keeps trajectories in memory, for tests and dry runs:

    sink = MemorySink()
    app = build_app(config, engine, sink=sink)      # every logged choice lands in sink.items
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from pydantic import ValidationError

from model_runtime.sampling import DecodeParams
from schemas.trajectory import SamplingParams, TrajectoryV1
from serving.engine_base import RowResult

log = logging.getLogger(__name__)


@runtime_checkable
class TrajectorySink(Protocol):
    def submit(self, traj: TrajectoryV1) -> None:
        """Queue one trajectory; never blocks, never raises."""
        ...

    def stats(self) -> dict:
        """Counters (numbers) exported on /metrics, e.g. sent, spooled, dropped."""
        ...

    def close(self, timeout_s: float = 10.0) -> None: ...


class MemorySink:
    """Keeps every submitted trajectory in a list (thread-safe); `max_items` bounds memory in dry runs."""

    def __init__(self, max_items: int | None = None):
        self.max_items = max_items
        self.items: list[TrajectoryV1] = []
        self.dropped = 0
        self.closed = False
        self._lock = threading.Lock()

    def submit(self, traj: TrajectoryV1) -> None:
        with self._lock:
            if self.max_items is not None and len(self.items) >= self.max_items:
                self.dropped += 1
                return
            self.items.append(traj)

    def stats(self) -> dict:
        with self._lock:
            return {"submitted": len(self.items) + self.dropped, "stored": len(self.items), "dropped": self.dropped}

    def close(self, timeout_s: float = 10.0) -> None:
        self.closed = True

    def by_request(self, request_id: str) -> list[TrajectoryV1]:
        with self._lock:
            return sorted((t for t in self.items if t.request_id == request_id), key=lambda t: t.choice_index)


def caller_hash(key_name: str | None, salt: str) -> str | None:
    """sha256(salt, name) hex: stable per caller, useless to anyone without the salt. None when anonymous."""
    if key_name is None:
        return None
    return hashlib.sha256(f"{salt}\x00{key_name}".encode()).hexdigest()


def sampling_params(params: DecodeParams) -> SamplingParams:
    return SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                          max_tokens=params.max_tokens, seed=params.seed)


def build_trajectory(*, request_id: str, choice_index: int, caller: str | None, base_model_id: str,
                     adapter_version: str | None, params: DecodeParams, prompt_ids: Sequence[int],
                     result: RowResult, prompt_text: str | None, completion_text: str | None,
                     created_at: datetime | None = None) -> TrajectoryV1:
    return TrajectoryV1(
        trajectory_id=uuid.uuid4().hex,
        request_id=request_id,
        choice_index=choice_index,
        created_at=created_at or datetime.now(UTC),
        caller_hash=caller,
        base_model_id=base_model_id,
        adapter_version=adapter_version,
        sampling=sampling_params(params),
        prompt_token_ids=list(prompt_ids),
        completion_token_ids=list(result.completion_ids),
        behaviour_logprobs=list(result.logprobs),
        logprob_kind=result.logprob_kind,
        finish_reason=result.finish_reason,
        prompt_text=prompt_text,
        completion_text=completion_text,
    )


def submit_all(sink: TrajectorySink, trajectories: Sequence[dict]) -> int:
    """Build and submit trajectories from keyword dicts; a choice that breaks the contract is logged, skipped.

    Returns how many were submitted. Building is here (not in the request handler) so it can run after the
    response is sent.
    """
    sent = 0
    for fields in trajectories:
        try:
            traj = build_trajectory(**fields)
        except ValidationError as exc:
            log.error("trajectory for request %s choice %s breaks the contract: %s",
                      fields.get("request_id"), fields.get("choice_index"), exc)
            continue
        sink.submit(traj)
        sent += 1
    return sent
