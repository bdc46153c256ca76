"""The embedded engine: one worker thread that batches concurrent requests onto a transformers+peft model.

Why a single thread: the model, its KV caches and the peft adapter table are only ever touched by it, so an
adapter swap (queued by the API or the watcher) is applied *between* batches and no request sees a half-
loaded adapter. Requests queue up; the worker takes whole requests (all `n` rows of one request run in one
batch, hence under one adapter version) until `max_batch_size` rows or `batch_wait_ms` have passed, and runs
them through `model_runtime.sampling.sample`, which already mixes per-row decoding parameters and records the
logprob of each token. Top-logprob alternatives (opt-in) are read from one scoring pass over the finished
rows, with `model_runtime.logprobs.completion_logits` and the same logit processing as sampling; prompt
logprobs (vLLM's `prompt_logprobs`, opt-in) from one pass over the prompt, under the model's own distribution.

    engine = EmbeddedEngine.from_dir(student_dir, max_batch_size=8)
    job = engine.submit([RowRequest(prompt_ids, DecodeParams(max_tokens=32))])
    print(job.future.result().rows[0].completion_ids)
    engine.set_adapter(AdapterInfo("3", adapter_dir)).result()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
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


class AdapterSlot:
    """The base model and at most one active LoRA adapter; only the worker thread calls its methods."""

    def __init__(self, base: torch.nn.Module):
        self.base = base
        self.peft = None
        self.active: AdapterInfo | None = None
        self._name: str | None = None
        self._counter = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.peft if self.peft is not None else self.base

    def set(self, adapter: AdapterInfo | None) -> None:
        if adapter is None:
            self.clear()
            return
        from peft import PeftModel

        # peft adapter names become module keys (no dots); the version string is kept beside them.
        self._counter += 1
        name = f"adapter_{self._counter}"
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(adapter.path), adapter_name=name).eval()
            else:
                self.peft.load_adapter(str(adapter.path), adapter_name=name)
                self.peft.set_adapter(name)
        except Exception as exc:  # peft raises many types for a bad folder; keep serving the old adapter
            self._drop_partial(name)
            raise AdapterError(f"cannot load adapter {adapter.version!r} from {adapter.path}: {exc}") from exc
        if self._name is not None:
            self.peft.delete_adapter(self._name)
        self._name, self.active = name, adapter

    def clear(self) -> None:
        if self.peft is not None:
            self.base = self.peft.unload()  # removes the LoRA layers without merging them
        self.peft, self.active, self._name = None, None, None

    def _drop_partial(self, name: str) -> None:
        if self.peft is None:
            return
        if name in self.peft.peft_config:
            self.peft.delete_adapter(name)
        if self._name is not None:
            self.peft.set_adapter(self._name)


class EmbeddedEngine:
    kind = "embedded"

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, base_model_id: str, *,
                 max_model_len: int | None = None, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 observer: EngineObserver | None = None):
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
        self.observer = observer
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id
        self._slot = AdapterSlot(model)
        self._jobs: deque[GenerationJob] = deque()
        self._ops: deque[tuple[AdapterInfo | None, Future]] = deque()
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
        return self._slot.active

    def submit(self, rows: Sequence[RowRequest], on_token: TokenCallback | None = None) -> GenerationJob:
        job = GenerationJob(list(rows), on_token)
        with self._cond:
            if not self.is_alive():
                raise EngineError(f"engine is not running ({self._failed or 'closed'})")
            self._jobs.append(job)
            self._cond.notify()
        return job

    def set_adapter(self, adapter: AdapterInfo | None) -> Future:
        done: Future = Future()
        with self._cond:
            if not self.is_alive():
                raise EngineError(f"engine is not running ({self._failed or 'closed'})")
            self._ops.append((adapter, done))
            self._cond.notify()
        return done

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._closing and self._failed is None

    def queue_depth(self) -> int:
        return len(self._jobs)

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
                    while not (self._jobs or self._ops or self._closing):
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
                adapter, done = self._ops.popleft()
            try:
                self._slot.set(adapter)
                log.info("serving adapter %s", adapter.version if adapter else "none (base)")
                done.set_result(None)
            except Exception as exc:  # a failed swap keeps the old adapter and must not end the worker
                log.error("adapter swap to %s failed: %s", adapter.version if adapter else "base", exc)
                done.set_exception(exc if isinstance(exc, ShadowDistillError) else AdapterError(str(exc)))

    def _take_batch(self) -> list[GenerationJob]:
        batch: list[GenerationJob] = []
        rows = 0
        deadline = time.monotonic() + self.batch_wait_s
        with self._cond:
            while True:
                while self._jobs and (not batch or rows + len(self._jobs[0].rows) <= self.max_batch_size):
                    job = self._jobs.popleft()
                    if job.cancelled:
                        job.future.cancel()
                        continue
                    batch.append(job)
                    rows += len(job.rows)
                remaining = deadline - time.monotonic()
                full = rows >= self.max_batch_size or (self._jobs and batch)
                if not batch or full or remaining <= 0 or self._ops or self._closing:
                    return batch
                self._cond.wait(remaining)

    def _run_batch(self, batch: list[GenerationJob]) -> None:
        owners = [(job, i) for job in batch for i in range(len(job.rows))]
        rows = [job.rows[i] for job, i in owners]
        model, version = self._slot.model, self._slot.active.version if self._slot.active else None
        started = time.perf_counter()
        try:
            results = sample(model, [r.prompt_ids for r in rows], [r.params for r in rows], eos_ids=self.eos_ids,
                             pad_id=self.pad_id, stop_check=self._stop_check(owners, rows),
                             on_token=self._on_token(owners))
            alternatives = self._alternatives(model, rows, results)
            prompt_logprobs = self._prompt_logprobs(model, rows)
        except Exception as exc:  # one bad batch fails its requests, not the server
            log.exception("batch of %d rows failed", len(rows))
            for job in batch:
                job.future.set_exception(EngineError(f"generation failed: {exc}"))
            return
        tokens = sum(len(r.completion_ids) for r in results)
        if self.observer is not None:
            self.observer.on_batch(len(rows), tokens, time.perf_counter() - started)
        by_job: dict[int, list[RowResult]] = {id(job): [] for job in batch}
        for (job, _), row, res, alt, plp in zip(owners, rows, results, alternatives, prompt_logprobs, strict=True):
            by_job[id(job)].append(_row_result(res, row.params, alt, plp))
        for job in batch:
            if not job.future.cancelled():
                job.future.set_result(GenerationOutput(by_job[id(job)], version))

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
    def _alternatives(self, model, rows: list[RowRequest], results: list[SampleResult]):
        """Top-k of the distribution each token was drawn from (raw for greedy), for rows that asked."""
        out: list[list[list[tuple[int, float]]] | None] = [None] * len(rows)
        for b, (row, res) in enumerate(zip(rows, results, strict=True)):
            if not row.top_logprobs or not res.completion_ids:
                continue
            cl = completion_logits(model, [row.prompt_ids], [res.completion_ids], self.pad_id)
            per_token = []
            for j, logits_V in enumerate(cl.logits_BCV[0, : len(res.completion_ids)]):
                logp_V = _behaviour_distribution(logits_V, row.params, j, self.eos_ids)
                top = torch.topk(logp_V, min(row.top_logprobs, logp_V.shape[-1]))
                per_token.append([(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)
                                  if torch.isfinite(v)])
            out[b] = per_token
        return out

    @torch.no_grad()
    def _prompt_logprobs(self, model, rows: list[RowRequest]) -> list[PromptLogprobs | None]:
        """vLLM's `prompt_logprobs` for rows that asked, one scoring pass per distinct prompt."""
        out: list[PromptLogprobs | None] = [None] * len(rows)
        done: dict[tuple[tuple[int, ...], int], PromptLogprobs] = {}
        for b, row in enumerate(rows):
            if row.prompt_logprobs is None:
                continue
            key = (row.prompt_ids, row.prompt_logprobs)
            if key not in done:
                done[key] = self._score_prompt(model, row.prompt_ids, row.prompt_logprobs)
            out[b] = done[key]
        return out

    def _score_prompt(self, model, prompt: tuple[int, ...], k: int) -> PromptLogprobs:
        """None for position 0 (nothing predicts it), then the top-k and the prompt's own token, with ranks."""
        if len(prompt) < 2:
            return [None]
        cl = completion_logits(model, [prompt[:1]], [prompt[1:]], self.pad_id)
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
            jobs, ops = list(self._jobs), list(self._ops)
            self._jobs.clear()
            self._ops.clear()
        error = exc if isinstance(exc, ShadowDistillError) else EngineError(f"engine stopped: {exc}")
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        for _, done in ops:
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
