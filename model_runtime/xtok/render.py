"""Re-rendering a student trajectory for a teacher of another tokenizer: the teacher's chat template, its tokens.

Feeding the student's rendering (its chat markers tokenized by the teacher) to the teacher biases the teacher's
logprobs (Tinker cookbook issue #796: about +0.29 nats/token). The teacher must see the conversation in its OWN
chat template, with its generation prompt, and the completion as its own tokenizer spells the completion text.

Where the conversation comes from, in the order of preference:
- `messages`: the request's structured messages (role + content), rendered with the teacher's template;
- `rendered_prompt`: the prompt exactly as the student's template rendered it (trajectory v1's `prompt_text`, or
  the decoded `prompt_token_ids`): parsed back into messages with the student's template (`parse_rendered_chat`,
  checked by rendering the parsed messages again), then rendered with the teacher's;
- `raw_prompt`: a completions-API prompt (no chat): the same text, tokenized by the teacher with its BOS.

The completion: the student's token ids are the truth. Their text is decoded incrementally (`token_offsets`),
checked against `completion_text` when given (a text cut at a stop string does not match: pass None then), and
tokenized by the teacher (`split_special_tokens`: text that looks like a marker is text). A final student stop
token (the student's end-of-turn or EOS) has no text: it is paired with the teacher's end-of-turn token in a span
of its own, so the decision to stop is scored too. A special token inside the completion cannot be aligned.

    xt = CrossTokenizer(student_tok, teacher_tok)       # once; checks both templates (ConfigError)
    view = xt.view(traj.completion_token_ids, rendered_prompt=traj.prompt_text)   # per trajectory
    lp_U = completion_logprobs(teacher, [view.prompt_ids], [view.completion_ids], pad)[0].logprobs_C
    scores = view.project(lp_U)      # .teacher_logprobs_C (shares) and .span_id_C, one per student token
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from foundation.errors import AlignmentError, ConfigError
from model_runtime.models import eos_token_ids
from model_runtime.xtok.offsets import TokenOffsets, token_offsets
from model_runtime.xtok.spans import CrossTokenizerScores, SpanAlignment, align_spans

# Sentinel contents for probing a template: no whitespace at their ends (templates `trim`), no markup.
_S1, _U1, _A1, _S2, _U2 = "Q7sysQ1", "Q7usrQ1", "Q7astQ1", "Q7sysQ2", "Q7usrQ2"


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _split(delta: str, sentinel: str, what: str) -> tuple[str, str]:
    if delta.count(sentinel) != 1:
        raise ConfigError(f"the chat template does not render {what} as marker + content + marker")
    head, _, tail = delta.partition(sentinel)
    return head, tail


@dataclass(frozen=True)
class ChatLayout:
    """How a template wraps each message: `opens[role] + content + closes[role]`, after the conversation's
    generation prompt is `generation_prompt`. Learned from probe conversations by `chat_layout`."""

    opens: dict[str, str]
    closes: dict[str, str]
    generation_prompt: str


_LAYOUTS: dict[tuple, ChatLayout] = {}


def chat_layout(tokenizer) -> ChatLayout:
    """Learn (and cache per template) the layout of a template that renders a conversation by appending messages.

    The user and assistant wrappers come from appending one message to a probe conversation; the system wrapper
    from a system message in the middle when the template allows one (ChatML does), else there is none (Gemma
    folds the system text into the first user turn, which then parses as user content and renders the same)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(f"{type(tokenizer).__name__} has no chat template; give it one (see model_runtime.gemma)")
    key = (template, tokenizer.bos_token, tokenizer.eos_token)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    u = [_msg("user", _U1)]
    ua = [*u, _msg("assistant", _A1)]
    uau = [*ua, _msg("user", _U2)]
    r_u, r_ua, r_uau = render(tokenizer, u, False), render(tokenizer, ua, False), render(tokenizer, uau, False)
    r_gen = render(tokenizer, u, True)
    if not (r_ua.startswith(r_u) and r_uau.startswith(r_ua) and r_gen.startswith(r_u)):
        raise ConfigError("the chat template does not render a conversation by appending messages; "
                          "give the cross-tokenizer view structured messages")
    opens, closes = {}, {}
    opens["assistant"], closes["assistant"] = _split(r_ua[len(r_u):], _A1, "an assistant message")
    opens["user"], closes["user"] = _split(r_uau[len(r_ua):], _U2, "a user message")
    try:
        r_uas = render(tokenizer, [*ua, _msg("system", _S2), _msg("user", _U2)], False)
    except Exception:  # templates may raise on a system message outside the first turn
        r_uas = ""
    tail = opens["user"] + _U2 + closes["user"]
    if r_uas.startswith(r_ua) and r_uas.endswith(tail):
        opens["system"], closes["system"] = _split(r_uas[len(r_ua):len(r_uas) - len(tail)], _S2, "a system message")
    layout = ChatLayout(opens, closes, r_gen[len(r_u):])
    _LAYOUTS[key] = layout
    return layout


