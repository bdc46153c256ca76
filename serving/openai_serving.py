"""Serving logic shared by chat and completions: model names, limits, rows, engine calls, logging choices.

Like vLLM's `OpenAIServing`, methods return an `ErrorResponse` instead of raising for anything a client did
wrong; the router turns it into the right 4xx. Sampling parameters become one `RowRequest` per choice (`n`
per prompt); every choice gets a concrete seed (the request's seed + choice index, or a random one), which is
recorded in its trajectory so any logged choice can be regenerated (seeds are taken mod 2^63).

A planned request is then admitted by the key's rate limits (`serving.limits`: a 429 with `Retry-After`, before
the engine sees it), generated, charged for the tokens it used, and logged (`TrajectoryLog`) after its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from model_runtime.sampling import DecodeParams
from serving.auth import Caller
from serving.config import ServingConfig
from serving.detokenize import IncrementalText, TextRule, token_text
from serving.engine_base import Engine, GenerationOutput, RowRequest, RowResult
from serving.limits import Grant, RateLimiter, Refusal
from serving.protocol import (
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptLogprob,
    PromptLogprobsOut,
    SamplingFields,
    UsageInfo,
    error_response,
)
from serving.shadow_mirror import ShadowMirror
from serving.trajectories import ChatPrompt, TrajectoryLog
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
    end_user: str | None = None  # the request's `user`, hashed into its trajectories
    adapter: str | None = None  # a named adapter the request's `model` asked for; None: the default (champion)
    grant: Grant = field(default_factory=Grant)  # what the key's rate limits reserved (default: unlimited)
    chat: ChatPrompt | None = None  # a chat request's messages, logged in its trajectories; None: raw-text prompts

    @property
    def worst_case_tokens(self) -> int:
        """Prompt tokens (as `usage` counts them) plus every choice's max_tokens: what admission reserves."""
        return sum(len(p) for p in self.prompts) + sum(row.params.max_tokens for row in self.rows)


def rate_limited(refusal: Refusal) -> ErrorResponse:
    """OpenAI's 429: `rate_limit_exceeded` (type requests/tokens) or `insufficient_quota`, with Retry-After."""
    error = error_response(429, refusal.message, code=refusal.code, type_=refusal.type)
    error.headers["Retry-After"] = refusal.retry_after
    return error


