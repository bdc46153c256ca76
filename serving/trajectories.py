"""Build one trajectory (schema v2) per generated choice, and the sink protocol that ships them.

The trajectory is the contract with the rest of the platform (schemas/trajectory.py, DESIGN.md): token ids
exactly as sampled, one behaviour logprob per completion token with its kind, the adapter version that
produced it, and the sampling parameters. Version 2 adds what a teacher with another tokenizer re-renders the
choice from: the prompt's kind (chat or raw text), the chat request's messages and template switches
(`ChatPrompt`), and the text the completion tokens spell with each token's character offset
(`model_runtime.xtok.token_offsets`, the decoding the cross-tokenizer scorer checks them against). The caller is recorded as a salted sha256 of the API key's *name*,
never of the key; the end user (`user`) as a salted sha256 scoped to that key, never in clear. `TrajectoryLog`
builds a request's trajectories after its response is sent and runs the redaction hook on them first
(`serving.privacy.Withholder`: a trajectory whose text matches a pattern never leaves the process).

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
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from foundation.errors import AlignmentError
from model_runtime.sampling import DecodeParams
from model_runtime.tokenizers import decode_as_rendered
from model_runtime.xtok import token_offsets
from schemas.trajectory import ChatMessage, SamplingParams, Trajectory, TrajectoryV2
from serving.engine_base import RowRequest, RowResult
from serving.privacy import Withholder

log = logging.getLogger(__name__)


@runtime_checkable
class TrajectorySink(Protocol):
    def submit(self, traj: Trajectory) -> None:
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
        self.items: list[Trajectory] = []
        self.dropped = 0
        self.closed = False
        self._lock = threading.Lock()

    def submit(self, traj: Trajectory) -> None:
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

    def by_request(self, request_id: str) -> list[Trajectory]:
        with self._lock:
            return sorted((t for t in self.items if t.request_id == request_id), key=lambda t: t.choice_index)


def caller_hash(key_name: str | None, salt: str) -> str | None:
    """sha256(salt, name) hex: stable per caller, useless to anyone without the salt. None when anonymous."""
    if key_name is None:
        return None
    return hashlib.sha256(f"{salt}\x00{key_name}".encode()).hexdigest()


def user_hash(key_name: str | None, user: str | None, salt: str) -> str | None:
    """sha256(salt, "user", key name, user) hex: the end user's id scoped to the API key that names it (two keys'
    "user-1" are two users), in a domain of its own (never equal to a caller hash). None without a user."""
    if user is None:
        return None
    return hashlib.sha256(f"{salt}\x00user\x00{key_name or ''}\x00{user}".encode()).hexdigest()


def sampling_params(params: DecodeParams) -> SamplingParams:
    """The trajectory's record of how a choice was decoded, every distribution-changing extra included."""
    return SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                          max_tokens=params.max_tokens, seed=params.seed, min_p=params.min_p,
                          min_tokens=params.min_tokens, ignore_eos=params.ignore_eos)


@dataclass(frozen=True)
class ChatPrompt:
    """How a chat request's prompt was rendered: its messages and the template switches (vLLM's names)."""

    messages: tuple[ChatMessage, ...]
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @classmethod
    def of(cls, messages: Sequence[dict], add_generation_prompt: bool = True,
           continue_final_message: bool = False) -> ChatPrompt:
        return cls(tuple(ChatMessage(**m) for m in messages), add_generation_prompt, continue_final_message)


@dataclass(frozen=True)
class CompletionTexts:
    """What a choice's tokens spell (a final stop token left out), with each token's character end offset."""

    text: str
    offsets: list[int]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, completion_ids: Sequence[int], stop_ids: Set[int]
           ) -> CompletionTexts | None:
        stop = bool(completion_ids) and completion_ids[-1] in stop_ids
        text_ids = list(completion_ids[:-1] if stop else completion_ids)
        try:
            spelled = token_offsets(tokenizer, text_ids)
        except AlignmentError as exc:  # cannot happen for ids the model sampled; the message must still go out
            log.warning("no character offsets for a completion: %s", exc)
            return None
        return cls(spelled.text, [*spelled.ends, *([len(spelled.text)] if stop else [])])


