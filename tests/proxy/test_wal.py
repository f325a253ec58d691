"""Write-ahead log: framing, torn tails, acknowledgement-driven deletion, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trieflow.proxy.wal import (
    RecordKind,
    SegmentInfo,
    WalFullError,
    WriteAheadLog,
    decode_records,
    deletable_segments,
    encode_record,
)


def open_wal(path: Path, **kw: int) -> WriteAheadLog:
    wal = WriteAheadLog(path, **kw)  # type: ignore[arg-type]
    list(wal.replay())
    return wal


def test_records_round_trip_and_torn_tail_is_ignored() -> None:
    blob = encode_record(RecordKind.DATA, "k1", b"hello") + encode_record(RecordKind.ACK, "k1", b"")
    entries, used = decode_records(blob + encode_record(RecordKind.DATA, "k2", b"x" * 50)[:-3])
    assert [(e.kind, e.key, e.payload) for e in entries] == [
        (RecordKind.DATA, "k1", b"hello"),
        (RecordKind.ACK, "k1", b""),
    ]
    assert used == len(blob)


def test_corrupt_record_stops_decoding() -> None:
    good = encode_record(RecordKind.DATA, "a", b"123")
    bad = bytearray(encode_record(RecordKind.DATA, "b", b"456"))
    bad[-1] ^= 0xFF
    entries, used = decode_records(good + bytes(bad) + good)
    assert [e.key for e in entries] == ["a"]
    assert used == len(good)


def test_replay_after_reopen_and_truncation_of_torn_tail(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    wal.append(RecordKind.DATA, "e1", b"one")
    wal.append(RecordKind.DATA, "e2", b"two")
    wal.close()
    segment = sorted(tmp_path.iterdir())[-1]
    with segment.open("ab") as f:
        f.write(encode_record(RecordKind.DATA, "e3", b"three")[:7])  # crash mid-write
    again = WriteAheadLog(tmp_path)
    assert [(e.key, e.payload) for e in again.replay()] == [("e1", b"one"), ("e2", b"two")]
    again.append(RecordKind.DATA, "e4", b"four")
    again.close()
    third = WriteAheadLog(tmp_path)
    assert [e.key for e in third.replay()] == ["e1", "e2", "e4"]


def test_acknowledged_segments_are_deleted_and_nothing_live_is(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, segment_bytes=200)
    for i in range(12):
        wal.append(RecordKind.DATA, f"e{i % 3}", b"x" * 40)
    assert len(list(tmp_path.iterdir())) > 3
    wal.acknowledge("e0")
    wal.acknowledge("e1")
    assert any(True for _ in tmp_path.iterdir())
    keys = {e.key for e in WriteAheadLog(tmp_path).replay() if e.kind is RecordKind.DATA}
    assert "e2" in keys  # the live key keeps its segments
    wal.acknowledge("e2")
    wal.append(RecordKind.DATA, "e9", b"y")  # rotates past the last acked segment
    wal.collect()
    replayed = list(WriteAheadLog(tmp_path).replay())
    live = {e.key for e in replayed if e.kind is RecordKind.DATA} - {
        e.key for e in replayed if e.kind is RecordKind.ACK
    }
    assert live == {"e9"}
    assert wal.size < 200 * 3


def test_ack_record_is_kept_while_older_data_for_it_survives() -> None:
    old = SegmentInfo(0, data_keys={"a", "live"})
    middle = SegmentInfo(1, ack_keys={"a"})
    assert deletable_segments([old, middle], acked={"a"}) == []
    assert deletable_segments([old, middle], acked={"a", "live"}) == [0, 1]
    assert deletable_segments([SegmentInfo(0, data_keys={"a"}), middle], {"a"}) == [0, 1]


def test_disk_bound_refuses_data_but_not_acks(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, max_bytes=300)
    wal.append(RecordKind.DATA, "e", b"x" * 200)
    with pytest.raises(WalFullError):
        wal.append(RecordKind.DATA, "e", b"x" * 200)
    wal.append(RecordKind.DATA, "e", b"x" * 200, bounded=False)
    wal.acknowledge("e")


def test_appended_records_survive_kill_9(tmp_path: Path) -> None:
    """A writer killed with SIGKILL loses nothing it had appended (page cache survives)."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from trieflow.proxy.wal import RecordKind, WriteAheadLog
        wal = WriteAheadLog({str(tmp_path)!r}, segment_bytes=4096)
        list(wal.replay())
        i = 0
        while True:
            wal.append(RecordKind.DATA, f"k{{i % 7}}", str(i).encode() * 20)
            print(i, flush=True)  # reported only after append returned
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acknowledged = -1
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 3000:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    payloads = [e.payload for e in WriteAheadLog(tmp_path).replay()]
    assert len(payloads) > acknowledged
    assert payloads[: acknowledged + 1] == [str(i).encode() * 20 for i in range(acknowledged + 1)]
