"""The scorer's backlog: landed trajectories of its own partitions that its teacher has neither scored nor
refused, oldest first.

The store is the truth of what is due (`FeatureStore.pending_keys`, a keyset page over `log_partition IN
owned`): whatever a scorer landed before it died, or a previous owner left unscored, is found there by the new
owner. But the trajectories of a page are nearly always ones this scorer landed a moment ago, so it keeps them
(`landed`) and reads only keys from the store: rebuilding every row it had just written (arrays unpacked,
pydantic validation) was a fifth of the scorer's own cost per trajectory. Rows it does not hold are loaded.
What it holds is bounded (oldest dropped first) and dropped for partitions it no longer owns.

The keyset cursor: every landed row of the owned partitions at or before it is scored or refused, so a page
query starts there instead of scanning everything scored. It is reset when ownership changes (the new
partitions' rows may be anywhere) and lowered when a trajectory lands behind it (out of order, a replay, or
while the page before it was in the teacher: partitions interleave in time, so the next poll's rows can be
older than the page's last).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime

from feature_store.records import LoggedTrajectory
from feature_store.store import FeatureStore
from shadow_scoring.scoring import within_budget

Cursor = tuple[datetime, str]


class Backlog:
    def __init__(self, store: FeatureStore, teacher_id: str, hold: int):
        self.store, self.teacher_id, self.hold = store, teacher_id, max(hold, 1)
        self.owned: frozenset[int] = frozenset()
        self.cursor: Cursor | None = None
        self.more = True  # the last page was cut short: more is due now (so do not wait on the next poll)
        self._held: OrderedDict[str, LoggedTrajectory] = OrderedDict()
        self._page_of: frozenset[int] | None = None  # ownership the page in hand was read under
        self._landed_low: Cursor | None = None  # oldest key landed since the page in hand was read

    def own(self, partitions: frozenset[int]) -> None:
        """Ownership as the group left it; a change restarts the scan (the new partitions' rows may be old)."""
        if partitions == self.owned:
            return
        self.owned, self.cursor, self.more = partitions, None, True
        for tid in [tid for tid, lt in self._held.items() if lt.partition not in partitions]:
            del self._held[tid]

    def landed(self, items: Sequence[LoggedTrajectory]) -> None:
        """Trajectories this scorer has just landed (committed to the store): hold them for their page."""
        for lt in items:
            t = lt.trajectory
            key = (t.created_at, t.trajectory_id)
            if self.cursor is not None and key <= self.cursor:
                self.cursor = (t.created_at, "")  # landed behind the cursor: it must still be scored
            if self._landed_low is None or key < self._landed_low:
                self._landed_low = key
            if lt.partition in self.owned or not self.owned:
                self._held[t.trajectory_id] = lt
                self._held.move_to_end(t.trajectory_id)
        while len(self._held) > self.hold:
            self._held.popitem(last=False)
        self.more = self.more or bool(items)

    def next_page(self, limit: int, budget_tokens: int) -> list[LoggedTrajectory]:
        """The oldest due trajectories of the owned partitions: at most `limit`, and as many leading ones as fit
        `budget_tokens` (at least one: a long one must be scored too)."""
        self._page_of, self._landed_low = self.owned, None
        if not self.owned:
            self.more = False
            return []
        keys = self.store.pending_keys(self.teacher_id, self.owned, after=self.cursor, limit=limit)
        n = within_budget([k.tokens for k in keys], budget_tokens)
        self.more = n < len(keys) or len(keys) == limit
        keys = keys[:n]
        missing = [k.trajectory_id for k in keys if k.trajectory_id not in self._held]
        loaded = {lt.trajectory.trajectory_id: lt for lt in self.store.load_logged(missing)} if missing else {}
        return [LoggedTrajectory((self._held.get(k.trajectory_id) or loaded[k.trajectory_id]).trajectory,
                                 k.partition, k.offset) for k in keys]

    def done(self, page: Sequence[LoggedTrajectory]) -> None:
        """The page is scored or refused (written): move the cursor past it and let go of its trajectories."""
        if not page:
            return
        if self._page_of == self.owned:  # else ownership changed while it was scored: the scan restarts anyway
            last = page[-1].trajectory
            self.cursor = (last.created_at, last.trajectory_id)
            if self._landed_low is not None and self._landed_low <= self.cursor:
                # landed while the page was in the teacher (the next poll, the other partitions) and behind it
                self.cursor = (self._landed_low[0], "")
        for lt in page:
            self._held.pop(lt.trajectory.trajectory_id, None)

    @property
    def held(self) -> int:
        return len(self._held)

