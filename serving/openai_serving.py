"""Serving logic shared by chat and completions: model names, limits, rows, engine calls, logging choices.

Like vLLM's `OpenAIServing`, methods return an `ErrorResponse` instead of raising for anything a client did
wrong; the router turns it into the right 4xx. Sampling parameters become one `RowRequest` per choice (`n`
per prompt); every choice gets a concrete seed (the request's seed + choice index, or a random one), which is
recorded in its trajectory so any logged choice can be regenerated (seeds are taken mod 2^63).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from pydantic import BaseModel

from model_runtime.sampling import DecodeParams
from serving.auth import Caller
from serving.config import ServingConfig
from serving.detokenize import IncrementalText, final_text, token_text
from serving.engine_base import Engine, GenerationOutput, RowRequest
from serving.protocol import (
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    UsageInfo,
    error_response,
)
from serving.trajectories import TrajectorySink, caller_hash, submit_all
from foundation.errors import ShadowDistillError

log = logging.getLogger(__name__)
SEED_MODULUS = 2**63
SSE_DONE = "data: [DONE]\n\n"
TokenEvent = tuple[int, int, float]  # (row, token id, logprob)
Alternatives = list[tuple[int, float]] | None


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class ChunkRenderer(Protocol):
    """Turns stream events into SSE lines in the route's own chunk format (chat or completions)."""

    def opening(self) -> list[str]: ...

    def token(self, row: int, delta: str, token_id: int, logprob: float, alternatives: Alternatives) -> str | None:
        ...

    def finish(self, row: int, delta: str, finish_reason: str, fingerprint: str) -> str: ...

    def usage(self, usage: UsageInfo) -> str: ...


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    caller: Caller
    shadow_log: bool  # False: X-Shadow-Log: off, or the key opted out


@dataclass(frozen=True)
class Completed:
    """A finished non-streaming answer, and what to run once it is sent (logging its trajectories)."""

    body: BaseModel
    after: Callable[[], None] | None


@dataclass
class Plan:
    """Rows to generate for one request; `rows[k]` is choice k, generated from `prompts[k // n]`."""

    prompts: list[list[int]]
    rows: list[RowRequest]
    n: int


