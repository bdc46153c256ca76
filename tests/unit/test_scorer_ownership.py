"""The scorer's ownership, backlog and lag, without a broker: what a rebalance does to what is scored."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from kafka.errors import IllegalStateError
from kafka.structs import TopicPartition

from feature_store.records import LoggedTrajectory, PendingKey
from schemas.trajectory import SamplingParams, TrajectoryV1
from shadow_scoring.backlog import Backlog
from shadow_scoring.ownership import LagMeter, Ownership

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def tp(p: int, topic: str = "t") -> TopicPartition:
    return TopicPartition(topic, p)


def traj(i: int) -> TrajectoryV1:
    return TrajectoryV1(trajectory_id=f"t{i:03d}", request_id=f"r{i}", choice_index=0, created_at=T0 + timedelta(minutes=i),
                        base_model_id="m", sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=4),
                        prompt_token_ids=[1, 2], completion_token_ids=[3], behaviour_logprobs=[-1.0],
                        logprob_kind="sampled", finish_reason="length")


# ---- Ownership ---------------------------------------------------------------------------------------------------
def test_an_eager_rebalance_replaces_the_assignment_and_logs_it(caplog):
    own = Ownership("t", "g", "scorer-a")
    caplog.set_level(logging.INFO, logger="shadow_scoring.ownership")
    own.on_partitions_assigned([tp(0), tp(1), tp(2), tp(3)])
    own.on_partitions_revoked([tp(0), tp(1), tp(2), tp(3)])
    own.on_partitions_assigned([tp(0), tp(1)])
    assert own.partitions == {0, 1}
    assert own.rebalances == 2
    assert "rebalance 2: scorer-a in group g owns partitions [0, 1] of t" in caplog.text


def test_a_cooperative_rebalance_adds_to_what_is_kept():
    own = Ownership("t", "g")
    own.on_partitions_assigned([tp(0), tp(1)])
    own.on_partitions_revoked([tp(1)])
    own.on_partitions_assigned([tp(2)])
    assert own.partitions == {0, 2}


def test_lost_partitions_are_dropped_and_logged(caplog):
    own = Ownership("t", "g")
    own.on_partitions_assigned([tp(0), tp(1)])
    caplog.set_level(logging.INFO, logger="shadow_scoring.ownership")
    own.on_partitions_lost({tp(0)})
    assert own.partitions == {1}
    assert "LOST" in caplog.text


def test_partitions_of_another_topic_are_not_owned():
    own = Ownership("t", "g")
    own.on_partitions_assigned([tp(0), tp(0, "other")])
    assert own.partitions == {0}


# ---- Backlog -----------------------------------------------------------------------------------------------------
class FakeStore:
    """pending_keys over a dict of landed trajectories (id -> partition) minus the scored; load_logged counted."""

    def __init__(self):
        self.rows: dict[str, tuple[TrajectoryV1, int]] = {}
        self.scored: set[str] = set()
        self.loaded: list[str] = []

    def land(self, items):
        self.rows.update((lt.trajectory.trajectory_id, (lt.trajectory, lt.partition)) for lt in items)

    def pending_keys(self, teacher_id, partitions, *, after=None, limit=256):
        due = sorted((t.created_at, t.trajectory_id, p) for t, p in self.rows.values()
                     if p in partitions and t.trajectory_id not in self.scored)
        due = [d for d in due if after is None or d[:2] > after]
        return [PendingKey(tid, at, p, 0, 3) for at, tid, p in due[:limit]]

    def load_logged(self, ids):
        self.loaded += ids
        return [LoggedTrajectory(self.rows[i][0], self.rows[i][1], 0) for i in ids]


def _landed(store: FakeStore, backlog: Backlog, items: list[LoggedTrajectory]) -> None:
    store.land(items)
    backlog.landed(items)


def test_what_this_scorer_landed_is_scored_without_reading_it_back():
    store = FakeStore()
    backlog = Backlog(store, "teacher", hold=16)
    backlog.own(frozenset({0}))
    _landed(store, backlog, [LoggedTrajectory(traj(i), 0, i) for i in range(3)])
    page = backlog.next_page(limit=8, budget_tokens=100)
    assert [lt.trajectory.trajectory_id for lt in page] == ["t000", "t001", "t002"]
    assert store.loaded == []


def test_what_a_previous_owner_left_is_loaded_from_the_store():
    store = FakeStore()
    store.land([LoggedTrajectory(traj(0), 1, 0)])  # landed by the replica that died
    backlog = Backlog(store, "teacher", hold=16)
    backlog.own(frozenset({0, 1}))
    page = backlog.next_page(limit=8, budget_tokens=100)
    assert [lt.trajectory.trajectory_id for lt in page] == ["t000"]
    assert store.loaded == ["t000"]


def test_a_page_is_cut_at_the_token_budget_and_says_more_is_due():
    store = FakeStore()
    backlog = Backlog(store, "teacher", hold=16)
    backlog.own(frozenset({0}))
    _landed(store, backlog, [LoggedTrajectory(traj(i), 0, i) for i in range(5)])
    page = backlog.next_page(limit=8, budget_tokens=7)  # 3 tokens each
    assert (len(page), backlog.more) == (2, True)


def test_a_done_page_moves_the_cursor_and_the_next_page_starts_after_it():
    store = FakeStore()
    backlog = Backlog(store, "teacher", hold=16)
    backlog.own(frozenset({0}))
    _landed(store, backlog, [LoggedTrajectory(traj(i), 0, i) for i in range(3)])
    backlog.done(backlog.next_page(limit=2, budget_tokens=100))
    assert [lt.trajectory.trajectory_id for lt in backlog.next_page(limit=2, budget_tokens=100)] == ["t002"]


def test_a_trajectory_landed_behind_the_cursor_is_still_scored():
    store = FakeStore()
    backlog = Backlog(store, "teacher", hold=16)
    backlog.own(frozenset({0}))
    _landed(store, backlog, [LoggedTrajectory(traj(5), 0, 0)])
    page = backlog.next_page(limit=8, budget_tokens=100)
    store.scored |= {lt.trajectory.trajectory_id for lt in page}
    backlog.done(page)
    _landed(store, backlog, [LoggedTrajectory(traj(1), 0, 1)])  # older, out of order
    assert [lt.trajectory.trajectory_id for lt in backlog.next_page(limit=8, budget_tokens=100)] == ["t001"]


def test_a_new_assignment_restarts_the_scan_and_lets_go_of_other_partitions():
    store = FakeStore()
    backlog = Backlog(store, "teacher", hold=16)
    backlog.own(frozenset({0, 1}))
    _landed(store, backlog, [LoggedTrajectory(traj(0), 0, 0), LoggedTrajectory(traj(1), 1, 0)])
    backlog.done(backlog.next_page(limit=1, budget_tokens=100))
    backlog.own(frozenset({1}))
    assert (backlog.cursor, backlog.held) == (None, 1)


def test_a_page_finished_after_the_assignment_changed_does_not_move_the_cursor():
    store = FakeStore()
    backlog = Backlog(store, "teacher", hold=16)
    backlog.own(frozenset({0}))
    _landed(store, backlog, [LoggedTrajectory(traj(3), 0, 0)])
    page = backlog.next_page(limit=8, budget_tokens=100)
    backlog.own(frozenset({0, 1}))  # a rebalance while the page was in the teacher
    backlog.done(page)
    assert backlog.cursor is None


def test_what_is_held_is_bounded_oldest_first():
    store = FakeStore()
    backlog = Backlog(store, "teacher", hold=2)
    backlog.own(frozenset({0}))
    _landed(store, backlog, [LoggedTrajectory(traj(i), 0, i) for i in range(3)])
    backlog.next_page(limit=8, budget_tokens=100)
    assert store.loaded == ["t000"]


# ---- LagMeter ----------------------------------------------------------------------------------------------------
class FakeConsumer:
    def __init__(self, highwater: dict, positions: dict, ends: dict):
        self.highwaters, self.positions, self.ends = highwater, positions, ends
        self.end_offset_requests = 0

    def highwater(self, partition):
        if partition not in self.positions:
            raise IllegalStateError("not assigned")
        return self.highwaters.get(partition)

    def position(self, partition, timeout_ms=None):
        return self.positions.get(partition)

    def end_offsets(self, partitions):
        self.end_offset_requests += 1
        return {p: self.ends[p] for p in partitions}


def test_lag_is_the_watermark_minus_what_was_committed_without_asking_the_broker():
    consumer = FakeConsumer({tp(0): 10, tp(1): 7}, {tp(0): 10, tp(1): 7}, {})
    meter = LagMeter(refresh_s=0)
    meter.committed({tp(0): 4})
    assert meter.measure(consumer, [tp(0), tp(1)]) == {0: 6, 1: 0}
    assert consumer.end_offset_requests == 0


def test_a_partition_not_fetched_yet_is_asked_for_at_most_every_refresh():
    consumer = FakeConsumer({}, {tp(0): 2}, {tp(0): 5})
    meter = LagMeter(refresh_s=3600)
    assert meter.measure(consumer, [tp(0)]) == {0: 3}
    meter.measure(consumer, [tp(0)])
    assert consumer.end_offset_requests == 1


def test_paused_partitions_are_measured_from_the_broker():
    consumer = FakeConsumer({tp(0): 6}, {tp(0): 6}, {tp(0): 12})
    meter = LagMeter(refresh_s=0)
    meter.committed({tp(0): 6})
    assert meter.measure(consumer, [tp(0)], ask_broker=True) == {0: 6}


def test_commits_of_partitions_no_longer_owned_are_forgotten():
    consumer = FakeConsumer({tp(0): 9}, {tp(0): 9}, {})
    meter = LagMeter(refresh_s=0)
    meter.committed({tp(0): 1})
    meter.measure(consumer, [])  # revoked
    assert meter.measure(consumer, [tp(0)]) == {0: 0}  # reassigned: the position it resumed from counts


def test_a_trajectory_landed_while_the_page_was_in_the_teacher_and_behind_it_is_still_scored():
    store = FakeStore()
    backlog = Backlog(store, "teacher", hold=16)
    backlog.own(frozenset({0, 1}))
    _landed(store, backlog, [LoggedTrajectory(traj(5), 0, 0)])
    page = backlog.next_page(limit=8, budget_tokens=100)
    _landed(store, backlog, [LoggedTrajectory(traj(2), 1, 0)])  # the next poll, another partition, older
    store.scored |= {lt.trajectory.trajectory_id for lt in page}
    backlog.done(page)
    assert [lt.trajectory.trajectory_id for lt in backlog.next_page(limit=8, budget_tokens=100)] == ["t002"]
