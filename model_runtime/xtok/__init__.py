"""Cross-tokenizer on-policy distillation: a teacher of another model family scores the student's completions.

The same-tokenizer path feeds the student's token ids to the teacher. A teacher of another family reads other
ids and another chat template, so each trajectory is re-rendered for it and its scores are mapped back:

1. `CrossTokenizer.view` (render.py): the prompt in the TEACHER's chat template (from the request's messages, or
   parsed back out of the student's rendering), the completion text (decoded incrementally from the student's
   ids) tokenized by the teacher, per-token character offsets on both sides (offsets.py);
2. the teacher scores `view.prompt_ids + view.completion_ids` like any trajectory (`completion_logprobs`);
3. `view.project(teacher_logprobs_U)` (spans.py): spans that end where both tokenizations cut, each span's
   teacher logprob shared over its student tokens, with span ids; the trainer turns them into span advantages
   with `span_advantages` (every token of a span gets the span's whole reverse-KL advantage; why: spans.py).

Anything that cannot be aligned raises `foundation.errors.AlignmentError` with the reason: the scorer
dead-letters that trajectory, nobody trains on it.

    xt = CrossTokenizer(load_tokenizer(student_dir), load_tokenizer(teacher_dir))
    view = xt.view(traj.completion_token_ids, rendered_prompt=traj.prompt_text)
    scores = score_views(teacher_model, [view], pad_id)[0]   # or: view.project(teacher logprobs of its tokens)
    scores.teacher_logprobs_C, scores.span_id_C               # one per student completion token
    A_BC = span_advantages(span_id_BC, teacher_logprobs_BC, lp_new_BC.detach(), mask_BC)   # the trainer
"""

from model_runtime.xtok.offsets import TokenOffsets, token_offsets
from model_runtime.xtok.render import (ChatLayout, CrossTokenizer, TeacherView, chat_layout, end_of_turn_id,
                                       parse_rendered_chat, score_views)
from model_runtime.xtok.spans import CrossTokenizerScores, SpanAlignment, align_spans, span_advantages

__all__ = [
    "ChatLayout", "CrossTokenizer", "CrossTokenizerScores", "SpanAlignment", "TeacherView", "TokenOffsets",
    "align_spans", "chat_layout", "end_of_turn_id", "parse_rendered_chat", "score_views", "span_advantages",
    "token_offsets",
]
