"""The shadow log's write-ahead log: a SIGKILLed serving process loses no trajectory `submit` returned for.

A child process submits trajectories while its Kafka is a socket that never answers (the producer thread is
stuck connecting, so every record is still in the in-memory queue), then SIGKILLs itself. The records must be
on disk, and a new shadow log on the same folder must hand them to the spool for replay.

    .venv/bin/pytest tests/unit/test_shadow_log_wal.py -q
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from message_bus.broker import free_port
from serving.shadow_log import ShadowLogger
from serving.spool import Spool
from serving.wal import WAL_FOLDER, WriteAheadLog

REPO = Path(__file__).resolve().parents[2]
N = 300

CHILD = textwrap.dedent("""
    import os, signal, socket, sys
    from datetime import UTC, datetime
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from schemas.trajectory import SamplingParams, TrajectoryV1
    from serving.shadow_log import ShadowLogger

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections complete in the backlog; nothing ever answers
    logger = ShadowLogger(f"127.0.0.1:{silent.getsockname()[1]}", "shadow.wal", Path(sys.argv[2]))
    for i in range(int(sys.argv[3])):
        logger.submit(TrajectoryV1(
            trajectory_id=f"wal-{i:06d}", request_id=f"r-{i}", choice_index=0, created_at=datetime.now(UTC),
            base_model_id="tiny", sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=4),
            prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5], behaviour_logprobs=[-0.5, -0.25],
            logprob_kind="sampled", finish_reason="stop"))
    print(logger.stats()["queue_depth"], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")

KEYS = [f"wal-{i:06d}".encode() for i in range(N)]


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, str]:
    """(spool folder, what the child printed: its queue depth just before the kill)."""
    spool_dir = tmp_path_factory.mktemp("killed") / "spool"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(spool_dir), str(N)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return spool_dir, proc.stdout.strip()


def test_the_records_were_still_queued_in_memory_at_the_kill(killed):
    assert int(killed[1]) > 0


def test_every_submitted_trajectory_is_on_disk_after_a_sigkill(killed):
    with Spool(killed[0] / WAL_FOLDER) as wal:
        assert [key for key, _ in wal.iter_pending()] == KEYS


def test_a_new_shadow_log_spools_what_the_killed_one_left(killed, tmp_path):
    spool_dir = tmp_path / "spool"
    subprocess.run(["cp", "-r", str(killed[0]), str(spool_dir)], check=True)
    logger = ShadowLogger(f"127.0.0.1:{free_port()}", "shadow.wal", spool_dir, retry_min_s=60, retry_max_s=60)
    assert logger.stats()["recovered"] == N
    logger.close(timeout_s=0.5)
    with Spool(spool_dir) as spool:
        assert [key for key, _ in spool.iter_pending()] == KEYS


def test_a_closed_shadow_log_leaves_its_write_ahead_log_empty(tmp_path):
    logger = ShadowLogger(f"127.0.0.1:{free_port()}", "shadow.wal", tmp_path, retry_min_s=60, retry_max_s=60)
    logger.close(timeout_s=0.5)
    with Spool(tmp_path / WAL_FOLDER) as wal:
        assert wal.pending == 0


def test_the_log_drops_only_a_finished_prefix(tmp_path):
    wal = WriteAheadLog(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    seqs = [wal.append(f"k{i}".encode(), b"v") for i in range(5)]
    wal.finish([seqs[0], seqs[1], seqs[3]])  # 2 is still with Kafka: 3 must stay behind it
    assert (wal.commit(), wal.pending) == (2, 3)
    wal.close()


def test_group_commit_flushes_only_what_is_new(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append([(b"k", b"v")])
        assert (spool.sync(), spool.sync()) == (True, False)
