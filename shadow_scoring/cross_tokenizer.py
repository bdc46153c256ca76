"""A teacher of another model family behind the scorer's `Teacher` protocol: trajectories re-rendered for it.

The scorer's teachers read a trajectory's own token ids. A teacher with another tokenizer cannot: the ids name
other pieces. `CrossTokenizerTeacher` wraps any teacher (embedded, or vLLM over its OpenAI API) and, per
trajectory, asks `model_runtime.xtok.CrossTokenizer` for the teacher's view: the conversation rendered in the
TEACHER's chat template (from v2's messages, else parsed out of the student's rendering), the completion text
tokenized by the teacher. The wrapped teacher scores those ids (vLLM: `prompt_logprobs` on the teacher's own
token ids), and the view projects the scores back onto the student's tokens: per student token its span's share
and its span id (`TeacherScores.span_id_C`), which the trainer turns into span advantages.

The scorer calls `prepare` on its consumer thread for what it has just landed, so the re-rendering and the
alignment run while the teacher thread computes the previous page's forward (one Python thread, one torch).

A trajectory that cannot be aligned (it decodes to U+FFFD, holds a special token inside the completion, its
prompt is no chat rendering of the student's template, its logged offsets disagree with the student tokenizer)
is refused before any teacher work (`refusal`), with the reason: the scorer records and dead-letters it, and
nobody trains on it. Top-k scores need one vocabulary: a cross-tokenizer teacher stores none.

    inner = build_teacher(config)                        # the teacher model or server, as for any teacher
    teacher = CrossTokenizerTeacher(inner, student_tokenizer, teacher_tokenizer, student_stop_ids)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Sequence

import numpy as np

from feature_store.records import TeacherScores
from foundation.errors import AlignmentError, UnalignableTrajectory
from model_runtime.tokenizers import decode_as_rendered, tokenizer_fingerprint
from model_runtime.xtok import CrossTokenizer, TeacherView
from schemas.trajectory import Trajectory, TrajectoryV2

log = logging.getLogger(__name__)
_VIEW_CACHE = 4096  # views kept between the refusal check and the batch that scores them


class CrossTokenizerTeacher:
    """`inner` (any teacher with `score_ids`) scoring trajectories of a student with another tokenizer."""

    def __init__(self, inner, student_tokenizer, teacher_tokenizer, student_stop_ids: Collection[int] | None = None):
        self.inner = inner
        self.teacher_id = inner.teacher_id
        self.temperature = inner.temperature
        self.vocab_size = inner.vocab_size
        self.tokenizer_fingerprint = inner.tokenizer_fingerprint  # the teacher's
        self.tokenizer_dir = getattr(inner, "model_dir", None) or getattr(inner, "tokenizer_dir", None)
        self.student_tokenizer_fingerprint = tokenizer_fingerprint(student_tokenizer)
        self.student_tok = student_tokenizer
        self.xt = CrossTokenizer(student_tokenizer, teacher_tokenizer, student_stop_ids)
        self._views: OrderedDict[str, TeacherView] = OrderedDict()

    def view(self, traj: Trajectory) -> TeacherView:
        """The teacher's rendering of one trajectory; `AlignmentError` with the reason when it has none."""
        cached = self._views.get(traj.trajectory_id)
        if cached is not None:
            return cached
        view = self._render(traj)
        self._views[traj.trajectory_id] = view
        while len(self._views) > _VIEW_CACHE:
            self._views.popitem(last=False)
        return view

    def _render(self, traj: Trajectory) -> TeacherView:
        ids = traj.completion_token_ids
        if not isinstance(traj, TrajectoryV2):  # v1: no prompt kind; a chat rendering is parsed back out
            return self.xt.view(ids, rendered_prompt=traj.prompt_text or decode_as_rendered(self.student_tok,
                                                                                      traj.prompt_token_ids))
        prompt = traj.prompt_text or decode_as_rendered(self.student_tok, traj.prompt_token_ids)
        if traj.prompt_kind == "text":
            view = self.xt.view(ids, raw_prompt=prompt, completion_text=traj.completion_text)
        elif not traj.add_generation_prompt or traj.continue_final_message:
            raise AlignmentError("the prompt continues a message or has no generation prompt: only a fresh "
                                 "assistant turn can be re-rendered in another template")
        elif traj.messages is not None:
            if any(m.name is not None for m in traj.messages):
                raise AlignmentError("a message has a `name`, which another chat template may render differently")
            view = self.xt.view(ids, messages=traj.message_dicts, completion_text=traj.completion_text)
        else:  # texts were not logged: the ids are the truth
            view = self.xt.view(ids, rendered_prompt=prompt)
        if traj.completion_offsets is not None and _offsets(view, len(ids)) != traj.completion_offsets:
            raise AlignmentError("the logged completion_offsets disagree with the student tokenizer's decoding "
                                 "(is serving's tokenizer the student's?)")
        return view

    def prepare(self, trajs: Sequence[Trajectory]) -> None:
        """Build (and keep) the views of trajectories about to be scored: the scorer calls this on its consumer
        thread after landing them, so re-rendering and alignment overlap the previous page's teacher forward."""
        for traj in trajs[:_VIEW_CACHE // 2]:
            try:
                self.view(traj)
            except AlignmentError:
                pass  # refused again, with the reason, when its page is scored

    def refusal(self, traj: Trajectory) -> UnalignableTrajectory | None:
        """Why `traj` cannot be scored by this teacher (checked before any teacher work), or None."""
        try:
            self.view(traj)
        except AlignmentError as exc:
            return _unalignable(traj, exc)
        return None

    def score(self, batch: list[Trajectory], topk: int = 0) -> list[TeacherScores]:
        """Scores per student token (span shares + span ids); `topk` is ignored: another vocabulary has none."""
        if not batch:
            return []
        views = []
        for traj in batch:
            try:
                views.append(self.view(traj))
            except AlignmentError as exc:
                raise _unalignable(traj, exc) from exc
        scored = self.inner.score_ids([v.prompt_ids for v in views], [v.completion_ids for v in views], 0)
        out = []
        for traj, view, s in zip(batch, views, scored, strict=True):
            projected = view.project(s.teacher_logprobs_C)
            self._views.pop(traj.trajectory_id, None)
            out.append(TeacherScores(projected.teacher_logprobs_C.astype(np.float32),
                                     span_id_C=projected.span_id_C.astype(np.int64)))
        return out

    def seq_len(self, traj: Trajectory) -> int:
        """What the teacher will read: its own prompt and completion tokens (for token-budget batching)."""
        try:
            view = self.view(traj)
        except AlignmentError:
            return len(traj.prompt_token_ids) + len(traj.completion_token_ids)
        return len(view.prompt_ids) + len(view.completion_ids)


def _unalignable(traj: Trajectory, exc: AlignmentError) -> UnalignableTrajectory:
    return UnalignableTrajectory(f"{traj.trajectory_id}: cannot be aligned with the teacher's tokenizer: {exc}")


def _offsets(view: TeacherView, n_tokens: int) -> list[int]:
    """The v2 offsets the student tokenizer gives this completion: text token ends, then a stop token's end."""
    ends = list(view.student.ends)
    return ends + [len(view.student.text)] * (n_tokens - len(ends))
