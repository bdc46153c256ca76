"""The embedded engine: one worker thread that batches concurrent requests onto a transformers+peft model.

Why a single thread: the model, its KV caches and the peft adapter table are only ever touched by it, so an
adapter swap (queued by the API or the watcher) is applied *between* batches and no request sees a half-
loaded adapter. Requests queue up; the worker takes whole requests (all `n` rows of one request run in one
batch, under one adapter) until `max_batch_size` rows or `batch_wait_ms` have passed, and runs them through
`model_runtime.sampling.sample`, which already mixes per-row decoding parameters and records the logprob of
each token; rows of different adapters share the batch through peft's per-row `adapter_names`. Background
(mirrored) requests run only when no client request waits. Top-logprob alternatives (opt-in) are read from one scoring pass over the finished
rows, with `model_runtime.logprobs.completion_logits` and the same logit processing as sampling; prompt
logprobs (vLLM's `prompt_logprobs`, opt-in) from one pass over the prompt, under the model's own distribution.

    engine = EmbeddedEngine.from_dir(student_dir, max_batch_size=8)
    job = engine.submit([RowRequest(prompt_ids, DecodeParams(max_tokens=32))])
    print(job.future.result().rows[0].completion_ids)
    engine.set_adapter(AdapterInfo("3", adapter_dir)).result()          # the default adapter (the champion)
    engine.load_named_adapter(AdapterInfo("4", candidate_dir)).result()  # resident beside it
    engine.submit(rows, adapter="4", background=True)                   # a mirrored request, yielding to clients
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from model_runtime.logprobs import completion_logits
from model_runtime.models import ModelMeta, eos_token_ids, load_model, load_tokenizer, pick_device
from model_runtime.sampling import DecodeParams, SampleResult, process_logits, sample, suppress_stops
from serving.detokenize import StopMatcher
from serving.engine_base import (
    AdapterInfo,
    EngineObserver,
    GenerationJob,
    GenerationOutput,
    PromptLogprobs,
    RowRequest,
    RowResult,
    TokenCallback,
)
from foundation.errors import AdapterError, ConfigError, EngineError, ShadowDistillError

log = logging.getLogger(__name__)


class AdapterTable:
    """The base model and its resident LoRA adapters: the default one (what the served model name runs; None =
    the base) and named ones beside it. Only the worker thread calls its methods.

    All adapters live in one peft model under internal names; a batch that mixes adapters runs in one forward
    pass with peft's per-row `adapter_names` ("__base__" for a row on the bare base). With no adapter resident
    the LoRA layers are removed (`unload`), so the base runs at full speed."""

    BASE = "__base__"

    def __init__(self, base: torch.nn.Module):
        self.base = base
        self.peft = None
        self.default: AdapterInfo | None = None
        self.named: dict[str, AdapterInfo] = {}
        self._peft_names: dict[str | None, str] = {}  # None: the default slot; else a named adapter's name
        self._counter = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.peft if self.peft is not None else self.base

    def set_default(self, adapter: AdapterInfo | None) -> None:
        self._set(None, adapter)
        self.default = adapter

    def set_named(self, adapter: AdapterInfo) -> None:
        self._set(adapter.version, adapter)
        self.named[adapter.version] = adapter

    def drop_named(self, name: str) -> None:
        if name not in self.named:
            raise EngineError(f"no adapter named {name!r} is loaded")
        self._set(name, None)
        del self.named[name]

    def version_of(self, key: str | None) -> str | None:
        """The version a job's adapter key runs (None: the base)."""
        if key is None:
            return self.default.version if self.default else None
        if key not in self.named:
            raise EngineError(f"no adapter named {key!r} is loaded")
        return key

    def forward_kwargs(self, keys: Sequence[str | None]) -> dict:
        """peft's `adapter_names` for rows whose jobs chose these adapter keys (empty with no adapter loaded)."""
        if self.peft is None:
            return {}
        for key in set(keys):
            self.version_of(key)  # raises for a named adapter unloaded since the job was queued
        return {"adapter_names": [self._peft_names.get(k, self.BASE) for k in keys]}

    def _set(self, slot: str | None, adapter: AdapterInfo | None) -> None:
        """Put `adapter` into `slot` (None: remove it); on failure the table is as it was."""
        old = self._peft_names.get(slot)
        if adapter is None:
            if old is not None:
                self._delete(old)
                del self._peft_names[slot]
            return
        self._counter += 1
        name = f"adapter_{self._counter}"  # peft names become module keys (no dots); versions stay beside them
        try:
            self._load(name, adapter)
        except Exception as exc:  # peft raises many types for a bad folder; keep serving what was there
            self._drop_partial(name)
            raise AdapterError(f"cannot load adapter {adapter.version!r} from {adapter.path}: {exc}") from exc
        self._peft_names[slot] = name
        if old is not None:
            self._delete(old)

    def _load(self, name: str, adapter: AdapterInfo) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(adapter.path), adapter_name=name).eval()
        else:
            self.peft.load_adapter(str(adapter.path), adapter_name=name)

    def _delete(self, name: str) -> None:
        if len(self.peft.peft_config) == 1:
            self.base = self.peft.unload()  # the last adapter: remove the LoRA layers without merging them
            self.peft = None
        else:
            if self.peft.active_adapter == name:  # peft refuses to delete the active one: activate another
                self.peft.set_adapter(next(n for n in self.peft.peft_config if n != name))
            self.peft.delete_adapter(name)

    def _drop_partial(self, name: str) -> None:
        if self.peft is not None and name in self.peft.peft_config:
            self._delete(name)


