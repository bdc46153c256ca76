"""The CI-sized week (`bench/week.py --tiny`): three nights on tiny models through the real stack (serving,
broker, scorer, store, MLflow, `airflow dags test`), with the scorer stopped mid-traffic on night 2, an adapter
loaded by hand on night 2, and a rollback on night 3. What must hold on any machine: no partial window, no crashed
night, every night trains, and the hand-loaded adapter's traffic is counted as an unknown policy, not dropped
silently. (Learning itself is shown on SmolLM2: tiny random models do not generalise to held-out prompts.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def week(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("week")
    out = tmp / "week.json"
    cmd = [sys.executable, str(REPO / "bench" / "week.py"), "--tiny", "--nights", "3", "--rollback-night", "3",
           "--manual-night", "2", "--scorer-stop-night", "2", "--scorer-down-s", "20", "--requests", "24",
           "--workdir", str(tmp / "runs"), "--json-out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


def nights(week: dict) -> list[dict]:
    return [r for r in week["rows"] if r["night"] > 0]


def test_the_week_has_every_night(week):
    assert [r["night"] for r in nights(week)] == [1, 2, 3]


def test_no_night_crashed(week):
    assert [r["error"] for r in nights(week)] == [None, None, None]


def test_no_window_was_frozen_partial(week):
    assert [r["partial"] for r in nights(week)] == [False, False, False]


def test_every_night_freezes_what_was_scored(week):
    assert all(r["manifest"] > 0 and r["manifest"] <= r["scored"] for r in nights(week))


def test_every_night_trains(week):
    assert all(sum(r["tokens"].values()) > 0 for r in nights(week))


def test_the_hand_loaded_adapter_is_counted_as_an_unknown_policy(week):
    assert nights(week)[1]["unknown_policy"] > 0


def test_the_held_out_meter_is_finite_every_night(week):
    assert all(r["reverse_kl"] == r["reverse_kl"] for r in week["rows"])  # NaN != NaN
