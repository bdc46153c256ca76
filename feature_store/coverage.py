"""Is a window of traffic complete? Coverage of what landed, and an event-time watermark over the log.

The scorer lands every trajectory it consumes (`FeatureStore.land`) and records, per (consumer group, topic,
partition), the newest `created_at` it has landed and the last time it found the partition fully read. Two
questions decide whether a night may freeze the window [start, end):

1. Has the log been read past `end`? Per partition, the consumer has seen everything created up to
   `max(max_created_at, caught_up_at)`: a busy partition's event time advances with the trajectories landed
   from it; an idle partition counts as seen up to the time the consumer found it caught up (position >= end
   offset). The window's watermark is the minimum of that over ALL partitions 0..partitions_total-1; a
   partition with no progress yet (never consumed, a scorer that never started) leaves the watermark None.
   Trajectories are not strictly ordered by `created_at` within a partition, and a serving spool replays late
   what it held while Kafka was down: `lateness_s` is the allowance for that, so the window is seen when
   `watermark >= end + lateness`. Anything that still arrives later lands and is scored; `late` counts the
   window's trajectories that landed when the watermark had already passed the window's end (a night with no
   lateness allowance would have missed them: if past nights show some, raise the lateness).
2. Is what landed scored? (scored + rejected) / landed >= threshold, where rejected are trajectories the teacher
   refused (recorded, dead-lettered, never retried). An empty window counts as covered, but only once the
   watermark says it is really empty and not unread.

    status = store.window_status("smollm2-135m-instruct", start, end, topic=TOPIC, group_id="shadow-scoring")
    status.complete(end, lateness_s=900, threshold=0.99)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class WindowStatus:
    landed: int  # trajectories of the window in the store
    scored: int  # of those, scored by the teacher asked about
    rejected: int  # of those, refused by that teacher (and not scored)
    partitions_total: int  # the topic's partition count, as the consumers saw it
    partitions_seen: int  # partitions 0..partitions_total-1 with progress recorded
    watermark: datetime | None  # min over all partitions of max(max_created_at, caught_up_at); None if one is unseen
    late: int = 0  # of the landed, those that arrived when the watermark had already passed the window's end

    @property
    def coverage(self) -> float:
        """(scored + rejected) / landed; 1.0 for an empty window."""
        return 1.0 if self.landed == 0 else (self.scored + self.rejected) / self.landed

    def complete(self, end: datetime, lateness_s: float, threshold: float) -> bool:
        """The log was read past `end + lateness_s` on every partition, and coverage reaches `threshold`."""
        if self.watermark is None or self.watermark < end + timedelta(seconds=lateness_s):
            return False
        return self.coverage >= threshold


def watermark(seen_up_to: Mapping[int, datetime | None], partitions_total: int) -> datetime | None:
    """min over partitions 0..partitions_total-1 of the time each is seen up to; None if any is missing or
    unknown, or if no partition count is known yet."""
    if partitions_total < 1:
        return None
    times = [seen_up_to.get(p) for p in range(partitions_total)]
    if any(t is None for t in times):
        return None
    return min(times)


def seen_up_to(max_created_at: datetime | None, caught_up_at: datetime | None) -> datetime | None:
    """One partition's watermark: the later of its newest landed trajectory and when it was last caught up."""
    known = [t for t in (max_created_at, caught_up_at) if t is not None]
    return max(known) if known else None
