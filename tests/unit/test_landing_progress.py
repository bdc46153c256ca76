"""Per-partition log progress of one poll (shadow_scoring/landing.py), on hand-made records."""

from datetime import UTC, datetime, timedelta

from kafka.consumer.fetcher import ConsumerRecord

from schemas.trajectory import SamplingParams, TrajectoryV1
from shadow_scoring.landing import decode_records, partition_progress

T0 = datetime(2026, 3, 1, tzinfo=UTC)
CHECKED = T0 + timedelta(hours=5)


def traj(i: int, minutes: int) -> TrajectoryV1:
    return TrajectoryV1(trajectory_id=f"t{i}", request_id=f"r{i}", choice_index=0,
                        created_at=T0 + timedelta(minutes=minutes), base_model_id="s",
                        sampling=SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=4),
                        prompt_token_ids=[1, 2], completion_token_ids=[3], behaviour_logprobs=[-0.5],
                        logprob_kind="raw", finish_reason="stop")


def record(partition: int, offset: int, value: bytes | None) -> ConsumerRecord:
    return ConsumerRecord("t", partition, None, offset, 0, 0, b"k", value, [], None, 1, 1, 0)


def progress(records, positions, ends):
    decoded, _, _ = decode_records(records)
    return {p.partition: p for p in partition_progress("g", "t", records, decoded, positions, ends, CHECKED, 3)}


RECORDS = [record(0, 4, traj(1, 30).to_bytes()), record(0, 5, traj(2, 10).to_bytes()),
           record(1, 9, b"not json")]


def test_next_offset_is_one_past_the_last_record_handled():
    assert progress(RECORDS, {}, None)[0].next_offset == 6


def test_an_undecodable_record_still_moves_the_offset():
    assert progress(RECORDS, {}, None)[1].next_offset == 10


def test_max_created_at_is_the_newest_landed_not_the_last():
    assert progress(RECORDS, {}, None)[0].max_created_at == T0 + timedelta(minutes=30)


def test_a_partition_without_trajectories_has_no_event_time():
    assert progress(RECORDS, {}, None)[1].max_created_at is None


def test_an_assigned_partition_without_records_is_reported():
    assert progress(RECORDS, {2: 17}, None)[2].next_offset == 17


def test_a_position_at_the_end_offset_is_caught_up():
    assert progress([], {2: 17}, {2: 17})[2].caught_up_at == CHECKED


def test_a_position_past_tansus_end_offset_is_caught_up():
    """Tansu's end offset is the last batch's base offset + 1: a position past it has read the whole batch."""
    assert progress([], {2: 20}, {2: 17})[2].caught_up_at == CHECKED


def test_a_position_short_of_the_end_offset_is_not_caught_up():
    assert progress([], {2: 16}, {2: 17})[2].caught_up_at is None


def test_without_end_offsets_nothing_is_caught_up():
    assert progress([], {2: 17}, None)[2].caught_up_at is None


def test_every_progress_carries_the_partition_count():
    assert {p.partitions_total for p in progress(RECORDS, {2: 1}, None).values()} == {3}


def test_duplicates_in_a_poll_are_landed_once():
    records = [record(0, 1, traj(1, 0).to_bytes()), record(0, 2, traj(1, 0).to_bytes())]
    decoded, bad, dups = decode_records(records)
    assert (len(decoded), len(bad), dups) == (1, 0, 1)