class OpenAIServing:
    def __init__(self, engine: Engine, config: ServingConfig, sink: TrajectorySink | None, caller_salt: str):
        self.engine = engine
        self.config = config
        self.sink = sink
        self.caller_salt = caller_salt
        self.tokenizer = engine.tokenizer
        self.vocab_size = len(engine.tokenizer)

    @property
    def served_model_name(self) -> str:
        return self.config.served_model_name or self.engine.base_model_id

    # ---------------------------------------------------------------------------------------- models

    def check_model(self, name: str) -> ErrorResponse | None:
        adapter = self.engine.active_adapter()
        if name == self.served_model_name or (adapter is not None and name == adapter.version):
            return None
        return error_response(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def model_list(self) -> ModelList:
        adapter = self.engine.active_adapter()
        version = adapter.version if adapter else None
        cards = [ModelCard(id=self.served_model_name, root=self.engine.base_model_id,
                           max_model_len=self.engine.max_model_len, adapter_version=version)]
        if adapter is not None:
            cards.append(ModelCard(id=adapter.version, root=str(adapter.path), parent=self.served_model_name,
                                   max_model_len=self.engine.max_model_len, adapter_version=version))
        return ModelList(data=cards)

    # ---------------------------------------------------------------------------------------- planning

    def check_prompt_ids(self, ids: Sequence[int], param: str) -> ErrorResponse | None:
        if not ids:
            return error_response(400, "the prompt is empty after tokenization", param=param, code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            return error_response(400, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                                  param=param, code="invalid_value")
        return None

    def plan(self, req: SamplingFields, prompts: list[list[int]], prompt_param: str) -> Plan | ErrorResponse:
        cfg = self.config
        if req.n > cfg.max_n:
            return error_response(400, f"n={req.n} exceeds this server's limit of {cfg.max_n}", param="n",
                                  code="invalid_value")
        if req.n * len(prompts) > cfg.max_choices:
            return error_response(400, f"{req.n} x {len(prompts)} prompts = {req.n * len(prompts)} choices "
                                       f"exceeds this server's limit of {cfg.max_choices}", param="n",
                                  code="invalid_value")
        alternatives = req.alternatives
        if alternatives > cfg.max_top_logprobs:
            return error_response(400, f"{alternatives} top logprobs exceed this server's limit of "
                                       f"{cfg.max_top_logprobs}", param="top_logprobs", code="invalid_value")
        requested = req.requested_max_tokens
        if requested is not None and requested > cfg.max_tokens_limit:
            return error_response(400, f"max_tokens={requested} exceeds this server's limit of "
                                       f"{cfg.max_tokens_limit}", param="max_tokens", code="invalid_value")
        base_seed = req.seed if req.seed is not None else secrets.randbits(62)
        rows = []
        for p, prompt in enumerate(prompts):
            max_tokens = self._max_tokens(len(prompt), requested, prompt_param)
            if isinstance(max_tokens, ErrorResponse):
                return max_tokens
            for i in range(req.n):
                params = DecodeParams(
                    max_tokens=max_tokens,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=max(req.top_k or 0, 0),
                    seed=(base_seed + p * req.n + i) % SEED_MODULUS,
                )
                rows.append(RowRequest(tuple(prompt), params, req.stop_strings, alternatives))
        return Plan(prompts, rows, req.n)

    def _max_tokens(self, prompt_len: int, requested: int | None, param: str) -> int | ErrorResponse:
        limit = self.engine.max_model_len
        room = limit - prompt_len
        if room < 1 or (requested is not None and requested > room):
            asked = f"{prompt_len} in the prompt" + (f" + {requested} in the completion" if requested else "")
            return error_response(400, f"This model's maximum context length is {limit} tokens. However, you "
                                       f"requested {asked}.", param=param, code="context_length_exceeded")
        return requested if requested is not None else min(self.config.default_max_tokens, room)

    # ---------------------------------------------------------------------------------------- generation

    def engine_error(self, exc: BaseException) -> ErrorResponse:
        if not self.engine.is_alive():
            return error_response(503, f"the engine is not running: {exc}", code="engine_unavailable")
        if self.engine.kind == "vllm":
            return error_response(502, f"upstream vLLM server failed: {exc}", code="upstream_error")
        log.error("generation failed: %s", exc)
        return error_response(500, f"generation failed: {exc}", code="internal_error")

    async def generate(self, rows: Sequence[RowRequest]) -> GenerationOutput | ErrorResponse:
        try:
            job = self.engine.submit(rows)
        except ShadowDistillError as exc:
            return self.engine_error(exc)
        try:
            return await asyncio.wrap_future(job.future)
        except ShadowDistillError as exc:
            return self.engine_error(exc)
        finally:
            if not job.future.done():
                job.cancel()

    async def stream(self, rows: Sequence[RowRequest]) -> AsyncIterator[TokenEvent | GenerationOutput]:
        """Yield token events as the engine samples them, then the full output (engine errors are raised)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()

        def post(item: TokenEvent | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown); the engine must not care
                pass

        job = self.engine.submit(rows, on_token=lambda row, tok, lp: post((row, tok, lp)))
        job.future.add_done_callback(lambda _: post(None))
        try:
            while (item := await queue.get()) is not None:
                yield item
            yield job.future.result()
        finally:
            if not job.future.done():
                job.cancel()

    async def stream_response(self, ctx: RequestContext, plan: Plan, renderer: ChunkRenderer,
                              include_usage: bool) -> AsyncIterator[str]:
        """SSE lines of one streamed request; its trajectories are submitted after the last data chunk.

        Tokens are forwarded as they are sampled. When top-logprob alternatives were asked for, they only
        exist once the rows are finished, so the chunks are then sent at the end, in the same format.
        """
        texts = [IncrementalText(self.tokenizer, row.stop) for row in plan.rows]
        buffered = any(row.top_logprobs for row in plan.rows)
        for line in renderer.opening():
            yield line
        out: GenerationOutput | None = None
        try:
            async with contextlib.aclosing(self.stream(plan.rows)) as events:
                async for item in events:
                    if isinstance(item, GenerationOutput):
                        out = item
                    elif not buffered:
                        row, tok, lp = item
                        if line := renderer.token(row, texts[row].push(tok), tok, lp, None):
                            yield line
        except ShadowDistillError as exc:
            yield sse(self.engine_error(exc))
            yield SSE_DONE
            return
        assert out is not None
        for row, res in enumerate(out.rows):
            if buffered:
                for j, (tok, lp) in enumerate(zip(res.completion_ids, res.logprobs, strict=True)):
                    alts = res.top_logprobs[j] if res.top_logprobs else None
                    if line := renderer.token(row, texts[row].push(tok), tok, lp, alts):
                        yield line
            yield renderer.finish(row, texts[row].finish(), res.finish_reason, self.fingerprint(out))
        if include_usage:
            yield renderer.usage(self.usage(plan, out))
        if task := self.trajectory_task(ctx, plan, out):
            asyncio.get_running_loop().call_soon(task)  # after this turn; the sink itself never blocks
        yield SSE_DONE

    # ---------------------------------------------------------------------------------------- helpers

    def fingerprint(self, out: GenerationOutput) -> str:
        """`system_fingerprint` of a response: which base and adapter version produced it."""
        return f"{self.engine.base_model_id}:adapter={out.adapter_version or 'none'}"

    def token_str(self, token_id: int, as_id: bool) -> str:
        return token_text(self.tokenizer, token_id, as_id)

    @staticmethod
    def usage(plan: Plan, out: GenerationOutput) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in plan.prompts)
        completion_tokens = sum(len(r.completion_ids) for r in out.rows)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    def trajectory_task(self, ctx: RequestContext, plan: Plan,
                        out: GenerationOutput) -> Callable[[], None] | None:
        """A callable that builds and submits one trajectory per choice (run it after the response)."""
        if self.sink is None or not ctx.shadow_log:
            return None
        sink, created = self.sink, datetime.now(UTC)

        def task() -> None:
            caller = caller_hash(ctx.caller.name, self.caller_salt)
            log_texts = self.config.log_texts
            fields = [
                dict(request_id=ctx.request_id, choice_index=k, caller=caller,
                     base_model_id=self.engine.base_model_id, adapter_version=out.adapter_version,
                     params=row.params, prompt_ids=row.prompt_ids, result=res,
                     prompt_text=decode_prompt(self.tokenizer, row.prompt_ids) if log_texts else None,
                     completion_text=final_text(self.tokenizer, res.completion_ids, row.stop) if log_texts else None,
                     created_at=created)
                for k, (row, res) in enumerate(zip(plan.rows, out.rows, strict=True))
            ]
            submit_all(sink, fields)

        return task


def decode_prompt(tokenizer, ids: Sequence[int]) -> str:
    """The prompt as a reviewer should read it: chat template markers included."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


