"""scripts/gpu-check.sh stays ready while no GPU is lent: its checks run end to end on the CPU (a dry run of the
same code; the real figures need a GPU and go into docs/benchmarks.md when one is lent)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--device", "cpu", "--quick"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=540)
    return proc, {ln.split(":")[0].removeprefix("CHECK "): ln for ln in proc.stdout.splitlines()
                  if ln.startswith("CHECK ")}


def test_the_dry_run_passes(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("check", ["bf16_step", "train_throughput", "scoring_efficiency", "serving_overhead", "all"])
def test_every_check_prints_its_line(dry_run, check):
    _, lines = dry_run
    assert "PASS" in lines[check]


def test_without_a_gpu_the_real_check_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stdout
