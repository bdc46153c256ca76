"""A short run of bench/reliability.py: 1 minute of load, short outages, a subset of faults, then its result.

The bench is run as its own process (it starts and signals process groups of its own); its JSON result is
checked requirement by requirement so a failure names the broken one.

    .venv/bin/python -m pytest tests/integration/test_reliability.py -q -m slow
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
FAULTS = "poison,broker_pause,scorer_kill,db_outage,serving_kill,serving_kill_loaded,broker_restart"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import sqlalchemy as sa

    try:  # the bench makes its own database on the shared server, as the `pg_url` fixture does
        with sa.create_engine(os.environ.get("SHADOW_DISTILL_TEST_PG", PG)).connect():
            pass
    except sa.exc.OperationalError:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    folder = tmp_path_factory.mktemp("reliability")
    out = folder / "result.json"
    cmd = [sys.executable, str(REPO / "bench" / "reliability.py"), "--rps", "2", "--minutes", "1", "--outage-s", "5",
           "--gap-s", "4", "--faults", FAULTS, "--coverage-timeout-s", "120", "--workdir", str(folder),
           "--json-out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def test_traffic_was_answered_and_faults_were_injected(result):
    assert [f["name"] for f in result["faults"]] == FAULTS.split(",")
    assert result["answered"] > 0.5 * result["sent"], result["by_status"]
    assert result["bad_5xx"] == 0, result["by_status"]
    assert result["stdout"].strip().splitlines()[-1].startswith(("PASS", "FAIL"))


def test_every_answered_logged_request_is_stored_exactly_once(result):
    assert result["platform_lost"] == 0, (result["reason"], result["lost_ids"])
    assert result["duplicates"] == 0
    assert result["opted_out_stored"] == 0
    assert result["stored"] == result["expected"] - result["broker_dropped"]
    assert result["broker_dropped"] <= result["broker_at_risk"]
    assert result["coverage_s"] is not None


def test_a_sigkill_at_8_requests_per_second_had_answered_requests_to_lose(result):
    assert result["sigkill_loaded_answered"] > 0


def test_a_sigkill_at_8_requests_per_second_loses_no_answered_request(result):
    assert result["sigkill_loaded_lost"] == 0, result["lost_ids"]


def test_poison_is_dead_lettered_and_no_secret_leaks(result):
    assert result["poison_sent"] > 0
    assert result["dead_lettered"] == result["poison_sent"]
    assert result["secret_hits"] == 0


def test_a_killed_night_resumes_and_leaves_the_champion(result):
    night = result["nightly"]
    assert night["killed_mid_training"]
    assert night["checkpoint_at_kill"] > 0
    assert night["rerun_rc"] == 0
    assert night["rerun_first_step"] == night["checkpoint_at_kill"] + 1
    assert night["aliases_after_kill"] == night["aliases_before"]
    assert night["aliases_after_rerun"]["champion"] == night["seed_version"]