def build_trajectory(*, request_id: str, choice_index: int, caller: str | None, base_model_id: str,
                     adapter_version: str | None, params: DecodeParams, prompt_ids: Sequence[int],
                     result: RowResult, prompt_text: str | None, completion: CompletionTexts | None = None,
                     chat: ChatPrompt | None = None, log_messages: bool = True, created_at: datetime | None = None,
                     user: str | None = None, shadow: bool = False) -> TrajectoryV2:
    """One choice's v2 message; `chat` None means a completions-API (raw text) prompt."""
    return TrajectoryV2(
        trajectory_id=uuid.uuid4().hex,
        request_id=request_id,
        choice_index=choice_index,
        created_at=created_at or datetime.now(UTC),
        caller_hash=caller,
        user_hash=user,
        base_model_id=base_model_id,
        adapter_version=adapter_version,
        sampling=sampling_params(params),
        prompt_token_ids=list(prompt_ids),
        completion_token_ids=list(result.completion_ids),
        behaviour_logprobs=list(result.logprobs),
        logprob_kind=result.logprob_kind,
        finish_reason=result.finish_reason,
        shadow=shadow,
        prompt_kind="text" if chat is None else "chat",
        messages=list(chat.messages) if chat is not None and log_messages else None,
        add_generation_prompt=True if chat is None else chat.add_generation_prompt,
        continue_final_message=False if chat is None else chat.continue_final_message,
        prompt_text=prompt_text,
        completion_text=None if completion is None else completion.text,
        completion_offsets=None if completion is None else completion.offsets,
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


class TrajectoryLog:
    """Turns one answered request into its trajectories, after its response: hashes, texts, redaction, submit."""

    def __init__(self, sink: TrajectorySink, tokenizer: PreTrainedTokenizerBase, base_model_id: str, salt: str,
                 *, log_texts: bool = True, eos_ids: set[int] = frozenset(), withholder: Withholder | None = None):
        self.sink, self.tokenizer, self.base_model_id, self.salt = sink, tokenizer, base_model_id, salt
        self.log_texts, self.eos_ids = log_texts, eos_ids
        self.withholder = withholder or Withholder({})
        self.forgotten: set[str] = set()  # caller and user hashes erased on request: nothing of theirs is logged

    def forget(self, caller_name: str, user: str | None = None) -> tuple[str, str]:
        """Stop logging a caller (or one end user of that caller's key) and return ("caller"|"user", its hash),
        the hash `shadow-distill store forget` erases from the store. This process stops at once; the store drops
        whatever still arrives for the hash (another replica, a spool replaying), so the erasure holds."""
        subject, digest = ("user", user_hash(caller_name, user, self.salt)) if user is not None else \
            ("caller", caller_hash(caller_name, self.salt))
        self.forgotten.add(digest)
        return subject, digest

    def task(self, request_id: str, caller_name: str | None, end_user: str | None, rows: Sequence[RowRequest],
             results: Sequence[RowResult], adapter_version: str | None, *, chat: ChatPrompt | None = None,
             shadow: bool = False) -> Callable[[], None]:
        """A callable that builds and submits one trajectory per choice not withheld (run it after the response).
        `chat`: the chat request's messages (None: a completions-API prompt). `shadow`: the answers of a
        candidate mirrored on this request (never returned, never trained on)."""
        created = datetime.now(UTC)

        def task() -> None:
            hashes = {"caller": caller_hash(caller_name, self.salt),
                      "user": user_hash(caller_name, end_user, self.salt), "shadow": shadow}
            if {hashes["caller"], hashes["user"]} & self.forgotten:
                return
            fields = [self._fields(request_id, k, row, res, adapter_version, created, {**hashes, "chat": chat})
                      for k, (row, res) in enumerate(zip(rows, results, strict=True))]
            submit_all(self.sink, [f for f in fields if f is not None])

        return task

    def _fields(self, request_id: str, k: int, row: RowRequest, res: RowResult, adapter_version: str | None,
                created: datetime, hashes: dict) -> dict | None:
        """One choice's trajectory fields, or None when its text matches a redaction pattern (withheld).

        The withholder reads the texts whether or not they are logged; `log_texts=False` leaves every text (the
        messages included) out of the message, and a cross-tokenizer scorer decodes the ids instead."""
        prompt_text = completion = None
        if self.log_texts or self.withholder.patterns:
            prompt_text = decode_as_rendered(self.tokenizer, row.prompt_ids)
            if self.withholder.withhold(prompt_text, decode_as_rendered(self.tokenizer, res.completion_ids)):
                return None
            if self.log_texts:
                completion = CompletionTexts.of(self.tokenizer, res.completion_ids, row.params.stop_ids(self.eos_ids))
        return dict(request_id=request_id, choice_index=k, base_model_id=self.base_model_id,
                    adapter_version=adapter_version, params=row.params, prompt_ids=row.prompt_ids, result=res,
                    prompt_text=prompt_text if self.log_texts else None, completion=completion,
                    log_messages=self.log_texts, created_at=created, **hashes)
