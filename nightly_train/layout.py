"""Every path of one night, named once: `RunLayout(runs_dir, interval_key)`.

The pipeline, the review page, the demo and the benchmarks all find a night's files through this class, so the
folder layout is spelled out here only:

    <runs_dir>/ifeval-cache/                    IFEval results keyed by model identity (shared by every night)
    <runs_dir>/<interval_key>/
        champion-v<N>/                          the champion adapter this night continued from (downloaded once)
        train/adapter/                          the candidate adapter
        train/checkpoints/step-000010/          resumable training state
        train_history.json                      per-step training metrics
        mlflow_run_id                           the night's MLflow run (a killed attempt continues it)
        evaluation-<run_id>.json                candidate vs champion measurements
        review/index.html                       the reviewer's page

    layout = RunLayout.for_window(cfg.runs_dir, start, end)
    layout.adapter_dir, layout.champion_dir("3"), layout.evaluation_file(run_id)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


RUN_TAG = "shadow_distill.interval_key"  # the MLflow tag naming a nightly run's interval


def interval_key(start: datetime, end: datetime) -> str:
    """The night's identity everywhere (manifest, MLflow tag, registry tag, folder): `<start>-<end>` in UTC."""
    return f"{start.astimezone(UTC):%Y%m%dT%H%M%SZ}-{end.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def interval_end(key: str) -> datetime:
    """The end of the window an `interval_key` names (ValueError for a key of another shape)."""
    return datetime.strptime(key.split("-", 1)[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def trained_adapter_dir(output_dir: Path) -> Path:
    """Where a training run (`TrainConfig.output_dir`) writes its final adapter."""
    return Path(output_dir) / "adapter"


def checkpoints_dir(output_dir: Path) -> Path:
    """Where a training run writes its resumable checkpoints (`step-NNNNNN/`)."""
    return Path(output_dir) / "checkpoints"


@dataclass(frozen=True)
class RunLayout:
    runs_dir: Path
    interval_key: str

    @classmethod
    def for_window(cls, runs_dir: Path, start: datetime, end: datetime) -> RunLayout:
        return cls(Path(runs_dir), interval_key(start, end))

    @property
    def root(self) -> Path:
        return self.runs_dir / self.interval_key

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def adapter_dir(self) -> Path:
        return trained_adapter_dir(self.train_dir)

    @property
    def history_file(self) -> Path:
        return self.root / "train_history.json"

    @property
    def mlflow_run_id_file(self) -> Path:
        return self.root / "mlflow_run_id"

    @property
    def review_dir(self) -> Path:
        return self.root / "review"

    @property
    def ifeval_cache_dir(self) -> Path:
        return self.runs_dir / "ifeval-cache"

    def champion_dir(self, version: str) -> Path:
        return self.root / f"champion-v{version}"

    def evaluation_file(self, run_id: str) -> Path:
        return self.root / f"evaluation-{run_id}.json"

    def evaluation_files(self) -> list[Path]:
        """Every evaluation written this night, oldest run first by file time."""
        return sorted(self.root.glob("evaluation-*.json"), key=lambda p: p.stat().st_mtime)

    def ensure(self) -> RunLayout:
        self.root.mkdir(parents=True, exist_ok=True)
        return self