def parse_rendered_chat(tokenizer, text: str) -> list[dict]:
    """The messages that `tokenizer`'s template renders (with the generation prompt) into exactly `text`.

    Text before the first marker is the template's own lead (a BOS); a leading system message that the template
    adds by itself (SmolLM2's default) is dropped when the messages without it render the same text. Raises
    `AlignmentError` when no such messages exist (not a chat prompt of this template, or a message whose
    content contains a marker)."""
    layout = chat_layout(tokenizer)
    gen = layout.generation_prompt
    if not text.endswith(gen):
        raise AlignmentError(f"the prompt does not end with the student's generation prompt {gen!r}")
    body = text[:len(text) - len(gen)]
    markers = sorted(layout.opens.items(), key=lambda kv: -len(kv[1]))
    starts = [i for i in (body.find(m) for _, m in markers) if i >= 0]
    if not starts:
        raise AlignmentError("the prompt has no message marker of the student's chat template")
    pos, messages = min(starts), []
    while pos < len(body):
        role = next((r for r, m in markers if body.startswith(m, pos)), None)
        if role is None:
            raise AlignmentError(f"unexpected text at character {pos} of the prompt: {body[pos:pos + 24]!r}")
        start = pos + len(layout.opens[role])
        end = body.find(layout.closes[role], start) if layout.closes[role] else -1
        if end < 0:
            raise AlignmentError(f"a {role} message at character {pos} of the prompt is not closed")
        messages.append(_msg(role, body[start:end]))
        pos = end + len(layout.closes[role])
    if render(tokenizer, messages, True) != text:
        raise AlignmentError("the prompt is not the student's chat template rendering of the messages it parses "
                             "into (does a message contain a template marker?)")
    if len(messages) > 1 and messages[0]["role"] == "system" and render(tokenizer, messages[1:], True) == text:
        messages = messages[1:]  # the template's default system message, not the caller's
    return messages


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in `tokenizer`'s template (`<|im_end|>`, `<end_of_turn>`)."""
    close = chat_layout(tokenizer).closes["assistant"]
    ids = tokenizer.encode(close, add_special_tokens=False) if close else []
    if not ids or ids[0] not in set(tokenizer.all_special_ids) | _added_special_ids(tokenizer):
        raise ConfigError(f"the chat template closes an assistant turn with {close!r}, not with a special token")
    return int(ids[0])


def _added_special_ids(tokenizer) -> set[int]:
    return {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}


@dataclass(frozen=True)
class TeacherView:
    """One trajectory as the teacher must score it, and how its tokens map back to the student's."""

    prompt_text: str
    prompt_ids: list[int]
    completion_ids: list[int]  # the teacher's tokens of the completion text (+ its end-of-turn token)
    alignment: SpanAlignment
    student: TokenOffsets  # the student's text tokens (a final stop token excluded)
    teacher: TokenOffsets  # the teacher's text tokens (its end-of-turn token excluded)

    def project(self, teacher_logprobs_U) -> CrossTokenizerScores:
        """Teacher logprobs of `completion_ids` (one per token) -> scores per student completion token."""
        return self.alignment.project(teacher_logprobs_U)


