"""The in-process teacher as the trainer and the evaluator see it: scores per STUDENT token, whatever its tokenizer.

- Same tokenizer (the teacher is a bigger model of the student's family): the student's token ids go to the
  teacher as they are, and every token is its own span (`span_id_C = 0..C-1`).
- Another tokenizer (a teacher of another family): each completion is re-rendered in the teacher's chat template
  and re-tokenized by it (`model_runtime.xtok.CrossTokenizer`), scored, and projected back onto the student's
  tokens as span shares with span ids; the trainer turns them into span advantages
  (`losses.sampled_token_loss(..., span_id_BC=...)`). A completion that cannot be aligned (it decodes to U+FFFD,
  say) gets None: the caller leaves it out and counts it, never trains on it.

The forward KL of the held-out gate needs the other direction, the teacher's own samples scored by the student:
the same machinery with the roles swapped (`student_scores_of_teacher`, per teacher token).

    bridge = TeacherBridge(teacher_model, student_tok, teacher_tok, student_stop_ids=eos)
    scored = bridge.score(prompts_ids, completions_ids)   # [StudentTokenScores | None] per row
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from foundation.errors import AlignmentError
from model_runtime.logprobs import completion_logprobs
from model_runtime.models import eos_token_ids
from model_runtime.tokenizers import decode_as_rendered, tokenizer_fingerprint
from model_runtime.xtok import CrossTokenizer, TeacherView, score_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentTokenScores:
    """One completion's teacher scores per student token: logprobs (span shares when cross) and span ids."""

    teacher_logprobs_C: torch.Tensor  # float64
    span_id_C: torch.Tensor  # int64, non-decreasing; 0..C-1 with one tokenizer


def singleton_spans(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)


class TeacherBridge:
    """An in-process teacher and the two tokenizers; `cross` is True when the teacher's tokenizer differs."""

    def __init__(self, teacher, student_tokenizer, teacher_tokenizer, *, student_stop_ids: Collection[int],
                 cross: bool | None = None):
        self.teacher = teacher
        self.student_tok, self.teacher_tok = student_tokenizer, teacher_tokenizer
        if cross is None:
            cross = tokenizer_fingerprint(student_tokenizer) != tokenizer_fingerprint(teacher_tokenizer)
        self.cross = cross
        self.teacher_stop_ids = eos_token_ids(teacher_tokenizer, teacher)
        if self.cross:
            self.to_teacher = CrossTokenizer(student_tokenizer, teacher_tokenizer, student_stop_ids)
            self.to_student = CrossTokenizer(teacher_tokenizer, student_tokenizer, self.teacher_stop_ids)
            log.info("the teacher's tokenizer is not the student's: completions are re-rendered in the teacher's "
                     "template and scored over aligned spans; top-k rules (analytic KL, GKD) are off")

    @classmethod
    def shared(cls, teacher, tokenizer) -> TeacherBridge:
        """A teacher known to share the student's tokenizer (no fingerprinting)."""
        return cls(teacher, tokenizer, tokenizer, student_stop_ids=eos_token_ids(tokenizer, teacher), cross=False)

    @classmethod
    def load(cls, teacher_dir, student_tokenizer, student_stop_ids: Collection[int], device, dtype=None
             ) -> TeacherBridge:
        from model_runtime.models import load_model, load_tokenizer

        return cls(load_model(teacher_dir, device, dtype), student_tokenizer, load_tokenizer(teacher_dir),
                   student_stop_ids=student_stop_ids)

    @property
    def pad_id(self) -> int:
        return self.teacher_tok.pad_token_id if self.teacher_tok.pad_token_id is not None else 0

    def view(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> TeacherView:
        """The teacher's rendering of one student trajectory (AlignmentError when it has none)."""
        return self.to_teacher.view(completion_ids, rendered_prompt=decode_as_rendered(self.student_tok, prompt_ids))

    def teacher_prompt_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        """The student's chat prompt as the teacher's template renders it (the prompt ids unchanged when shared)."""
        if not self.cross:
            return list(prompt_ids)
        return self.to_teacher.teacher_prompt(rendered_prompt=decode_as_rendered(self.student_tok, prompt_ids))[1]

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
              temperature: float = 1.0, batch_size: int = 8) -> list[StudentTokenScores | None]:
        """Teacher scores of each (prompt, completion) of the student, per student token; None: not alignable."""
        out: list[StudentTokenScores | None] = [None] * len(prompts)
        for start in range(0, len(prompts), batch_size):
            rows = range(start, min(start + batch_size, len(prompts)))
            if not self.cross:
                scored = completion_logprobs(self.teacher, [prompts[i] for i in rows], [completions[i] for i in rows],
                                             self.pad_id, temperature=temperature)
                for i, s in zip(rows, scored, strict=True):
                    out[i] = StudentTokenScores(s.logprobs_C.double(), singleton_spans(len(completions[i])))
                continue
            views: dict[int, TeacherView] = {}
            for i in rows:
                try:
                    views[i] = self.view(prompts[i], completions[i])
                except AlignmentError as exc:
                    log.debug("completion %d cannot be aligned for the teacher: %s", i, exc)
            projected = score_views(self.teacher, list(views.values()), self.pad_id, temperature=temperature)
            for i, p in zip(views, projected, strict=True):
                out[i] = StudentTokenScores(torch.from_numpy(p.teacher_logprobs_C), torch.from_numpy(p.span_id_C))
        return out

    @torch.no_grad()
    def student_scores_of_teacher(self, student, teacher_prompts: Sequence[Sequence[int]],
                                  teacher_completions: Sequence[Sequence[int]], student_pad_id: int,
                                  batch_size: int = 8) -> list[torch.Tensor | None]:
        """The student's logprobs of the teacher's own samples, per TEACHER token (span shares when cross)."""
        out: list[torch.Tensor | None] = [None] * len(teacher_prompts)
        for start in range(0, len(teacher_prompts), batch_size):
            rows = range(start, min(start + batch_size, len(teacher_prompts)))
            if not self.cross:
                scored = completion_logprobs(student, [teacher_prompts[i] for i in rows],
                                             [teacher_completions[i] for i in rows], student_pad_id)
                for i, s in zip(rows, scored, strict=True):
                    out[i] = s.logprobs_C.double()
                continue
            views: dict[int, TeacherView] = {}
            for i in rows:
                text = decode_as_rendered(self.teacher_tok, teacher_prompts[i])
                try:
                    views[i] = self.to_student.view(teacher_completions[i], rendered_prompt=text)
                except AlignmentError as exc:
                    log.debug("teacher sample %d cannot be aligned for the student: %s", i, exc)
            for i, p in zip(views, score_views(student, list(views.values()), student_pad_id), strict=True):
                out[i] = torch.from_numpy(p.teacher_logprobs_C)
        return out
