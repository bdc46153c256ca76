"""The feature store (SQL through SQLAlchemy): written by the teacher scorer, read by the trainer and the DAG.

`store.py` holds the reads and writes, `coverage.py` the window model (landed / scored / refused and the
event-time watermark over the log), `records.py` the values that go in and come out.
"""

from feature_store.coverage import WindowStatus
from feature_store.records import LoggedTrajectory, PartitionProgress, PendingKey, ScoredTrajectory, TeacherScores
from feature_store.store import FeatureStore, ScoresWritten, shared_store

__all__ = ["FeatureStore", "LoggedTrajectory", "PartitionProgress", "PendingKey", "ScoredTrajectory", "ScoresWritten",
           "TeacherScores", "WindowStatus", "shared_store"]
