"""What the serving logic needs from an engine, whichever runs the model (embedded or a vLLM server).

The API layer tokenizes, validates and builds rows of token ids; an engine turns rows into sampled token ids
with the logprob of each token under the distribution it was drawn from, and says which adapter version
produced them. All rows of one `submit` run in one batch, so a request never mixes two adapter versions.

The interface is thread-based (`concurrent.futures.Future`) so that the adapter watcher (a thread) and the
asyncio API layer (`asyncio.wrap_future`) can both use it. `on_token` is called from the engine's own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence, Set
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from model_runtime.sampling import DecodeParams
from serving.detokenize import TextRule

TokenCallback = Callable[[int, int, float], None]
"""(row index within the submitted rows, token id, logprob as logged), called as each token is sampled."""


PromptLogprobs = list[dict[int, tuple[float, int]] | None]
"""Per prompt position: None for the first, else {token id: (logprob, rank)} for the top-k and the prompt's own
token (vLLM's `prompt_logprobs`, the model's own distribution)."""


@dataclass(frozen=True)
class RowRequest:
    """One choice to generate."""

    prompt_ids: tuple[int, ...]
    params: DecodeParams
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0  # alternatives to report per token; 0: none
    include_stop_str: bool = False  # vLLM's include_stop_str_in_output
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # top-k of every prompt position; None: not asked for

    def text_rule(self, eos_ids: Set[int]) -> TextRule:
        """How this choice's ids become its text (stop strings, stop tokens, special tokens)."""
        return TextRule(self.stop, self.include_stop_str, self.skip_special_tokens, self.params.stop_ids(eos_ids))


@dataclass
class RowResult:
    """One generated choice. `logprobs[j]` belongs to `completion_ids[j]` and is of kind `logprob_kind`."""

    completion_ids: list[int]
    logprobs: list[float]
    logprob_kind: str  # "sampled" | "raw" (see model_runtime.sampling.SampleResult.behaviour)
    finish_reason: str  # "stop" | "length"
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (token id, logprob), best first
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class GenerationOutput:
    rows: list[RowResult]
    adapter_version: str | None  # the adapter every row ran under (None: the base)
    generation_s: float | None = None  # time the engine spent on the batch (not queueing); None: not measured


@dataclass(frozen=True)
class AdapterInfo:
    version: str
    path: Path


@dataclass
class GenerationJob:
    """A submitted request: its future result and a flag that ends its rows early (client went away)."""

    rows: Sequence[RowRequest]
    on_token: TokenCallback | None = None
    adapter: str | None = None  # a named adapter, or None for the default one
    background: bool = False  # mirrored work: yields to client work
    future: Future = field(default_factory=Future)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Engine(Protocol):
    """Adapters, as vLLM's multi-LoRA has them: the *default* adapter (the champion; None = the base) answers
    requests for the served model name, and *named* adapters resident beside it (a candidate in shadow, one loaded
    by hand through /v1/load_lora_adapter) answer requests that name them. Rows of different adapters may share
    a batch; every row's result says which adapter produced it."""

    kind: str  # "embedded" | "vllm"
    base_model_id: str
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    eos_ids: set[int]  # end a row unless it ignores EOS

    def active_adapter(self) -> AdapterInfo | None:
        """The default adapter (None: the base)."""
        ...

    def named_adapters(self) -> dict[str, AdapterInfo]:
        """The named adapters resident beside the default one, by name (= their version)."""
        ...

    def submit(self, rows: Sequence[RowRequest], on_token: TokenCallback | None = None, *,
               adapter: str | None = None, background: bool = False) -> GenerationJob:
        """Generate `rows` under the default adapter, or under the named adapter `adapter` (EngineError when it
        is not resident). `background` work (a mirrored shadow request) yields: it runs only when no client
        work is waiting, so it never delays a client request by more than the batch already running."""
        ...

    def set_adapter(self, adapter: AdapterInfo | None) -> Future:
        """Make `adapter` the default (None: the base) from the next batch on; the future fails if it cannot load."""
        ...

    def load_named_adapter(self, adapter: AdapterInfo) -> Future:
        """Make `adapter` resident under its version as name (replacing one of that name); fails if it cannot."""
        ...

    def unload_named_adapter(self, name: str) -> Future:
        """Drop the named adapter `name` (EngineError when there is none)."""
        ...

    def is_alive(self) -> bool: ...

    def close(self, timeout_s: float = 10.0) -> None: ...


class EngineObserver(Protocol):
    """Receives per-batch facts (metrics); called from the engine thread, must be cheap."""

    def on_batch(self, rows: int, generated_tokens: int, seconds: float) -> None: ...
