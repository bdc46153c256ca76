"""Span alignment: teacher logprobs of the teacher's tokens, mapped back to the student's tokens of the same text.

Two tokenizations of one completion text cut it at different places. A *span* is a maximal run of text that
ends where BOTH tokenizations have a token boundary (`TokenOffsets.boundaries`; a token that ends inside a
character is no boundary). Between two such cuts each side has one or more whole tokens, so every student token
and every teacher token belongs to exactly one span, and a span's teacher logprob

    T_s = sum of log p_teacher(u | teacher prefix) over the teacher tokens u of span s

is the teacher's logprob of the span's text given everything before it: the teacher's sequence logprob is
`sum_s T_s`, exactly (it is the teacher's logprob of its own tokenization of the text, a lower bound of the
teacher's probability of the text over all tokenizations; that is what a teacher forward pass can give).

The spreading rule (what a student token of a span receives), from the sequence-level reverse KL
-------------------------------------------------------------------------------------------------
The student's sequence logprob splits the same way, S_s = sum of log pi(y_t | s_t) over the span's student
tokens, so KL(pi || teacher) over texts = E[sum_s (S_s - T_s)]. Its score-function gradient is
E[sum_t grad log pi(y_t | s_t) * sum_{s' : s' ends at or after t} (S_s' - T_s')]: token t is charged with the
WHOLE log-ratio of its own span (the span's teacher logprob depends on every student token of the span: the
teacher judges the span's text only once all of it is written) plus those of all later spans. Rule 1 drops the
later ones (its per-token advantage is the immediate term); at span granularity the immediate term of token t
is its span's whole advantage:

    A_t = R_s = T_s - S_s          for every student token t of span s   (S_s with the current policy's lp)

Worked example, student "a" "b" vs teacher "ab" (one span): A_a = A_b = T(ab) - lp(a) - lp(b). Had the teacher
shared the student's tokens, rule 1 would give A_a = T(a) - lp(a) and A_b = T(b|a) - lp(b). The span rule gives
token a its rule-1 term plus T(b|a) - lp(b), a term of its own return-to-go that rule 1 truncates (closer to the
exact sequence-level gradient, not farther), and token b its rule-1 term plus A_a, which was fixed before b was
drawn (E[A_a grad log pi(b|a)] = 0: variance, no bias). The alternatives are biased: "split over the span's
tokens" (R_s / n_s each) scales each token's own term by 1 / n_s, so spans where the student cuts finer than the
teacher learn n_s times slower (Gemma's 262k pieces are longer than SmolLM2's 49k: 40 SmolLM2 tokens made 29
spans in the integration test); "all to the last token" leaves the earlier tokens of a span without any
signal. When both tokenizations agree token for token, every span is one token and A_t is rule 1 exactly.
(Off-policy, the span's other tokens were drawn from the behaviour policy: the exact weight of a span is the
product of its tokens' ratios; the per-token ratio of rule 1 is exact on fresh samples and rollouts, rule 3.)

What is stored per student token, so that nothing else has to know about spans:
- `span_id_C`: the span of each student token (0, 0, 1, 2, 2, 2, ...), and
- `teacher_logprobs_C`: the span's teacher logprob shared uniformly over its student tokens, T_s / n_s. The
  shares of a span sum to T_s, so `span_advantages` recovers R_s = sum_{t in s} (share_t - lp_t) from the
  per-token columns alone, and the per-token mean of (lp_t - share_t) is the exact sequence-level reverse KL
  per student token (the held-out meter can use the shares as it uses same-tokenizer teacher logprobs). A share
  is NOT a per-token teacher logprob: train on `span_advantages`, never on share_t - lp_t token by token.
Rule 2 (analytic KL over the teacher's top-k) needs one vocabulary: cross-tokenizer rows carry no top-k.

    alignment = align_spans(student_offsets, teacher_offsets)
    scores = alignment.project(teacher_logprobs_U)          # per student token: share + span id
    A_BC = span_advantages(span_id_BC, share_BC, lp_new_BC.detach(), mask_BC)   # in the trainer
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from foundation.errors import AlignmentError
from model_runtime.xtok.offsets import TokenOffsets, first_difference


@dataclass(frozen=True)
class CrossTokenizerScores:
    """Teacher scores projected onto the student's tokens (see the module docstring for the rule)."""

    teacher_logprobs_C: np.ndarray  # float64: T_s / n_s for each student token t of span s
    span_id_C: np.ndarray  # int64: span of each student token, non-decreasing, 0..S-1
    span_teacher_logprob_S: np.ndarray  # float64: T_s
    span_student_tokens_S: np.ndarray  # int64: n_s (>= 1)
    span_teacher_tokens_S: np.ndarray  # int64: m_s (>= 1)

    @property
    def n_spans(self) -> int:
        return len(self.span_teacher_logprob_S)