class OpenAIServing:
    def __init__(self, engine: Engine, config: ServingConfig, log: TrajectoryLog | None = None,
                 limiter: RateLimiter | None = None, mirror: ShadowMirror | None = None):
        self.engine = engine
        self.config = config
        self.log = log
        self.mirror = mirror
        self.limiter = limiter or RateLimiter(config.rate_limit_replicas)
        self.tokenizer = engine.tokenizer
        self.vocab_size = len(engine.tokenizer)

    @property
    def served_model_name(self) -> str:
        return self.config.served_model_name or self.engine.base_model_id

    # ---------------------------------------------------------------------------------------- models

    def check_model(self, name: str) -> ErrorResponse | None:
        found = self.adapter_for(name)
        return found if isinstance(found, ErrorResponse) else None

    def adapter_for(self, name: str) -> str | None | ErrorResponse:
        """Which adapter a request's `model` runs: None for the served name or the default adapter's version, the
        name of a named adapter (vLLM's multi-LoRA), or the 404 of a model this server does not have."""
        adapter = self.engine.active_adapter()
        if name == self.served_model_name or (adapter is not None and name == adapter.version):
            return None
        if name in self.engine.named_adapters():
            return name
        return error_response(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def model_list(self) -> ModelList:
        adapter = self.engine.active_adapter()
        version = adapter.version if adapter else None
        limit = self.engine.max_model_len
        cards = [ModelCard(id=self.served_model_name, root=self.engine.base_model_id, max_model_len=limit,
                           adapter_version=version)]
        if adapter is not None:
            cards.append(ModelCard(id=adapter.version, root=str(adapter.path), parent=self.served_model_name,
                                   max_model_len=limit, adapter_version=version))
        cards += [ModelCard(id=name, root=str(named.path), parent=self.served_model_name, max_model_len=limit,
                            adapter_version=name) for name, named in sorted(self.engine.named_adapters().items())]
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
        if error := self._check_extras(req):
            return error
        base_seed = req.seed if req.seed is not None else secrets.randbits(62)
        rows = []
        for p, prompt in enumerate(prompts):
            max_tokens = self._max_tokens(len(prompt), requested, prompt_param)
            if isinstance(max_tokens, ErrorResponse):
                return max_tokens
            if (req.min_tokens or 0) > max_tokens:
                return error_response(400, f"min_tokens={req.min_tokens} exceeds max_tokens={max_tokens}",
                                      param="min_tokens", code="invalid_value")
            for i in range(req.n):
                rows.append(self._row(req, prompt, max_tokens, (base_seed + p * req.n + i) % SEED_MODULUS,
                                      alternatives))
        adapter = self.adapter_for(req.model)
        if isinstance(adapter, ErrorResponse):
            return adapter
        return Plan(prompts, rows, req.n, req.end_user, adapter)

    def admit(self, ctx: RequestContext, plan: Plan) -> ErrorResponse | None:
        """Take the request's share of its key's limits (kept in `plan.grant`), or the 429 that refuses it."""
        grant = self.limiter.admit(ctx.caller.name, ctx.caller.limits, plan.worst_case_tokens)
        if isinstance(grant, Refusal):
            return rate_limited(grant)
        plan.grant = grant
        return None

    def _check_extras(self, req: SamplingFields) -> ErrorResponse | None:
        """vLLM extras that need this server's limits or vocabulary to check."""
        bad = next((t for t in req.stop_token_ids or () if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            return error_response(400, f"stop token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                                  param="stop_token_ids", code="invalid_value")
        if req.prompt_logprobs is not None and req.stream:
            return error_response(400, "prompt_logprobs are not available when stream=true",
                                  param="prompt_logprobs", code="invalid_value")
        if (req.prompt_logprobs or 0) > self.config.max_top_logprobs:
            return error_response(400, f"prompt_logprobs={req.prompt_logprobs} exceeds this server's limit of "
                                       f"{self.config.max_top_logprobs}", param="prompt_logprobs", code="invalid_value")
        return None

    @staticmethod
    def _row(req: SamplingFields, prompt: list[int], max_tokens: int, seed: int, alternatives: int) -> RowRequest:
        """One choice: the request's decoding parameters with OpenAI's and vLLM's defaults filled in."""
        params = DecodeParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            seed=seed,
            min_p=req.min_p or 0.0,
            min_tokens=req.min_tokens or 0,
            ignore_eos=bool(req.ignore_eos),
            stop_token_ids=tuple(req.stop_token_ids or ()),
        )
        return RowRequest(tuple(prompt), params, req.stop_strings, alternatives,
                          include_stop_str=bool(req.include_stop_str_in_output),
                          skip_special_tokens=req.skip_special_tokens is not False,
                          prompt_logprobs=req.prompt_logprobs)

    def text_rule(self, row: RowRequest) -> TextRule:
        return row.text_rule(self.engine.eos_ids)

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

    async def generate(self, plan: Plan) -> GenerationOutput | ErrorResponse:
        """The plan's rows generated, and its grant charged with what they used (nothing when they failed)."""
        out = await self._generate(plan.rows, plan.adapter)
        plan.grant.settle(0 if isinstance(out, ErrorResponse) else self.usage(plan, out).total_tokens)
        return out

    async def _generate(self, rows: Sequence[RowRequest], adapter: str | None = None
                        ) -> GenerationOutput | ErrorResponse:
        try:
            job = self.engine.submit(rows, adapter=adapter)
        except ShadowDistillError as exc:
            return self.engine_error(exc)
        try:
            return await asyncio.wrap_future(job.future)
        except ShadowDistillError as exc:
            return self.engine_error(exc)
        finally:
            if not job.future.done():
                job.cancel()

    async def stream(self, rows: Sequence[RowRequest], adapter: str | None = None
                     ) -> AsyncIterator[TokenEvent | GenerationOutput]:
        """Yield token events as the engine samples them, then the full output (engine errors are raised)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()

        def post(item: TokenEvent | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown); the engine must not care
                pass

        job = self.engine.submit(rows, on_token=lambda row, tok, lp: post((row, tok, lp)), adapter=adapter)
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
        exist once the rows are finished, so the chunks are then sent at the end, in the same format. The
        grant is charged what was used; a stream the client left early keeps its whole reservation charged.
        """
        try:
            async for line in self._stream_lines(ctx, plan, renderer, include_usage):
                yield line
        finally:
            plan.grant.settle()  # a no-op when the stream finished (it settled the real usage)

    async def _stream_lines(self, ctx: RequestContext, plan: Plan, renderer: ChunkRenderer,
                            include_usage: bool) -> AsyncIterator[str]:
        texts = [IncrementalText(self.tokenizer, self.text_rule(row)) for row in plan.rows]
        buffered = any(row.top_logprobs for row in plan.rows)
        for line in renderer.opening():
            yield line
        out: GenerationOutput | None = None
        try:
            async with contextlib.aclosing(self.stream(plan.rows, plan.adapter)) as events:
                async for item in events:
                    if isinstance(item, GenerationOutput):
                        out = item
                    elif not buffered:
                        row, tok, lp = item
                        if line := renderer.token(row, texts[row].push(tok), tok, lp, None):
                            yield line
        except ShadowDistillError as exc:
            plan.grant.settle(0)
            yield sse(self.engine_error(exc))
            yield SSE_DONE
            return
        assert out is not None
        plan.grant.settle(self.usage(plan, out).total_tokens)
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
            task()  # before [DONE]: written ahead to the sink's log, an answered stream survives a SIGKILL
        yield SSE_DONE

    # ---------------------------------------------------------------------------------------- helpers

    def fingerprint(self, out: GenerationOutput) -> str:
        """`system_fingerprint` of a response: which base and adapter version produced it."""
        return f"{self.engine.base_model_id}:adapter={out.adapter_version or 'none'}"

    def token_str(self, token_id: int, as_id: bool) -> str:
        return token_text(self.tokenizer, token_id, as_id)

    def prompt_logprobs(self, res: RowResult, as_id: bool) -> PromptLogprobsOut | None:
        """vLLM's `prompt_logprobs` of a choice: per position None or {"<token id>": logprob, rank, token}."""
        if res.prompt_logprobs is None:
            return None
        return [None if entry is None else {
            str(t): PromptLogprob(logprob=lp, rank=rank, decoded_token=self.token_str(t, as_id))
            for t, (lp, rank) in entry.items()} for entry in res.prompt_logprobs]

    @staticmethod
    def usage(plan: Plan, out: GenerationOutput) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in plan.prompts)
        completion_tokens = sum(len(r.completion_ids) for r in out.rows)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    def trajectory_task(self, ctx: RequestContext, plan: Plan,
                        out: GenerationOutput) -> Callable[[], None] | None:
        """A callable, run after the response, that submits one trajectory per choice and, for champion traffic the
        shadow mirror selects, the same request again under the candidate (background work, logged as shadow)."""
        mirror = self.mirror if plan.adapter is None and ctx.shadow_log else None
        if mirror is not None:
            mirror.record_client(out)
        if self.log is None or not ctx.shadow_log:
            return None
        log_task = self.log.task(ctx.request_id, ctx.caller.name, plan.end_user, plan.rows, out.rows,
                                 out.adapter_version, chat=plan.chat)
        if mirror is None:
            return log_task

        def task() -> None:
            log_task()
            mirror.maybe_mirror(ctx.request_id, ctx.caller.name, plan.end_user, plan.rows, chat=plan.chat)

        return task