class CrossTokenizer:
    """The student's and the teacher's tokenizers, with what `view` needs from their templates (checked once).

    `student_stop_ids`: student tokens that end a completion; give serving's set
    (`models.eos_token_ids(tokenizer, model)`); the default is its end-of-turn token and `eos_token_ids(tokenizer)`."""

    def __init__(self, student_tokenizer, teacher_tokenizer, student_stop_ids: Collection[int] | None = None):
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        self.student_specials = set(student_tokenizer.all_special_ids) | _added_special_ids(student_tokenizer)
        self.teacher_end_id = end_of_turn_id(teacher_tokenizer)
        self.teacher_eos_id = teacher_tokenizer.eos_token_id
        if student_stop_ids is None:
            student_stop_ids = {end_of_turn_id(student_tokenizer)} | eos_token_ids(student_tokenizer)
        self.student_stop_ids = frozenset(int(i) for i in student_stop_ids)
        self.teacher_unk_id = teacher_tokenizer.unk_token_id

    def teacher_prompt(self, *, messages: Sequence[dict] | None = None, rendered_prompt: str | None = None,
                       raw_prompt: str | None = None) -> tuple[str, list[int]]:
        """(text, ids) of the prompt in the teacher's template; exactly one source (see the module docstring)."""
        if sum(x is not None for x in (messages, rendered_prompt, raw_prompt)) != 1:
            raise ConfigError("give exactly one of messages, rendered_prompt, raw_prompt")
        if raw_prompt is not None:
            ids = self.teacher.encode(raw_prompt, add_special_tokens=True, split_special_tokens=True)
            text = raw_prompt
        else:
            if messages is None:
                messages = parse_rendered_chat(self.student, rendered_prompt)
            bad = [m for m in messages if not isinstance(m.get("content"), str) or m.get("role") not in
                   ("system", "user", "assistant")]
            if bad:
                raise AlignmentError(f"message {bad[0]!r}: only system/user/assistant text messages can be re-rendered")
            try:
                text = render(self.teacher, [_msg(m["role"], m["content"]) for m in messages], True)
            except Exception as exc:  # a template's raise_exception: roles it cannot render
                raise AlignmentError(f"the teacher's chat template refuses the conversation: {exc}") from exc
            ids = self.teacher.encode(text, add_special_tokens=False)
        if not ids:
            raise AlignmentError("the teacher prompt is empty: its first completion token has no position to come from")
        return text, list(ids)

    def view(self, completion_ids: Sequence[int], *, messages: Sequence[dict] | None = None,
             rendered_prompt: str | None = None, raw_prompt: str | None = None,
             completion_text: str | None = None) -> TeacherView:
        """Re-render one trajectory for the teacher and align its completion (AlignmentError: dead-letter it)."""
        prompt_text, prompt_ids = self.teacher_prompt(messages=messages, rendered_prompt=rendered_prompt,
                                                      raw_prompt=raw_prompt)
        ids = [int(i) for i in completion_ids]
        stop = bool(ids) and ids[-1] in self.student_stop_ids
        text_ids = ids[:-1] if stop else ids
        inside = [(k, i) for k, i in enumerate(text_ids) if i in self.student_specials]
        if inside:
            k, i = inside[0]
            raise AlignmentError(f"student completion token {k} is the special token {self.student.convert_ids_to_tokens(i)!r}: "
                                 "a special token is no text another tokenizer can spell")
        student = token_offsets(self.student, text_ids, completion_text, side="student", no_replacement=True)
        teacher_ids = list(self.teacher.encode(student.text, add_special_tokens=False, split_special_tokens=True))
        if self.teacher_unk_id is not None and self.teacher_unk_id in teacher_ids:
            raise AlignmentError(f"the teacher tokenizer has no token for character(s) of the completion (<unk> at "
                                 f"teacher token {teacher_ids.index(self.teacher_unk_id)})")
        teacher = token_offsets(self.teacher, teacher_ids, student.text, side="teacher")
        alignment = align_spans(student, teacher)
        if stop:
            end_id = self.teacher_eos_id if raw_prompt is not None else self.teacher_end_id
            if end_id is None:
                raise AlignmentError("the student stopped but the teacher has no EOS token to pair its stop with")
            alignment = alignment.with_end_of_turn()
            teacher_ids.append(int(end_id))
        return TeacherView(prompt_text, prompt_ids, teacher_ids, alignment, student, teacher)


def score_views(model, views: Sequence[TeacherView], pad_id: int, *, temperature: float = 1.0) -> list[CrossTokenizerScores]:
    """One teacher forward pass over a batch of views (`completion_logprobs`), projected onto the student's tokens.

    What an in-process teacher calls; a vLLM teacher sends `view.prompt_ids + view.completion_ids` as the prompt
    (`prompt_logprobs`), reads the completion positions and calls `view.project` itself."""
    from model_runtime.logprobs import completion_logprobs

    if not views:
        return []
    scored = completion_logprobs(model, [v.prompt_ids for v in views], [v.completion_ids for v in views], pad_id,
                                 temperature=temperature)
    return [v.project(s.logprobs_C) for v, s in zip(views, scored, strict=True)]
