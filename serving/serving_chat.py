"""`POST /v1/chat/completions`: messages -> the model's chat template -> token ids -> choices.

The prompt ids are exactly `model_runtime.chat.chat_prompt_ids(tokenizer, messages)`, the same function the
evaluators and the trainer use, so a logged trajectory's prompt is the prompt the student really saw. vLLM's
`add_generation_prompt: false` and `continue_final_message: true` render the same template with those switches.

A message's `name` is passed to the template as the message's `name`. Many templates never read it (the tiny
models' and SmolLM2's do not); sending it there would be silently ignored, so when the prompt with the names is
the prompt without them, the request is refused with a 400 naming the first `messages.N.name`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from jinja2 import TemplateError

from model_runtime.chat import chat_prompt_ids
from serving.detokenize import final_text
from serving.engine_base import RowResult
from serving.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    ErrorResponse,
    TopLogprob,
    UsageInfo,
    error_response,
)
from serving.openai_serving import Alternatives, Completed, OpenAIServing, Plan, RequestContext, sse
from serving.trajectories import ChatPrompt


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, req: ChatCompletionRequest,
                                     ctx: RequestContext) -> Completed | ErrorResponse | AsyncIterator[str]:
        if error := self.check_model(req.model):
            return error
        prompt_ids = self.chat_prompt(req)
        if isinstance(prompt_ids, ErrorResponse):
            return prompt_ids
        if error := self.check_prompt_ids(prompt_ids, "messages"):
            return error
        plan = self.plan(req, [prompt_ids], "messages")
        if isinstance(plan, ErrorResponse):
            return plan
        plan.chat = ChatPrompt.of(self.request_messages(req), req.generation_prompt, bool(req.continue_final_message))
        if req.stream and not self.engine.is_alive():
            return self.engine_error(RuntimeError("engine stopped"))
        if error := self.admit(ctx, plan):
            return error
        if req.stream:
            return self.stream_response(ctx, plan, _ChatChunks(self, req, ctx, prompt_ids), req.include_usage)
        out = await self.generate(plan)
        if isinstance(out, ErrorResponse):
            return out
        choices = [self._choice(req, k, res, plan) for k, res in enumerate(out.rows)]
        body = ChatCompletionResponse(id=f"chatcmpl-{ctx.request_id}", model=req.model, choices=choices,
                                      usage=self.usage(plan, out), system_fingerprint=self.fingerprint(out),
                                      prompt_token_ids=prompt_ids if req.return_token_ids else None,
                                      prompt_logprobs=self.prompt_logprobs(out.rows[0], bool(
                                          req.return_tokens_as_token_ids)))
        return Completed(body, self.trajectory_task(ctx, plan, out))

    @staticmethod
    def request_messages(req: ChatCompletionRequest) -> list[dict]:
        """The messages as the chat template sees them (content flattened to text; `name` where given)."""
        return [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int] | ErrorResponse:
        """The prompt ids of the request's messages, or the 400 of a template that rejects them or their names."""
        messages = self.request_messages(req)
        ending = (req.generation_prompt, bool(req.continue_final_message))
        try:
            prompt_ids = render_chat(self.tokenizer, messages, *ending)
            named = next((i for i, m in enumerate(messages) if "name" in m), None)
            unnamed = [{k: v for k, v in m.items() if k != "name"} for m in messages]
            if named is not None and render_chat(self.tokenizer, unnamed, *ending) == prompt_ids:
                return error_response(400, f"messages.{named}.name: this model's chat template does not use "
                                           "message names; leave them out", param=f"messages.{named}.name",
                                      code="invalid_value")
        except (TemplateError, ValueError) as exc:
            return error_response(400, f"the chat template rejected these messages: {exc}", param="messages",
                                  code="invalid_value")
        return prompt_ids

    def _choice(self, req: ChatCompletionRequest, k: int, res: RowResult, plan: Plan) -> ChatCompletionChoice:
        text = final_text(self.tokenizer, res.completion_ids, self.text_rule(plan.rows[k]))
        logprobs = None
        if req.logprobs:
            alts = res.top_logprobs or [None] * len(res.completion_ids)
            logprobs = ChatChoiceLogprobs(content=[
                self.token_logprob(tok, lp, alt, req.return_tokens_as_token_ids)
                for tok, lp, alt in zip(res.completion_ids, res.logprobs, alts, strict=True)])
        return ChatCompletionChoice(index=k, message=ChatMessageOut(content=text), logprobs=logprobs,
                                    finish_reason=res.finish_reason,
                                    token_ids=list(res.completion_ids) if req.return_token_ids else None)

    def token_logprob(self, token_id: int, logprob: float, alternatives: Alternatives,
                      as_id: bool) -> ChatTokenLogprob:
        return ChatTokenLogprob(**self._top(token_id, logprob, as_id).model_dump(),
                                top_logprobs=[self._top(t, lp, as_id) for t, lp in alternatives or ()])

    def _top(self, token_id: int, logprob: float, as_id: bool) -> TopLogprob:
        text = self.token_str(token_id, as_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool, continue_final: bool) -> list[int]:
    """Prompt ids from the model's chat template; the defaults are exactly `chat_prompt_ids`."""
    if generation_prompt and not continue_final:
        return chat_prompt_ids(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         continue_final_message=continue_final)
    return tokenizer.encode(text, add_special_tokens=False)


class _ChatChunks:
    """OpenAI chat chunk format: a role chunk per choice, content deltas, a finish chunk, optional usage."""

    def __init__(self, serving: OpenAIServingChat, req: ChatCompletionRequest, ctx: RequestContext,
                 prompt_ids: list[int]):
        self.serving, self.req, self.prompt_ids = serving, req, prompt_ids
        self.id = f"chatcmpl-{ctx.request_id}"
        self.created = int(time.time())

    def _chunk(self, choices: list[ChatStreamChoice], **extra) -> str:
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.req.model, choices=choices,
                                       **extra))

    def opening(self) -> list[str]:
        ids = self.prompt_ids if self.req.return_token_ids else None
        choices = [ChatStreamChoice(index=k, delta=DeltaMessage(role="assistant", content=""))
                   for k in range(self.req.n)]
        return [self._chunk(choices, prompt_token_ids=ids)]

    def token(self, row: int, delta: str, token_id: int, logprob: float, alternatives: Alternatives) -> str | None:
        req = self.req
        if not delta and not req.logprobs and not req.return_token_ids:
            return None
        logprobs = None
        if req.logprobs:
            entry = self.serving.token_logprob(token_id, logprob, alternatives, req.return_tokens_as_token_ids)
            logprobs = ChatChoiceLogprobs(content=[entry])
        choice = ChatStreamChoice(index=row, delta=DeltaMessage(content=delta), logprobs=logprobs,
                                  token_ids=[token_id] if req.return_token_ids else None)
        return self._chunk([choice])

    def finish(self, row: int, delta: str, finish_reason: str, fingerprint: str) -> str:
        choice = ChatStreamChoice(index=row, delta=DeltaMessage(content=delta or None), finish_reason=finish_reason)
        return self._chunk([choice], system_fingerprint=fingerprint)

    def usage(self, usage: UsageInfo) -> str:
        return self._chunk([], usage=usage)
