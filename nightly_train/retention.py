"""The reviewer's pages show prompt and completion texts of held-out trajectories: they leave with the data.

`purge_review_pages` deletes the `review/` artifact folder of nightly runs, in MLflow and in the run folders, and
tags each run `review.purged` with when and why (the numbers the gate judged stay: they hold no text). Two
callers: retention (`pipeline.purge`: runs whose window ended before the cutoff, the trajectories themselves being
purged by the store) and erasure (`shadow-distill store forget`: the nights whose held-out set held one of the
erased caller's trajectories). `shadow-distill nightly review` rebuilds a page from what is still stored.

    purge_review_pages(cfg, intervals=["20261124T020000Z-20261125T020000Z"], reason="erasure")
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from datetime import UTC, datetime

from nightly_train.config import NightlyConfig
from nightly_train.layout import RUN_TAG, RunLayout, interval_end

log = logging.getLogger(__name__)
REVIEW_ARTIFACT = "review"


def _nightly_runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`{RUN_TAG}` != ''", max_results=50_000)


def purge_review_pages(cfg: NightlyConfig, *, intervals: Iterable[str] = (), older_than: datetime | None = None,
                       reason: str) -> list[str]:
    """Delete the review pages of the runs of `intervals`, and of runs whose window ended before `older_than`;
    return the interval keys purged."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    wanted = set(intervals)
    client = MlflowClient(cfg.mlflow_tracking_uri)
    purged = []
    for run in _nightly_runs(client, cfg.experiment):
        key = run.data.tags.get(RUN_TAG, "")
        try:
            old = older_than is not None and interval_end(key) < older_than
        except ValueError:
            continue
        if key not in wanted and not old:
            continue
        if "review.purged" not in run.data.tags and client.list_artifacts(run.info.run_id, REVIEW_ARTIFACT):
            get_artifact_repository(run.info.artifact_uri).delete_artifacts(REVIEW_ARTIFACT)
        shutil.rmtree(RunLayout(cfg.runs_dir, key).review_dir, ignore_errors=True)
        client.set_tag(run.info.run_id, "review.purged", f"{datetime.now(UTC).isoformat(timespec='seconds')} {reason}")
        purged.append(key)
    if purged:
        log.info("purged the review pages of %d nights (%s)", len(purged), reason)
    return purged
