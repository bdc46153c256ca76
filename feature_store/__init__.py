"""The feature store (SQL through SQLAlchemy): written by the teacher scorer, read by the trainer and the DAG."""

from feature_store.store import FeatureStore, ScoredTrajectory, TeacherScores, shared_store

__all__ = ["FeatureStore", "ScoredTrajectory", "TeacherScores", "shared_store"]