class EmbeddedEngine:
    kind = "embedded"

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, base_model_id: str, *,
                 max_model_len: int | None = None, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 background_idle_ms: float = 20.0, observer: EngineObserver | None = None):
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        model_limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        if max_model_len is not None and model_limit is not None and max_model_len > model_limit:
            raise ConfigError(f"max_model_len={max_model_len} exceeds the model's {model_limit} positions")
        self.tokenizer = tokenizer
        self.base_model_id = base_model_id
        self.max_model_len = max_model_len or model_limit or 2048
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        # Background work runs alone only after this long without a client job: closed-loop clients resubmit a
        # few ms after their answers, and a mirrored generation started in that gap would hold all of them.
        self.background_idle_s = background_idle_ms / 1000.0
        self.observer = observer
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id
        self._adapters = AdapterTable(model)
        self._jobs: deque[GenerationJob] = deque()
        self._background: deque[GenerationJob] = deque()  # mirrored work: taken only when no client job waits
        self._ops: deque[tuple[str, Callable[[], None], Future]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_dir(cls, model_dir: Path, device: str = "auto", **kwargs) -> EmbeddedEngine:
        meta = ModelMeta.read(model_dir)
        model = load_model(model_dir, pick_device(device))
        return cls(model, load_tokenizer(model_dir), meta.model_id, **kwargs)

    # ------------------------------------------------------------------------------------ public, any thread

    def active_adapter(self) -> AdapterInfo | None:
        return self._adapters.default

    def named_adapters(self) -> dict[str, AdapterInfo]:
        return dict(self._adapters.named)

    def submit(self, rows: Sequence[RowRequest], on_token: TokenCallback | None = None, *,
               adapter: str | None = None, background: bool = False) -> GenerationJob:
        job = GenerationJob(list(rows), on_token, adapter=adapter, background=background)
        with self._cond:
            if not self.is_alive():
                raise EngineError(f"engine is not running ({self._failed or 'closed'})")
            if adapter is not None and adapter not in self._adapters.named:
                raise EngineError(f"no adapter named {adapter!r} is loaded")
            (self._background if background else self._jobs).append(job)
            self._cond.notify()
        return job

    def set_adapter(self, adapter: AdapterInfo | None) -> Future:
        what = f"default adapter {adapter.version if adapter else 'none (base)'}"
        return self._queue_op(what, lambda: self._adapters.set_default(adapter))

    def load_named_adapter(self, adapter: AdapterInfo) -> Future:
        return self._queue_op(f"named adapter {adapter.version}", lambda: self._adapters.set_named(adapter))

    def unload_named_adapter(self, name: str) -> Future:
        return self._queue_op(f"unloading named adapter {name}", lambda: self._adapters.drop_named(name))

    def _queue_op(self, what: str, op: Callable[[], None]) -> Future:
        """Adapter changes run on the worker thread, between batches: no request sees a half-loaded adapter."""
        done: Future = Future()
        with self._cond:
            if not self.is_alive():
                raise EngineError(f"engine is not running ({self._failed or 'closed'})")
            self._ops.append((what, op, done))
            self._cond.notify()
        return done

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._closing and self._failed is None

    def queue_depth(self) -> int:
        return len(self._jobs)

    def background_depth(self) -> int:
        return len(self._background)

    def close(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # ------------------------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._jobs or self._background or self._ops or self._closing):
                        self._cond.wait()
                    if self._closing and not self._jobs:
                        break
                self._apply_adapter_ops()
                batch = self._take_batch()
                if batch:
                    self._run_batch(batch)
        except BaseException as exc:  # the thread must not die silently: /health reports it
            self._failed = exc
            log.exception("engine worker died")
        finally:
            self._fail_pending(self._failed or EngineError("engine closed"))

    def _apply_adapter_ops(self) -> None:
        while True:
            with self._cond:
                if not self._ops:
                    return
                what, op, done = self._ops.popleft()
            try:
                op()
                log.info("serving: %s", what)
                done.set_result(None)
            except Exception as exc:  # a failed swap keeps the old adapters and must not end the worker
                log.error("%s failed: %s", what, exc)
                done.set_exception(exc if isinstance(exc, ShadowDistillError) else AdapterError(str(exc)))

    def _take_batch(self) -> list[GenerationJob]:
        """Client jobs first, filling a batch for up to `batch_wait_ms`. Background jobs never delay a client: they
        ride along in the free rows of a client batch when they are no longer than its rows (`max_tokens`), and
        run on their own only when no client job has arrived for `background_idle_ms`, without waiting for more
        (a client arriving meanwhile waits at most that one batch)."""
        batch: list[GenerationJob] = []
        rows = 0
        deadline = time.monotonic() + self.batch_wait_s
        with self._cond:
            while True:
                rows += self._fill(batch, self._jobs, rows)
                remaining = deadline - time.monotonic()
                full = rows >= self.max_batch_size or (self._jobs and batch)
                if not batch and not self._jobs and self._background and not self._closing:
                    if not self._cond.wait_for(lambda: self._jobs or self._ops or self._closing,
                                               self.background_idle_s):
                        self._fill(batch, self._background, 0)
                        return batch
                    deadline = time.monotonic() + self.batch_wait_s  # a client came: fill its batch as usual
                    continue
                if not batch or full or remaining <= 0 or self._ops or self._closing:
                    if batch and rows < self.max_batch_size:
                        longest = max(r.params.max_tokens for job in batch for r in job.rows)
                        self._fill(batch, self._background, rows, max_tokens=longest)
                    return batch
                self._cond.wait(remaining)

    def _fill(self, batch: list[GenerationJob], queue: deque[GenerationJob], rows: int,
              max_tokens: int | None = None) -> int:
        """Move whole jobs from `queue` into `batch` while they fit (and, with `max_tokens`, are no longer than
        that); return the rows added."""
        added = 0
        while queue and (not batch or rows + added + len(queue[0].rows) <= self.max_batch_size):
            if max_tokens is not None and any(r.params.max_tokens > max_tokens for r in queue[0].rows):
                break
            job = queue.popleft()
            if job.cancelled:
                job.future.cancel()
                continue
            batch.append(job)
            added += len(job.rows)
        return added

    def _run_batch(self, batch: list[GenerationJob]) -> None:
        batch = self._runnable(batch)
        if not batch:
            return
        owners = [(job, i) for job in batch for i in range(len(job.rows))]
        rows = [job.rows[i] for job, i in owners]
        keys = [job.adapter for job, _ in owners]
        model, kwargs = self._adapters.model, self._adapters.forward_kwargs(keys)
        started = time.perf_counter()
        try:
            results = sample(model, [r.prompt_ids for r in rows], [r.params for r in rows], eos_ids=self.eos_ids,
                             pad_id=self.pad_id, stop_check=self._stop_check(owners, rows),
                             on_token=self._on_token(owners), model_kwargs=kwargs)
            alternatives = self._alternatives(model, rows, results, keys)
            prompt_logprobs = self._prompt_logprobs(model, rows, keys)
        except Exception as exc:  # one bad batch fails its requests, not the server
            log.exception("batch of %d rows failed", len(rows))
            for job in batch:
                job.future.set_exception(EngineError(f"generation failed: {exc}"))
            return
        tokens, seconds = sum(len(r.completion_ids) for r in results), time.perf_counter() - started
        if self.observer is not None:
            self.observer.on_batch(len(rows), tokens, seconds)
        by_job: dict[int, list[RowResult]] = {id(job): [] for job in batch}
        for (job, _), row, res, alt, plp in zip(owners, rows, results, alternatives, prompt_logprobs, strict=True):
            by_job[id(job)].append(_row_result(res, row.params, alt, plp))
        for job in batch:
            if not job.future.cancelled():
                job.future.set_result(GenerationOutput(by_job[id(job)], self._adapters.version_of(job.adapter),
                                                       seconds))

    def _runnable(self, batch: list[GenerationJob]) -> list[GenerationJob]:
        """The jobs whose named adapter is still loaded (one unloaded since it was queued fails alone)."""
        keep = []
        for job in batch:
            try:
                self._adapters.version_of(job.adapter)
                keep.append(job)
            except EngineError as exc:
                job.future.set_exception(exc)
        return keep

    def _stop_check(self, owners, rows):
        matchers = [StopMatcher(self.tokenizer, r.stop, r.skip_special_tokens) for r in rows]

        def check(b: int, ids: list[int]) -> bool:
            return owners[b][0].cancelled or matchers[b](ids)

        return check

    @staticmethod
    def _on_token(owners):
        if not any(job.on_token for job, _ in owners):
            return None

        def on_token(b: int, token_id: int, logprob: float) -> None:
            job, i = owners[b]
            if job.on_token is not None:
                job.on_token(i, token_id, logprob)

        return on_token

    @torch.no_grad()
    def _alternatives(self, model, rows: list[RowRequest], results: list[SampleResult], keys: list[str | None]):
        """Top-k of the distribution each token was drawn from (raw for greedy), for rows that asked."""
        out: list[list[list[tuple[int, float]]] | None] = [None] * len(rows)
        for b, (row, res) in enumerate(zip(rows, results, strict=True)):
            if not row.top_logprobs or not res.completion_ids:
                continue
            cl = completion_logits(model, [row.prompt_ids], [res.completion_ids], self.pad_id,
                                   self._adapters.forward_kwargs([keys[b]]))
            per_token = []
            for j, logits_V in enumerate(cl.logits_BCV[0, : len(res.completion_ids)]):
                logp_V = _behaviour_distribution(logits_V, row.params, j, self.eos_ids)
                top = torch.topk(logp_V, min(row.top_logprobs, logp_V.shape[-1]))
                per_token.append([(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)
                                  if torch.isfinite(v)])
            out[b] = per_token
        return out

    @torch.no_grad()
    def _prompt_logprobs(self, model, rows: list[RowRequest], keys: list[str | None]) -> list[PromptLogprobs | None]:
        """vLLM's `prompt_logprobs` for rows that asked, one scoring pass per distinct prompt and adapter."""
        out: list[PromptLogprobs | None] = [None] * len(rows)
        done: dict[tuple[tuple[int, ...], int, str | None], PromptLogprobs] = {}
        for b, row in enumerate(rows):
            if row.prompt_logprobs is None:
                continue
            key = (row.prompt_ids, row.prompt_logprobs, keys[b])
            if key not in done:
                done[key] = self._score_prompt(model, row.prompt_ids, row.prompt_logprobs, keys[b])
            out[b] = done[key]
        return out

    def _score_prompt(self, model, prompt: tuple[int, ...], k: int, key: str | None) -> PromptLogprobs:
        """None for position 0 (nothing predicts it), then the top-k and the prompt's own token, with ranks."""
        if len(prompt) < 2:
            return [None]
        cl = completion_logits(model, [prompt[:1]], [prompt[1:]], self.pad_id, self._adapters.forward_kwargs([key]))
        entries: PromptLogprobs = [None]
        for tok, logits_V in zip(prompt[1:], cl.logits_BCV[0, : len(prompt) - 1], strict=True):
            logp_V = torch.log_softmax(logits_V.float(), dim=-1)
            top = torch.topk(logp_V, min(k, logp_V.shape[-1]))
            entry = {int(i): (float(v), rank) for rank, (v, i) in enumerate(zip(top.values, top.indices,
                                                                                strict=True), start=1)}
            own = float(logp_V[tok])
            entry.setdefault(tok, (own, int((logp_V > own).sum()) + 1))
            entries.append(entry)
        return entries

    def _fail_pending(self, exc: BaseException) -> None:
        with self._cond:
            jobs, ops = list(self._jobs) + list(self._background), list(self._ops)
            self._jobs.clear()
            self._background.clear()
            self._ops.clear()
        error = exc if isinstance(exc, ShadowDistillError) else EngineError(f"engine stopped: {exc}")
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        for _, _, done in ops:
            done.set_exception(error)


def _behaviour_distribution(logits_V: torch.Tensor, params: DecodeParams, generated: int,
                            eos_ids: set[int]) -> torch.Tensor:
    """The distribution whose logprobs are logged at completion position `generated`: the one sampled from
    (stop tokens masked under `min_tokens`, then processed), or the model's own when greedy (`raw`)."""
    if params.temperature == 0:
        return torch.log_softmax(logits_V.float(), dim=-1)
    return process_logits(suppress_stops(logits_V, params, generated, eos_ids), params)


def _row_result(res: SampleResult, params: DecodeParams, alternatives, prompt_logprobs) -> RowResult:
    kind, logprobs = res.behaviour(params.temperature)
    return RowResult(list(res.completion_ids), list(logprobs), kind, res.finish_reason, alternatives,
                     prompt_logprobs)
