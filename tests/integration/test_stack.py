"""`shadow-distill stack up | status | down` as a user runs them: every service comes up and answers, and
`down` stops exactly the stack's process groups (Airflow standalone's own children included) and nothing else.

    .venv/bin/python -m pytest tests/integration/test_stack.py -q -m slow     # about 2-4 minutes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

CLI = str(Path(sys.executable).parent / "shadow-distill")
SERVICES = {"broker", "mlflow", "serving", "scorer", "airflow"}


def _cli(*args: str, timeout: float) -> dict:
    proc = subprocess.run([CLI, "stack", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, f"stack {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _group_members(pgid: int) -> set[int]:
    """Every live (non-zombie) process whose process group is `pgid`."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state is fields[0], pgid fields[2]
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def test_stack_up_status_down_stops_exactly_its_processes(tmp_path):
    stack_dir = tmp_path / "stack"
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)  # unrelated, must survive `down`
    try:
        up = _cli("up", "--tiny", "--dir", str(stack_dir), timeout=600)
        assert {"broker", "mlflow", "serving", "airflow"} <= set(up)
        assert Path(up["api_key_file"]).read_text().strip()

        status = _cli("status", "--dir", str(stack_dir), timeout=60)
        assert set(status) == SERVICES
        dead = [name for name, s in status.items() if not s["alive"]]
        assert not dead, f"services not alive after `stack up`: {dead}"
        import httpx

        assert httpx.get(f"{up['serving']}/health", timeout=10).status_code == 200
        assert httpx.get(f"{up['mlflow']}/health", timeout=10).status_code == 200
        key = Path(up["api_key_file"]).read_text().strip()
        assert Path(up["api_key_file"]).stat().st_mode & 0o077 == 0, "the key file is private to its owner"
        models = httpx.get(f"{up['serving']}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert models.status_code == 200, models.text
        assert key not in (stack_dir / "stack.json").read_text()
        cmdlines = {name: Path(f"/proc/{s['pid']}/cmdline").read_bytes() for name, s in status.items()}
        assert not [n for n, c in cmdlines.items() if key.encode() in c], "the API key is on a command line"

        pids = {name: s["pid"] for name, s in status.items()}
        members = set().union(*(_group_members(pid) for pid in pids.values()))
        assert members >= set(pids.values())
        assert len(_group_members(pids["airflow"])) > 1, "airflow standalone should have started its components"
        assert bystander.pid not in members

        down = _cli("down", "--dir", str(stack_dir), timeout=300)
        assert set(down["stopped"]) == SERVICES
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in members):
            time.sleep(0.2)
        survivors = sorted(p for p in members if _alive(p))
        assert not survivors, f"processes of the stack still alive after `stack down`: {survivors}"
        assert bystander.poll() is None, "`stack down` killed a process that is not the stack's"
        assert _cli("status", "--dir", str(stack_dir), timeout=60) == {}
    finally:
        if (stack_dir / "stack.json").exists():
            subprocess.run([CLI, "stack", "down", "--dir", str(stack_dir)], capture_output=True, timeout=300)
        bystander.terminate()
        bystander.wait(10)
