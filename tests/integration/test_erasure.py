"""Erasing one caller from the feature store (SQLite and PostgreSQL): their rows and scores go, other callers'
stay, frozen manifests lose their ids, and what still arrives for them is never landed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from feature_store.records import LoggedTrajectory
from feature_store.store import FeatureStore, TeacherScores
from foundation.errors import StoreError
from schemas.trajectory import SamplingParams, TrajectoryV1
from serving.trajectories import caller_hash

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, tzinfo=UTC)
TEACHER = "tiny-teacher"
SALT = "a-salt-of-at-least-sixteen-chars"
ALICE, BOB = caller_hash("alice", SALT), caller_hash("bob", SALT)


def _traj(i: int, caller: str, user: str | None = None) -> TrajectoryV1:
    return TrajectoryV1(trajectory_id=f"t{i:03d}", request_id=f"r{i}", choice_index=0,
                        created_at=T0 + timedelta(minutes=i), caller_hash=caller, user_hash=user,
                        base_model_id="tiny-student", sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0,
                                                                              max_tokens=4),
                        prompt_token_ids=[1, 2, i + 3], completion_token_ids=[5, 6], behaviour_logprobs=[-0.5, -0.5],
                        logprob_kind="sampled", finish_reason="length", prompt_text=f"secret of {caller[:6]}")


@pytest.fixture
def store(store_url):
    s = FeatureStore.open(store_url)
    trajs = [_traj(i, ALICE if i % 2 else BOB) for i in range(8)]
    s.ingest_scored([(t, TeacherScores(np.array([-1.0, -1.0], np.float32))) for t in trajs], TEACHER)
    s.freeze_manifest("night-1", T0, T0 + timedelta(hours=1), TEACHER, [t.trajectory_id for t in trajs[:6]],
                      [t.trajectory_id for t in trajs[6:]])
    yield s
    s.engine.dispose()


def test_forget_deletes_the_callers_rows_and_scores_and_keeps_the_others(store):
    report = store.forget("caller", ALICE, actor="dpo")
    left = store.scored_ids(TEACHER)
    assert report.trajectories == 4
    assert report.scores == 4
    assert left == ["t000", "t002", "t004", "t006"]


def test_forget_takes_the_ids_out_of_frozen_manifests(store):
    report = store.forget("caller", ALICE, actor="dpo")
    row = store.get_manifest("night-1")
    assert report.manifests_edited == ["night-1"]
    assert report.heldout_nights == ["night-1"]  # t007 was held out
    assert (row.n_train, row.n_heldout) == (3, 1)


def test_what_still_arrives_for_an_erased_caller_is_never_landed(store):
    store.forget("caller", ALICE, actor="dpo")
    late = [_traj(20, ALICE), _traj(21, BOB)]
    assert store.land([LoggedTrajectory(t, 0, 20 + i) for i, t in enumerate(late)]) == 1
    assert [t.trajectory_id for t in store.unscored(TEACHER)] == ["t021"]


def test_an_erased_end_user_is_dropped_whatever_key_sent_it(store):
    user = "u" * 64
    store.forget("user", user, actor="dpo")
    assert store.land([LoggedTrajectory(_traj(30, BOB, user), 0, 30)]) == 0


def test_forget_is_idempotent(store):
    store.forget("caller", ALICE, actor="dpo")
    again = store.forget("caller", ALICE, actor="dpo")
    assert again.trajectories == 0


def test_a_malformed_hash_is_refused(store):
    with pytest.raises(StoreError, match="sha256"):
        store.forget("caller", "alice", actor="dpo")
