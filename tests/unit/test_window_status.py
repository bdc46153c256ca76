"""`WindowStatus.complete` and the watermark rule, on hand-made values (feature_store/coverage.py)."""

from datetime import UTC, datetime, timedelta

from feature_store.coverage import WindowStatus, seen_up_to, watermark

END = datetime(2026, 3, 2, tzinfo=UTC)
LATE = 900.0  # allowed lateness, seconds


def status(landed=10, scored=10, rejected=0, mark: datetime | None = END + timedelta(hours=1)) -> WindowStatus:
    return WindowStatus(landed=landed, scored=scored, rejected=rejected, partitions_total=2, partitions_seen=2,
                        watermark=mark)


def test_a_scored_window_seen_past_its_end_and_lateness_is_complete():
    assert status().complete(END, LATE, threshold=1.0)


def test_no_watermark_is_never_complete():
    assert not status(mark=None).complete(END, LATE, threshold=1.0)


def test_a_watermark_short_of_the_lateness_is_not_complete():
    assert not status(mark=END + timedelta(seconds=LATE - 1)).complete(END, LATE, threshold=1.0)


def test_a_watermark_exactly_at_end_plus_lateness_is_enough():
    assert status(mark=END + timedelta(seconds=LATE)).complete(END, LATE, threshold=1.0)


def test_unscored_landed_trajectories_keep_the_window_open():
    assert not status(scored=9).complete(END, LATE, threshold=1.0)


def test_refused_trajectories_count_as_covered():
    assert status(scored=9, rejected=1).coverage == 1.0


def test_coverage_meets_a_threshold_below_one():
    assert status(scored=99, landed=100).complete(END, LATE, threshold=0.99)


def test_an_empty_window_is_covered():
    assert status(landed=0, scored=0).coverage == 1.0


def test_an_empty_window_is_complete_once_seen():
    assert status(landed=0, scored=0).complete(END, LATE, threshold=1.0)


def test_an_empty_window_without_a_watermark_is_not_complete():
    assert not status(landed=0, scored=0, mark=None).complete(END, LATE, threshold=1.0)


def test_the_watermark_is_the_slowest_partition():
    assert watermark({0: END, 1: END - timedelta(minutes=5), 2: END + timedelta(hours=1)}, 3) == \
        END - timedelta(minutes=5)


def test_a_partition_without_progress_leaves_no_watermark():
    assert watermark({0: END, 2: END}, 3) is None


def test_a_partition_with_no_time_leaves_no_watermark():
    assert watermark({0: END, 1: None}, 2) is None


def test_no_partition_count_leaves_no_watermark():
    assert watermark({}, 0) is None


def test_progress_of_partitions_beyond_the_count_is_ignored():
    assert watermark({0: END, 5: END - timedelta(days=9)}, 1) == END


def test_an_idle_partition_is_seen_up_to_when_it_was_caught_up():
    assert seen_up_to(END - timedelta(days=1), END) == END


def test_a_busy_partition_is_seen_up_to_its_newest_trajectory():
    assert seen_up_to(END, END - timedelta(days=1)) == END


def test_a_partition_with_neither_time_is_unseen():
    assert seen_up_to(None, None) is None
