"""The durable spool: order, crash-resume, torn writes, rotation and deletion, the size cap, one owner per folder.

    .venv/bin/pytest tests/unit/test_spool.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serving.spool import CURSOR_FILE, HEADER, SEGMENT_SUFFIX, Spool, encode_record, read_segment
from foundation.errors import ConfigError, ShadowDistillError

REPO = Path(__file__).resolve().parents[2]


def records(n: int, start: int = 0, size: int = 20) -> list[tuple[bytes, bytes]]:
    return [(f"k{i:05d}".encode(), f"v{i:05d}".encode().ljust(size, b".")) for i in range(start, start + n)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SEGMENT_SUFFIX}"))


def test_framing_round_trip_and_checks(tmp_path):
    data = encode_record(b"key", b"value") + encode_record(b"", b"x" * 1000)
    path = tmp_path / "one.seg"
    path.write_bytes(data)
    got = list(read_segment(path, 0))
    assert [(k, v) for _, k, v in got] == [(b"key", b"value"), (b"", b"x" * 1000)]
    assert got[-1][0] == len(data)
    flipped = bytearray(data)
    flipped[HEADER.size + 4] ^= 0xFF  # a byte of the first value: its CRC no longer matches
    path.write_bytes(bytes(flipped))
    assert list(read_segment(path, 0)) == []


def test_order_is_preserved_across_appends_and_acks(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append(records(5))
        spool.append(records(7, start=5))
        assert spool.pending == 12
        assert list(spool.iter_pending()) == records(12)
        assert list(spool.iter_pending(limit=3)) == records(3)
        spool.ack(4)
        assert list(spool.iter_pending()) == records(8, start=4)
        spool.append(records(2, start=12))
        assert list(spool.iter_pending()) == records(10, start=4)
        with pytest.raises(ValueError, match="ack"):
            spool.ack(11)


def test_a_new_spool_resumes_after_a_crash(tmp_path):
    """A writer process appends, acks part, and dies without closing; a new Spool replays exactly the rest."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from serving.spool import Spool
        spool = Spool(Path({str(tmp_path)!r}), segment_bytes=200)
        spool.append([(b"k%05d" % i, b"v%05d" % i) for i in range(30)])
        spool.ack(11)
        spool.append([(b"k%05d" % i, b"v%05d" % i) for i in range(30, 40)])
        os._exit(0)   # no close(), no flush beyond what append/ack already did
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with Spool(tmp_path, segment_bytes=200) as spool:
        assert spool.pending == 29
        assert list(spool.iter_pending()) == [(b"k%05d" % i, b"v%05d" % i) for i in range(11, 40)]
        spool.ack(29)
    with Spool(tmp_path) as spool:
        assert spool.pending == 0


def test_torn_last_record_is_cut_and_earlier_records_survive(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append(records(6))
    last = segment_files(tmp_path)[-1]
    intact_size = last.stat().st_size
    with open(last, "ab") as f:  # a crash in the middle of writing the 7th record
        f.write(encode_record(b"k00006", b"v00006".ljust(20, b"."))[:-5])
    with Spool(tmp_path) as spool:
        assert spool.pending == 6
        assert spool.stats()["torn_bytes"] > 0
        assert last.stat().st_size == intact_size  # cut, so appends do not land behind garbage
        spool.append(records(2, start=6))
        assert list(spool.iter_pending()) == records(8)


def test_torn_header_and_bad_crc_at_the_tail(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append(records(3))
    last = segment_files(tmp_path)[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0x01  # last record's value changed after its CRC was written
    last.write_bytes(bytes(data) + b"SDS")  # plus three bytes of a header
    with Spool(tmp_path) as spool:
        assert list(spool.iter_pending()) == records(2)


def test_rotation_and_deletion_once_acked(tmp_path):
    one = len(encode_record(*records(1)[0]))
    with Spool(tmp_path, segment_bytes=4 * one) as spool:
        spool.append(records(10))
        assert len(segment_files(tmp_path)) == 3  # 4 + 4 + 2 records
        assert spool.bytes_on_disk == 10 * one
        spool.ack(5)  # the first segment is finished, the second half read
        assert len(segment_files(tmp_path)) == 2
        assert spool.bytes_on_disk == 6 * one
        assert list(spool.iter_pending()) == records(5, start=5)
        assert json.loads((tmp_path / CURSOR_FILE).read_text())["offset"] == one
        spool.ack(5)
        assert segment_files(tmp_path) == []
        assert spool.bytes_on_disk == 0
        spool.append(records(1, start=10))
        assert list(spool.iter_pending()) == records(1, start=10)
    with Spool(tmp_path) as spool:
        assert list(spool.iter_pending()) == records(1, start=10)


def test_corruption_inside_a_sealed_segment_skips_only_that_segment(tmp_path):
    one = len(encode_record(*records(1)[0]))
    with Spool(tmp_path, segment_bytes=3 * one) as spool:
        spool.append(records(9))
    first = segment_files(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[one + HEADER.size] ^= 0xFF  # second record of the first segment
    first.write_bytes(bytes(data))
    with Spool(tmp_path, segment_bytes=3 * one) as spool:
        assert spool.stats()["corrupt_bytes"] == 2 * one
        assert list(spool.iter_pending()) == records(1) + records(6, start=3)
        spool.ack(7)
        assert spool.pending == 0


def test_size_cap_refuses_loudly_and_keeps_what_is_there(tmp_path):
    one = len(encode_record(*records(1)[0]))
    with Spool(tmp_path, max_bytes=5 * one) as spool:
        spool.append(records(4))
        with pytest.raises(ShadowDistillError, match="full"):
            spool.append(records(2, start=4))  # all or nothing
        assert spool.stats()["rejected"] == 2
        assert list(spool.iter_pending()) == records(4)
        spool.append(records(1, start=4))
        spool.ack(5)
        spool.append(records(5, start=5))  # room again once drained
        assert spool.pending == 5


def test_one_owner_per_folder_and_no_use_after_close(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(ShadowDistillError, match="in use"):
        Spool(tmp_path)
    spool.close()
    with pytest.raises(ShadowDistillError, match="closed"):
        spool.append(records(1))
    Spool(tmp_path).close()  # the lock went with close()


def test_bad_settings_name_the_value(tmp_path):
    with pytest.raises(ConfigError, match="max_bytes"):
        Spool(tmp_path, max_bytes=0)
    with pytest.raises(ConfigError, match="segment_bytes"):
        Spool(tmp_path, segment_bytes=3)


def test_a_write_ahead_spool_acks_from_its_index_across_rotations_and_reopens(tmp_path):
    with Spool(tmp_path, segment_bytes=200, write_ahead=True) as spool:
        spool.append(records(30))
        spool.ack(11)
        spool.append(records(10, start=30))
        assert list(spool.iter_pending()) == records(29, start=11)
    with Spool(tmp_path, segment_bytes=200, write_ahead=True) as spool:  # the index is rebuilt on open
        spool.ack(20)
        assert list(spool.iter_pending()) == records(9, start=31)


def test_a_drained_write_ahead_spool_keeps_appending_to_its_segment(tmp_path):
    with Spool(tmp_path, write_ahead=True) as spool:
        spool.append(records(3))
        spool.ack(3)
        spool.append(records(2, start=3))
        assert len(segment_files(tmp_path)) == 1


def test_a_drained_write_ahead_spool_resumes_after_its_cursor(tmp_path):
    with Spool(tmp_path, write_ahead=True) as spool:
        spool.append(records(3))
        spool.ack(3)
    with Spool(tmp_path, write_ahead=True) as spool:
        assert spool.pending == 0
