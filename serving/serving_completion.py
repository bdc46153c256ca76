"""`POST /v1/completions`: text or token-id prompts (one or a batch) -> choices.

Token-id prompts are what the vLLM gateway and trainers send: they reach the model unchanged, so a trajectory
holds exactly the ids the client chose. A batch of prompts gives `n` choices per prompt, indexed
`prompt_index * n + i` as OpenAI does. `logprobs: k` returns the sampled token's logprob and the top k.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from serving.detokenize import final_text, text_offsets
from serving.engine_base import RowResult
from serving.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    UsageInfo,
)
from serving.openai_serving import Alternatives, Completed, OpenAIServing, Plan, RequestContext, sse


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, req: CompletionRequest,
                                ctx: RequestContext) -> Completed | ErrorResponse | AsyncIterator[str]:
        if error := self.check_model(req.model):
            return error
        prompts = self.prompt_ids(req.prompt)
        for ids in prompts:
            if error := self.check_prompt_ids(ids, "prompt"):
                return error
        plan = self.plan(req, prompts, "prompt")
        if isinstance(plan, ErrorResponse):
            return plan
        if req.stream and not self.engine.is_alive():
            return self.engine_error(RuntimeError("engine stopped"))
        if error := self.admit(ctx, plan):
            return error
        if req.stream:
            return self.stream_response(ctx, plan, _CompletionChunks(self, req, ctx, plan), req.include_usage)
        out = await self.generate(plan)
        if isinstance(out, ErrorResponse):
            return out
        choices = [self._choice(req, k, res, plan) for k, res in enumerate(out.rows)]
        body = CompletionResponse(id=f"cmpl-{ctx.request_id}", model=req.model, choices=choices,
                                  usage=self.usage(plan, out), system_fingerprint=self.fingerprint(out))
        return Completed(body, self.trajectory_task(ctx, plan, out))

    def prompt_ids(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        return [self.tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
                for p in prompt]

    def _choice(self, req: CompletionRequest, k: int, res: RowResult, plan: Plan) -> CompletionChoice:
        row = plan.rows[k]
        text = final_text(self.tokenizer, res.completion_ids, self.text_rule(row))
        logprobs = None
        if req.logprobs is not None:
            alts = res.top_logprobs or [None] * len(res.completion_ids)
            logprobs = CompletionLogprobs(
                text_offset=text_offsets(self.tokenizer, res.completion_ids, len(text), row.skip_special_tokens),
                token_logprobs=list(res.logprobs),
                tokens=[self.token_str(t, req.return_tokens_as_token_ids) for t in res.completion_ids],
                top_logprobs=[self.top_dict(t, lp, alt, req.return_tokens_as_token_ids)
                              for t, lp, alt in zip(res.completion_ids, res.logprobs, alts, strict=True)])
        ids = req.return_token_ids
        return CompletionChoice(index=k, text=text, logprobs=logprobs, finish_reason=res.finish_reason,
                                prompt_token_ids=list(row.prompt_ids) if ids else None,
                                token_ids=list(res.completion_ids) if ids else None,
                                prompt_logprobs=self.prompt_logprobs(res, bool(req.return_tokens_as_token_ids)))

    def top_dict(self, token_id: int, logprob: float, alternatives: Alternatives, as_id: bool) -> dict[str, float]:
        """The top-k alternatives plus the sampled token (as vLLM returns them)."""
        top = {self.token_str(t, as_id): lp for t, lp in alternatives or ()}
        top.setdefault(self.token_str(token_id, as_id), logprob)
        return top


class _CompletionChunks:
    def __init__(self, serving: OpenAIServingCompletion, req: CompletionRequest, ctx: RequestContext, plan: Plan):
        self.serving, self.req, self.plan = serving, req, plan
        self.id = f"cmpl-{ctx.request_id}"
        self.created = int(time.time())
        self.offsets = [0] * len(plan.rows)

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None,
               fingerprint: str | None = None) -> str:
        return sse(CompletionResponse(id=self.id, created=self.created, model=self.req.model, choices=choices,
                                      usage=usage, system_fingerprint=fingerprint))

    def opening(self) -> list[str]:
        if not self.req.return_token_ids:
            return []
        return [self._chunk([CompletionChoice(index=k, text="", prompt_token_ids=list(row.prompt_ids))])
                for k, row in enumerate(self.plan.rows)]

    def token(self, row: int, delta: str, token_id: int, logprob: float, alternatives: Alternatives) -> str | None:
        req = self.req
        if not delta and req.logprobs is None and not req.return_token_ids:
            return None
        logprobs = None
        if req.logprobs is not None:
            as_id = req.return_tokens_as_token_ids
            logprobs = CompletionLogprobs(
                text_offset=[self.offsets[row]], token_logprobs=[logprob],
                tokens=[self.serving.token_str(token_id, as_id)],
                top_logprobs=[self.serving.top_dict(token_id, logprob, alternatives, as_id)])
        self.offsets[row] += len(delta)
        choice = CompletionChoice(index=row, text=delta, logprobs=logprobs,
                                  token_ids=[token_id] if req.return_token_ids else None)
        return self._chunk([choice])

    def finish(self, row: int, delta: str, finish_reason: str, fingerprint: str) -> str:
        self.offsets[row] += len(delta)
        return self._chunk([CompletionChoice(index=row, text=delta, finish_reason=finish_reason)],
                           fingerprint=fingerprint)

    def usage(self, usage: UsageInfo) -> str:
        return self._chunk([], usage=usage)
