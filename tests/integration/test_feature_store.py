"""The feature store against SQLite and PostgreSQL: idempotent writes, windows, coverage, manifests, purge, checks;
landing with log progress, scores written after, and the window status built from them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from feature_store.records import LoggedTrajectory, PartitionProgress
from feature_store.store import FeatureStore, TeacherScores
from schemas.prompts import prompt_hash
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
    assert got.base_model_id == "tiny-student"
    assert got.prompt_hash == prompt_hash(a.prompt_token_ids)
    assert (got.tokenizer_fingerprint, got.teacher_temperature) == (None, None)  # ingest_scored was not told


def test_ingest_scored_stamps_the_teachers_tokenizer_and_temperature(store):
    a = _traj(7, 3)
    store.ingest_scored([(a, _scores(a))], TEACHER, tokenizer_fingerprint="tok-0123456789abcdef",
                        teacher_temperature=2.0)
    got = store.load_scored(["t007"], TEACHER)[0]
    assert (got.tokenizer_fingerprint, got.teacher_temperature) == ("tok-0123456789abcdef", 2.0)


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


# ---- landing, progress, window status ---------------------------------------------------------------------------
GROUP, TOPIC = "shadow-scoring", "shadow.trajectories.v1"


def _landed(i: int, minutes: int, partition: int, offset: int) -> LoggedTrajectory:
    return LoggedTrajectory(_traj(i, minutes), partition, offset)


def _progress(partition: int, next_offset: int, *, newest: int | None = None, caught_up: int | None = None,
              total: int = 2) -> PartitionProgress:
    """Progress of one partition; `newest` / `caught_up` are minutes after T0."""
    at = (lambda m: None if m is None else T0 + timedelta(minutes=m))
    return PartitionProgress(GROUP, TOPIC, partition, next_offset, total, at(newest), at(caught_up))


def _status(store, start=T0, end=T0 + timedelta(minutes=30)):
    return store.window_status(TEACHER, start, end, topic=TOPIC, group_id=GROUP)


def test_land_is_idempotent_and_keeps_where_the_trajectory_sat(store):
    first = store.land([_landed(1, 0, 1, 7), _landed(2, 1, 0, 3)], [_progress(1, 8), _progress(0, 4)])
    again = store.land([_landed(1, 0, 0, 99)], [_progress(0, 100)])  # a replay elsewhere changes nothing
    [pending] = store.pending(TEACHER, [1])
    assert (first, again) == (2, 0)
    assert _rows(store, TrajectoryRow) == 2
    assert (pending.trajectory.trajectory_id, pending.partition, pending.offset) == ("t001", 1, 7)


def test_progress_keeps_the_maximum_and_ignores_missing_values(store):
    store.land([], [_progress(0, 10, newest=20, caught_up=25)])
    store.land([], [_progress(0, 4, newest=5)])  # an older batch replayed after a rebalance
    [p] = store.log_progress(GROUP, TOPIC)
    assert p.next_offset == 10
    assert p.max_created_at == T0 + timedelta(minutes=20)
    assert p.caught_up_at == T0 + timedelta(minutes=25)


def test_progress_moves_forward(store):
    store.land([], [_progress(0, 10, newest=20)])
    store.land([], [_progress(0, 12, newest=21, caught_up=40, total=3)])
    [p] = store.log_progress(GROUP, TOPIC)
    assert (p.next_offset, p.max_created_at, p.caught_up_at, p.partitions_total) == (
        12, T0 + timedelta(minutes=21), T0 + timedelta(minutes=40), 3)


def test_one_landing_records_one_group(store):
    other = PartitionProgress("other-group", TOPIC, 1, 1, 2)
    with pytest.raises(StoreError, match="one group and topic"):
        store.land([], [_progress(0, 1), other])


def test_the_watermark_waits_for_every_partition(store):
    store.land([_landed(1, 10, 0, 0)], [_progress(0, 1, newest=40)])
    assert _status(store).watermark is None  # partition 1 of 2 never seen
    assert _status(store).partitions_seen == 1
    store.land([], [_progress(1, 0, caught_up=35)])  # idle, found caught up at T0 + 35 min
    assert _status(store).watermark == T0 + timedelta(minutes=35)
    assert _status(store).partitions_seen == 2


def test_window_status_counts_landed_scored_and_refused(store):
    trajs = [_traj(i, i) for i in range(4)]
    store.land([LoggedTrajectory(t, i % 2, i) for i, t in enumerate(trajs)],
               [_progress(0, 2, newest=3, caught_up=60), _progress(1, 2, newest=3, caught_up=60)])
    store.write_scores([(trajs[0], _scores(trajs[0])), (trajs[1], _scores(trajs[1]))], TEACHER,
                       rejected=[(trajs[2].trajectory_id, "token id 999 >= teacher vocabulary size 384")])
    status = _status(store)
    assert (status.landed, status.scored, status.rejected) == (4, 2, 1)
    assert status.coverage == 0.75
    assert store.coverage(TEACHER) == 0.75
    assert not status.complete(T0 + timedelta(minutes=30), lateness_s=600, threshold=0.8)
    assert status.complete(T0 + timedelta(minutes=30), lateness_s=600, threshold=0.75)


def test_a_trajectory_landed_after_the_watermark_passed_the_window_is_counted_late(store):
    store.land([_landed(1, 10, 0, 0)], [_progress(0, 1, newest=10, caught_up=50), _progress(1, 0, caught_up=50)])
    store.land([_landed(2, 5, 1, 0)], [_progress(1, 1, newest=5)])  # created at +5 min, landed once +50 was seen
    assert (_status(store).late, _status(store, end=T0 + timedelta(minutes=60)).late) == (1, 0)


def test_pending_is_the_unscored_unrefused_backlog_of_the_owned_partitions(store):
    trajs = [_traj(i, 10 - i) for i in range(5)]
    store.land([LoggedTrajectory(t, i % 2, i) for i, t in enumerate(trajs)])
    store.write_scores([(trajs[4], _scores(trajs[4]))], TEACHER, rejected=[(trajs[2].trajectory_id, "refused")])
    assert [lt.trajectory.trajectory_id for lt in store.pending(TEACHER, [0])] == ["t000"]
    assert [lt.trajectory.trajectory_id for lt in store.pending(TEACHER, [0, 1])] == ["t003", "t001", "t000"]
    assert [lt.trajectory.trajectory_id for lt in store.pending("other-teacher", [0, 1], limit=2)] == ["t004", "t003"]
    assert store.pending(TEACHER, []) == []


def test_write_scores_is_idempotent_and_stamps_every_row(store):
    a = _traj(1, 0)
    store.land([LoggedTrajectory(a, 0, 0)])
    first = store.write_scores([(a, _scores(a, topk=2))], TEACHER, tokenizer_fingerprint="tok-abc",
                               teacher_temperature=1.0)
    again = store.write_scores([(a, _scores(a, shift=3.0))], TEACHER, tokenizer_fingerprint="tok-other")
    [got] = store.load_scored(["t001"], TEACHER)
    assert (first.new_scores, again.new_scores) == (1, 0)
    assert (first.payload_bytes, first.tokens) == (3 * (4 + 2 * 8), 3)
    assert (got.tokenizer_fingerprint, got.teacher_temperature) == ("tok-abc", 1.0)


def test_scored_prompt_index_lists_the_windows_prompts_oldest_first(store):
    trajs = [_traj(i, m) for i, m in [(5, 10), (3, 0), (4, 0)]]
    store.ingest_scored([(t, _scores(t)) for t in trajs], TEACHER)
    store.land([LoggedTrajectory(_traj(6, 1), 0, 0)])  # landed, not scored
    assert store.scored_prompt_index(TEACHER, T0, T0 + timedelta(hours=1)) == [
        ("t003", prompt_hash(trajs[1].prompt_token_ids)), ("t004", prompt_hash(trajs[2].prompt_token_ids)),
        ("t005", prompt_hash(trajs[0].prompt_token_ids))]


@pytest.mark.parametrize("extra", [{"min_p": 0.1}, {"min_tokens": 4}, {"ignore_eos": True}])
def test_every_sampling_parameter_survives_the_store(store, extra):
    """A min_p-cut sample must not read back as an untruncated temperature-1 one (rule 1 would take it)."""
    t = _traj(1, 0).model_copy(update={"sampling": SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=8,
                                                                  **extra)})
    store.ingest_scored([(t, _scores(t))], TEACHER)
    back = store.load_scored([t.trajectory_id], TEACHER)[0]
    assert back.sampling == t.sampling
    assert not back.sampling.is_untruncated_temperature_one


def test_the_end_users_hash_survives_the_store(store):
    t = _traj(1, 0).model_copy(update={"user_hash": "u" * 64})
    store.land([LoggedTrajectory(t, 0, 0)])
    assert store.unscored(TEACHER)[0].user_hash == "u" * 64


# ---- trajectory v2 and cross-tokenizer scores (migration 0008) ----------------------------------------------------
def _traj_v2(i: int, minutes: int, **over):
    from schemas.trajectory import TrajectoryV2

    fields = _traj(i, minutes).model_dump(exclude={"schema_version", "prompt_text", "completion_text"})
    fields.update(prompt_kind="chat", messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "hi", "name": "ann"}],
                  prompt_text="<s>hi</s>", completion_text="th\u00e9", completion_offsets=[2, 2, 3])
    fields.update(over)
    return TrajectoryV2(**fields)


def test_a_v2_trajectory_comes_back_as_it_was_logged(store):
    t = _traj_v2(1, 0)
    store.land([LoggedTrajectory(t)])
    assert store.load_logged([t.trajectory_id])[0].trajectory == t


def test_a_v2_text_prompt_comes_back_as_it_was_logged(store):
    t = _traj_v2(2, 0, prompt_kind="text", messages=None)
    store.land([LoggedTrajectory(t)])
    assert store.load_logged([t.trajectory_id])[0].trajectory == t


def test_v1_and_v2_trajectories_land_side_by_side(store):
    old, new = _traj(3, 0), _traj_v2(4, 0)
    store.land([LoggedTrajectory(old), LoggedTrajectory(new)])
    assert [lt.trajectory.schema_version for lt in store.load_logged([old.trajectory_id, new.trajectory_id])] == [1, 2]


def test_cross_tokenizer_span_ids_round_trip(store):
    t = _traj_v2(5, 0)
    scores = TeacherScores(np.array([-0.5, -0.5, -2.0], dtype=np.float32), span_id_C=np.array([0, 0, 1]))
    store.ingest_scored([(t, scores)], TEACHER, tokenizer_fingerprint="tok-teacher",
                        student_tokenizer_fingerprint="tok-student")
    assert store.load_scored([t.trajectory_id], TEACHER)[0].teacher.span_id_C.tolist() == [0, 0, 1]


def test_cross_tokenizer_scores_carry_the_student_tokenizer(store):
    t = _traj_v2(6, 0)
    scores = TeacherScores(np.array([-0.5, -0.5, -2.0], dtype=np.float32), span_id_C=np.array([0, 0, 1]))
    store.ingest_scored([(t, scores)], TEACHER, tokenizer_fingerprint="tok-teacher",
                        student_tokenizer_fingerprint="tok-student")
    got = store.load_scored([t.trajectory_id], TEACHER)[0]
    assert (got.tokenizer_fingerprint, got.student_tokenizer_fingerprint) == ("tok-teacher", "tok-student")


def test_same_tokenizer_scores_have_no_span_ids(store):
    t = _traj(7, 0)
    store.ingest_scored([(t, _scores(t))], TEACHER)
    assert store.load_scored([t.trajectory_id], TEACHER)[0].teacher.span_id_C is None


def test_span_ids_must_match_the_completion(store):
    t = _traj_v2(8, 0)
    with pytest.raises(AlignmentError, match="span ids"):
        store.ingest_scored([(t, TeacherScores(np.zeros(3, dtype=np.float32), span_id_C=np.array([0, 1])))], TEACHER)
