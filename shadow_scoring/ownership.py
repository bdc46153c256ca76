"""Which partitions this scorer owns, and how far behind the log each one is.

Scale-out is Kafka's consumer group: N scorers sharing a `group_id` split the topic's partitions, and the
group moves partitions when a scorer joins, leaves or dies. The scorer scores only the landed trajectories of
the partitions it owns (`log_partition IN assignment`), so ownership decides who scores what; `Ownership` is
the group's answer as the consumer last heard it, logged on every rebalance so an operator can see who had
which partition when.

`LagMeter` measures lag per partition (end offset minus committed offset) from what the consumer already
knows: the high watermark that every fetch response carries, and the offsets this scorer committed itself.
Why not ask the broker every step, as the scorer once did: a ListOffsets request queues on the connection
behind the consumer's long-polling fetch (up to `fetch_max_wait_ms`, 500 ms by default) and was the largest
part of what a step cost. A partition with no watermark yet (just assigned, or paused while a dependency is
down) is asked for, at most every `refresh_s`.

Tansu reports a partition's end offset as its last batch's base offset + 1 (docs: NOTES-environment), so with
batching producers lag reads low there; on Apache Kafka both numbers are exact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import IllegalStateError, KafkaError
from kafka.structs import TopicPartition

log = logging.getLogger(__name__)


class Ownership(ConsumerRebalanceListener):
    """The partitions of `topic` the group assigned to this scorer, kept current by the group's callbacks.

    The callbacks run inside `KafkaConsumer.poll` (on the consumer's I/O loop, which drives the heartbeats):
    they only swap a frozen set and log, never block. Eager (range, round-robin) and cooperative assignors
    alike: the set is (previous - revoked - lost) | assigned."""

    def __init__(self, topic: str, group_id: str, client_id: str = ""):
        self.topic, self.group_id, self.client_id = topic, group_id, client_id
        self._lock = threading.Lock()
        self._partitions: frozenset[int] = frozenset()
        self.rebalances = 0  # assignments received (the first one included)

    @property
    def partitions(self) -> frozenset[int]:
        return self._partitions

    def _mine(self, tps: Iterable[TopicPartition]) -> frozenset[int]:
        return frozenset(tp.partition for tp in tps if tp.topic == self.topic)

    def on_partitions_revoked(self, revoked) -> None:
        self._drop(self._mine(revoked), "revoked")

    def on_partitions_lost(self, lost) -> None:
        # Evicted (session expired, fenced): another scorer may own them already; whatever this one still holds
        # for them is replayed or rescored by the new owner, idempotently.
        self._drop(self._mine(lost), "LOST (evicted from the group)")

    def on_partitions_assigned(self, assigned) -> None:
        with self._lock:
            self._partitions = self._partitions | self._mine(assigned)
            self.rebalances += 1
            now, n = sorted(self._partitions), self.rebalances
        log.info("rebalance %d: %s in group %s owns partitions %s of %s", n, self.client_id or "scorer",
                 self.group_id, now, self.topic)

    def _drop(self, gone: frozenset[int], how: str) -> None:
        if not gone:
            return
        with self._lock:
            self._partitions = self._partitions - gone
        log.info("partitions %s of %s %s; %s in group %s keeps %s", sorted(gone), self.topic, how,
                 self.client_id or "scorer", self.group_id, sorted(self._partitions))


class LagMeter:
    """End offset - committed offset per owned partition, mostly without a request (see the module docstring)."""

    def __init__(self, refresh_s: float):
        self.refresh_s = refresh_s
        self._committed: dict[TopicPartition, int] = {}
        self._ends: dict[TopicPartition, int] = {}  # asked for, for partitions with no watermark yet
        self._asked_at = float("-inf")

    def committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Offsets this scorer committed (after its landing transaction)."""
        self._committed.update(offsets)

    def measure(self, consumer: KafkaConsumer, parts: Iterable[TopicPartition], ask_broker: bool = False
                ) -> dict[int, int]:
        """Lag of each of `parts` whose end and committed offsets are known. `ask_broker`: the watermarks are
        stale (the partitions are paused, so nothing is fetched): ask the broker for every end offset."""
        parts = list(parts)
        self._committed = {tp: off for tp, off in self._committed.items() if tp in parts}  # others own the rest
        ends: dict[TopicPartition, int] = {}
        for tp in parts:
            high = None if ask_broker else _highwater(consumer, tp)
            if high is not None:
                ends[tp] = high
        unknown = [tp for tp in parts if tp not in ends]
        if unknown and time.monotonic() - self._asked_at >= self.refresh_s:
            self._asked_at = time.monotonic()
            try:
                self._ends = dict(consumer.end_offsets(unknown))
            except KafkaError as exc:  # lag is a diagnostic: never stop scoring for it
                log.debug("end offsets not measured: %s", exc)
        ends.update((tp, self._ends[tp]) for tp in unknown if tp in self._ends)
        lags: dict[int, int] = {}
        for tp, end in ends.items():
            done = self._committed.get(tp)
            if done is None:
                done = _position(consumer, tp)
            if done is not None:
                lags[tp.partition] = max(end - done, 0)
        return lags


def _highwater(consumer: KafkaConsumer, tp: TopicPartition) -> int | None:
    try:
        return consumer.highwater(tp)
    except IllegalStateError:  # revoked meanwhile
        return None


def _position(consumer: KafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position when it knows it (after a poll: the committed offset it resumed from, or the
    reset); never waits for the broker."""
    try:
        return consumer.position(tp, timeout_ms=0)
    except (IllegalStateError, KafkaError):
        return None
