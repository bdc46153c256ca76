"""The live paired comparison of shadow mode, against hand-computed values."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from feature_store import ScoredTrajectory, TeacherScores
from nightly_train.live import compare_live, pair_kind, paired_interval, teacher_penalty
from schemas.trajectory import SamplingParams

T1 = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=4)
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=4)
T07 = SamplingParams(temperature=0.7, top_p=1.0, top_k=0, max_tokens=4)


def _traj(own, teacher, sampling=T1, kind="sampled", version=None) -> ScoredTrajectory:
    return ScoredTrajectory(trajectory_id="t", created_at=datetime(2026, 1, 1, tzinfo=UTC), adapter_version=version,
                            sampling=sampling, logprob_kind=kind, prompt_ids=[1], completion_ids=list(range(len(own))),
                            behaviour_logprobs_C=np.array(own, np.float32),
                            teacher=TeacherScores(np.array(teacher, np.float32)))


def test_teacher_penalty_is_the_mean_gap_over_the_answer():
    assert teacher_penalty(_traj([-0.5, -1.0], [-1.5, -1.0])) == pytest.approx(0.5)


@pytest.mark.parametrize("sampling, kind, expected", [(T1, "sampled", "t1"), (GREEDY, "raw", "greedy"),
                                                      (T07, "sampled", None)])
def test_only_raw_logprobs_make_a_pair_kind(sampling, kind, expected):
    assert pair_kind(_traj([-1.0], [-1.0], sampling, kind)) == expected


def test_paired_interval_by_hand():
    """d = (1, 2, 3): mean 2, sd 1, t(0.975, 2) = 4.302653 -> 2 +- 4.302653 / sqrt(3)."""
    mean, low, high = paired_interval([1.0, 2.0, 3.0], 0.95)
    assert mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert mean - low == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)


def test_a_candidate_closer_to_the_teacher_has_a_negative_interval():
    pairs = [(_traj([-0.2 - 0.01 * i], [-1.0]), _traj([-0.7 - 0.01 * i], [-1.0], version="7")) for i in range(10)]
    (comparison,) = compare_live(pairs, "7")
    assert comparison.kind == "t1"
    assert comparison.n_pairs == 10
    assert comparison.difference == pytest.approx(-0.5)
    assert comparison.candidate_better


def test_kinds_are_reported_apart_and_tempered_pairs_left_out():
    pairs = [(_traj([-0.5], [-1.0], GREEDY, "raw"), _traj([-0.4], [-1.0], GREEDY, "raw")),
             (_traj([-0.6], [-1.0], GREEDY, "raw"), _traj([-0.3], [-1.0], GREEDY, "raw")),
             (_traj([-0.5], [-1.0], T07), _traj([-0.4], [-1.0], T07))]
    comparisons = compare_live(pairs, "7")
    assert [c.kind for c in comparisons] == ["greedy"]
    assert comparisons[0].n_pairs == 2


def test_tags_carry_every_number():
    pairs = [(_traj([-0.5], [-1.0]), _traj([-0.4], [-1.0])), (_traj([-0.6], [-1.0]), _traj([-0.3], [-1.0]))]
    tags = compare_live(pairs, "7")[0].to_tags()
    assert set(tags) == {f"live.t1.{k}" for k in ("pairs", "champion", "candidate", "difference", "ci_low",
                                                   "ci_high", "confidence")}
    assert tags["live.t1.pairs"] == "2"
