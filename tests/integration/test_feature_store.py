"""The feature store against SQLite and PostgreSQL: idempotent writes, windows, coverage, manifests, purge, checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from feature_store.store import FeatureStore, TeacherScores
from schemas.tables import TeacherScoreRow, TrajectoryRow
from schemas.trajectory import SamplingParams, TrajectoryV1
from foundation.errors import AlignmentError, StoreError

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, tzinfo=UTC)
TEACHER = "tiny-teacher"


def _traj(i: int, minutes: int, adapter: str | None = None, n: int = 3) -> TrajectoryV1:
    return TrajectoryV1(
        trajectory_id=f"t{i:03d}", request_id=f"r{i}", choice_index=0, created_at=T0 + timedelta(minutes=minutes),
        base_model_id="tiny-student", adapter_version=adapter,
        sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_tokens=8, seed=i),
        prompt_token_ids=[1, 2, i % 50 + 3], completion_token_ids=[(i + j) % 90 + 4 for j in range(n)],
        behaviour_logprobs=[-0.25 * (j + 1) for j in range(n)], logprob_kind="sampled", finish_reason="length",
        prompt_text="hi", completion_text="there",
    )


def _scores(traj: TrajectoryV1, topk: int = 0, shift: float = 0.0) -> TeacherScores:
    n = len(traj.completion_token_ids)
    lp_C = -np.linspace(0.1, 1.0, n, dtype=np.float32) - shift
    if not topk:
        return TeacherScores(lp_C)
    return TeacherScores(lp_C, np.arange(n * topk).reshape(n, topk), -np.ones((n, topk), dtype=np.float32))


@pytest.fixture
def store(store_url) -> FeatureStore:
    s = FeatureStore.open(store_url)
    yield s
    s.engine.dispose()


def _rows(store: FeatureStore, table) -> int:
    with Session(store.engine) as s:
        return s.execute(select(func.count()).select_from(table)).scalar_one()


def test_ingest_is_idempotent_per_trajectory_and_teacher(store):
    a, b = _traj(1, 0), _traj(2, 1)
    store.ingest_scored([(a, _scores(a)), (b, _scores(b))], TEACHER)
    # The same messages again (a replay), with different numbers: nothing is written, the first write stays.
    store.ingest_scored([(a, _scores(a, shift=5.0)), (b, _scores(b))], TEACHER)
    assert _rows(store, TrajectoryRow) == 2
    assert _rows(store, TeacherScoreRow) == 2
    np.testing.assert_array_equal(store.load_scored(["t001"], TEACHER)[0].teacher.teacher_logprobs_C,
                                  _scores(a).teacher_logprobs_C)
    # A second teacher adds a score row, not a trajectory row.
    store.ingest_scored([(a, _scores(a, topk=2))], "other-teacher")
    assert _rows(store, TrajectoryRow) == 2
    assert _rows(store, TeacherScoreRow) == 3


def test_ingest_returns_how_many_scores_were_new(store):
    a, b, c = _traj(1, 0), _traj(2, 1), _traj(3, 2)
    assert store.ingest_scored([(a, _scores(a)), (b, _scores(b))], TEACHER) == 2
    assert store.ingest_scored([(a, _scores(a)), (c, _scores(c))], TEACHER) == 1
    assert store.ingest_scored([(a, _scores(a)), (c, _scores(c))], TEACHER) == 0
    assert store.ingest_scored([], TEACHER) == 0


def test_round_trip_keeps_every_array_and_field(store):
    a = _traj(7, 3, adapter="5", n=4)
    store.ingest_scored([(a, _scores(a, topk=3))], TEACHER)
    got = store.load_scored(["t007"], TEACHER)[0]
    assert got.prompt_ids == a.prompt_token_ids
    assert got.completion_ids == a.completion_token_ids
    np.testing.assert_array_equal(got.behaviour_logprobs_C, np.float32(a.behaviour_logprobs))
    assert got.created_at == a.created_at
    assert got.adapter_version == "5"
    assert got.sampling == a.sampling
    assert got.teacher.topk == 3
    assert got.teacher.topk_ids_CK.tolist() == np.arange(12).reshape(4, 3).tolist()


def test_a_wrong_length_score_writes_nothing(store):
    a, b = _traj(1, 0), _traj(2, 1)
    with pytest.raises(AlignmentError, match="t002"):
        store.ingest_scored([(a, _scores(a)), (b, TeacherScores(np.zeros(2, dtype=np.float32)))], TEACHER)
    assert _rows(store, TrajectoryRow) == 0


def test_window_queries_are_half_open_and_ordered(store):
    trajs = [_traj(i, m, adapter=ad) for i, m, ad in [(5, 10, None), (3, 0, "1"), (4, 0, "1"), (1, 20, "2"),
                                                      (2, 30, None)]]
    store.ingest_scored([(t, _scores(t)) for t in trajs[:4]], TEACHER)
    store.ingest_scored([(trajs[4], _scores(trajs[4]))], "other-teacher")
    assert store.scored_ids(TEACHER) == ["t003", "t004", "t005", "t001"]  # by time, ties by id
    assert store.scored_ids(TEACHER, T0, T0 + timedelta(minutes=20)) == ["t003", "t004", "t005"]
    assert store.scored_ids(TEACHER, T0 + timedelta(minutes=10), None) == ["t005", "t001"]
    assert store.scored_ids(TEACHER, adapter_version=None) == ["t005"]
    assert store.scored_ids(TEACHER, adapter_version="1") == ["t003", "t004"]
    assert store.count_trajectories(T0, T0 + timedelta(minutes=30)) == 4
    assert store.count_scored(TEACHER, T0 + timedelta(minutes=1)) == 2
    # A timezone-less bound means UTC.
    assert store.scored_ids(TEACHER, datetime(2025, 3, 1, 0, 10), None) == ["t005", "t001"]


def test_coverage_counts_scored_over_stored(store):
    trajs = [_traj(i, i) for i in range(4)]
    store.ingest_scored([(t, _scores(t)) for t in trajs], TEACHER)
    store.ingest_scored([(t, _scores(t)) for t in trajs[:1]], "other-teacher")
    assert store.coverage(TEACHER) == 1.0
    assert store.coverage("other-teacher") == 0.25
    assert store.coverage("other-teacher", T0 + timedelta(minutes=1)) == 0.0
    assert store.coverage("other-teacher", T0 + timedelta(days=1), T0 + timedelta(days=2)) == 1.0  # empty window


def test_manifest_freezes_once(store):
    end = T0 + timedelta(days=1)
    first = store.freeze_manifest("2025-03-01", T0, end, TEACHER, ["t001", "t002"], ["t003"])
    again = store.freeze_manifest("2025-03-01", T0, end, "other-teacher", ["t009"], [])
    assert again.train_ids_json == first.train_ids_json == '["t001", "t002"]'
    assert (again.teacher_id, again.n_train, again.n_heldout) == (TEACHER, 2, 1)
    assert store.get_manifest("2025-03-02") is None


def test_purge_deletes_old_trajectories_and_their_scores(store):
    trajs = [_traj(i, 60 * i) for i in range(4)]
    store.ingest_scored([(t, _scores(t)) for t in trajs], TEACHER)
    store.ingest_scored([(t, _scores(t)) for t in trajs], "other-teacher")
    assert store.purge(T0 + timedelta(minutes=120)) == 2
    assert _rows(store, TrajectoryRow) == 2
    assert _rows(store, TeacherScoreRow) == 4
    assert store.scored_ids(TEACHER) == ["t002", "t003"]
    assert store.purge(T0) == 0


def test_reads_check_stored_lengths(store):
    a, b = _traj(1, 0), _traj(2, 1)
    store.ingest_scored([(a, _scores(a)), (b, _scores(b, topk=2))], TEACHER)
    with pytest.raises(StoreError, match="1 trajectories not scored"):
        store.load_scored(["t001", "missing"], TEACHER)
    with Session(store.engine) as s, s.begin():
        s.execute(update(TeacherScoreRow).where(TeacherScoreRow.trajectory_id == "t001")
                  .values(teacher_logprobs=b"\x00" * 8))  # 2 floats for 3 tokens
        s.execute(update(TeacherScoreRow).where(TeacherScoreRow.trajectory_id == "t002")
                  .values(topk_token_ids=b"\x00" * 10))  # not a whole number of int32
    with pytest.raises(StoreError, match="teacher logprobs: stored 2 items, expected 3"):
        store.load_scored(["t001"], TEACHER)
    with pytest.raises(StoreError, match="top-k ids: 10 bytes"):
        store.load_scored(["t002"], TEACHER)
    with Session(store.engine) as s, s.begin():
        s.execute(update(TeacherScoreRow).where(TeacherScoreRow.trajectory_id == "t002").values(n_tokens=4))
    with pytest.raises(StoreError, match="teacher scored 4 tokens, trajectory has 3"):
        store.load_scored(["t002"], TEACHER)


def test_serving_sized_seeds_and_nul_texts_are_stored(store):
    """Serving draws 62-bit seeds and users can type NUL: neither may make the database refuse a trajectory."""
    t = _traj(9, 0).model_copy(update={"prompt_text": "a\x00b"})
    t = t.model_copy(update={"sampling": t.sampling.model_copy(update={"seed": 2**62 + 5})})
    assert store.ingest_scored([(t, _scores(t))], TEACHER) == 1
    assert store.load_scored([t.trajectory_id], TEACHER)[0].sampling.seed == 2**62 + 5