@dataclass(frozen=True)
class SpanAlignment:
    """Which span each student token and each teacher token belongs to.

    Span s covers characters [span_ends[s - 1], span_ends[s]) of the text (span_ends[-1] = len(text)); an
    end-of-turn span (`end_of_turn`) pairs the student's stop token with the teacher's end-of-turn token and
    covers no text (its range is empty, at the end)."""

    student_span: tuple[int, ...]
    teacher_span: tuple[int, ...]
    span_ends: tuple[int, ...]
    end_of_turn: bool = False

    @property
    def n_spans(self) -> int:
        return len(self.span_ends)

    def span_chars(self, s: int) -> tuple[int, int]:
        return (self.span_ends[s - 1] if s else 0), self.span_ends[s]

    def with_end_of_turn(self) -> SpanAlignment:
        """One more span: the student's stop token (after its tokens) with the teacher's end-of-turn token."""
        if self.end_of_turn:
            raise AlignmentError("the alignment already ends with an end-of-turn span")
        s, end = self.n_spans, (self.span_ends[-1] if self.span_ends else 0)
        return SpanAlignment((*self.student_span, s), (*self.teacher_span, s), (*self.span_ends, end), True)

    def project(self, teacher_logprobs_U: Sequence[float] | np.ndarray | torch.Tensor) -> CrossTokenizerScores:
        """Sum the teacher's per-token logprobs per span and share each span's sum over its student tokens."""
        lp_U = np.asarray(teacher_logprobs_U.tolist() if isinstance(teacher_logprobs_U, torch.Tensor)
                          else teacher_logprobs_U, dtype=np.float64).reshape(-1)
        if len(lp_U) != len(self.teacher_span):
            raise AlignmentError(f"{len(lp_U)} teacher logprobs for {len(self.teacher_span)} teacher tokens")
        S = self.n_spans
        teacher_span_U = np.asarray(self.teacher_span, dtype=np.int64)
        student_span_C = np.asarray(self.student_span, dtype=np.int64)
        span_lp_S = np.zeros(S, dtype=np.float64)
        np.add.at(span_lp_S, teacher_span_U, lp_U)
        n_S = np.bincount(student_span_C, minlength=S)
        m_S = np.bincount(teacher_span_U, minlength=S)
        share_C = span_lp_S[student_span_C] / n_S[student_span_C] if S else np.zeros(0)
        return CrossTokenizerScores(share_C, student_span_C, span_lp_S, n_S, m_S)


def align_spans(student: TokenOffsets, teacher: TokenOffsets) -> SpanAlignment:
    """Spans of one text under two tokenizations (pure; see the module docstring).

    A clean token ending at character e belongs to the first span that ends at or after e; a token that ends
    inside a character (its `ends` is where that character starts) to the first span ending after it."""
    if student.text != teacher.text:
        raise AlignmentError(f"the two tokenizations are of different texts: {first_difference(student.text, teacher.text)}")
    n = len(student.text)
    if n == 0:
        if len(student) or len(teacher):
            raise AlignmentError(f"{len(student)} student and {len(teacher)} teacher tokens spell no text")
        return SpanAlignment((), (), ())
    for side, offsets in (("student", student), ("teacher", teacher)):
        if not offsets.ends or offsets.ends[-1] != n or not offsets.clean[-1]:
            raise AlignmentError(f"the {side} tokens do not end cleanly at the end of the text")
    ends_S, clean_S = np.asarray(student.ends), np.asarray(student.clean)
    ends_T, clean_T = np.asarray(teacher.ends), np.asarray(teacher.clean)
    cuts = np.intersect1d(ends_S[clean_S], ends_T[clean_T])  # sorted; the last one is n

    def spans(ends: np.ndarray, clean: np.ndarray) -> tuple[int, ...]:
        return tuple(np.where(clean, np.searchsorted(cuts, ends, "left"), np.searchsorted(cuts, ends, "right")).tolist())

    alignment = SpanAlignment(spans(ends_S, clean_S), spans(ends_T, clean_T), tuple(cuts.tolist()))
    # Both sides have a clean token ending at every cut, so every span has a token on each side.
    for side, ids in (("student", alignment.student_span), ("teacher", alignment.teacher_span)):
        if np.bincount(ids, minlength=len(cuts)).min() < 1 or ids[-1] != len(cuts) - 1:
            raise AlignmentError(f"internal: the {side} tokens miss a span ({ids} for {len(cuts)} spans)")
    return alignment


def span_advantages(span_id_BC: torch.Tensor, teacher_logprobs_BC: torch.Tensor, logprobs_BC: torch.Tensor,
                    mask_BC: torch.Tensor) -> torch.Tensor:
    """Per student token, its span's advantage R_s = sum over the span's tokens of (share - lp); 0 where masked.

    `teacher_logprobs_BC` are the stored shares (`CrossTokenizerScores.teacher_logprobs_C`), `logprobs_BC`
    the current policy's (detach them, as rule 1 does), `span_id_BC` the stored span ids (any value where
    `mask_BC` is False). A batch of same-tokenizer rows (span_id = 0..C-1) gives rule 1's share - lp."""
    B, C = span_id_BC.shape
    if C == 0:
        return torch.zeros_like(logprobs_BC)
    diff_BC = torch.where(mask_BC, teacher_logprobs_BC.to(logprobs_BC.dtype) - logprobs_BC,
                          torch.zeros((), dtype=logprobs_BC.dtype, device=logprobs_BC.device))
    # A span has at least one student token, so span ids are < C and b * C + span is unique per (row, span).
    row_B1 = torch.arange(B, device=span_id_BC.device).unsqueeze(1) * C
    flat_BC = torch.where(mask_BC, span_id_BC.long() + row_B1, torch.zeros_like(row_B1))
    sums = torch.zeros(B * C, dtype=logprobs_BC.dtype, device=logprobs_BC.device)
    sums = sums.index_add(0, flat_BC.reshape(-1), diff_BC.reshape(-1))
    return torch.where(mask_BC, sums[flat_BC], torch.zeros((), dtype=logprobs_BC.dtype, device=logprobs_BC.device))
