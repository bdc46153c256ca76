"""The scorer's batched store reads and writes, on SQLite and PostgreSQL: landing counts exactly what was new, the
backlog's keys match `pending`, and rows come back as landed."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.records import LoggedTrajectory, TeacherScores
from feature_store.store import FeatureStore
from foundation.errors import StoreError
from scoring_support import trajectories

pytestmark = pytest.mark.integration


@pytest.fixture
def store(store_url):
    s = FeatureStore.open(store_url)
    yield s
    s.engine.dispose()


def test_landing_counts_only_the_new_rows_of_a_partly_replayed_poll(store):
    trajs = trajectories(10, 50, seed=41)
    store.land([LoggedTrajectory(t, 0, i) for i, t in enumerate(trajs[:4])])
    assert store.land([LoggedTrajectory(t, 0, i) for i, t in enumerate(trajs)]) == 6


def test_score_writes_count_only_the_new_rows(store):
    trajs = trajectories(3, 50, seed=42)
    store.land([LoggedTrajectory(t, 0, i) for i, t in enumerate(trajs)])
    items = [(t, TeacherScores(-np.ones(len(t.completion_token_ids), np.float32))) for t in trajs]
    store.write_scores(items[:1], "teacher")
    assert store.write_scores(items, "teacher").new_scores == 2


def test_pending_keys_are_the_keys_of_pending_with_their_lengths(store):
    trajs = trajectories(6, 50, seed=43)
    store.land([LoggedTrajectory(t, i % 2, i) for i, t in enumerate(trajs)])
    keys = store.pending_keys("teacher", [1], limit=2)
    full = store.pending("teacher", [1], limit=2)
    assert [(k.trajectory_id, k.partition, k.offset, k.tokens) for k in keys] == [
        (lt.trajectory.trajectory_id, lt.partition, lt.offset,
         len(lt.trajectory.prompt_token_ids) + len(lt.trajectory.completion_token_ids)) for lt in full]


def test_load_logged_returns_the_landed_trajectories_in_the_order_asked(store):
    trajs = trajectories(3, 50, seed=44)
    store.land([LoggedTrajectory(t, 2, 10 + i) for i, t in enumerate(trajs)])
    got = store.load_logged([trajs[2].trajectory_id, trajs[0].trajectory_id])
    assert [(lt.trajectory.prompt_token_ids, lt.partition, lt.offset) for lt in got] == [
        (trajs[2].prompt_token_ids, 2, 12), (trajs[0].prompt_token_ids, 2, 10)]


def test_load_logged_names_a_missing_trajectory(store):
    with pytest.raises(StoreError, match="not in the store"):
        store.load_logged(["nope"])
