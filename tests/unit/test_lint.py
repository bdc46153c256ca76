"""Undefined names and unused imports fail the suite, not a nightly run.

Airflow tasks and CLI commands import their project code lazily (nothing heavy at DAG parse time), so a
misspelt name in a task body would otherwise surface only when that task runs. Pyflakes finds it statically.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_pyflakes_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is a test dependency (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
