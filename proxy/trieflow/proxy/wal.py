"""Append-only write-ahead log of opaque records, grouped by key, deleted on acknowledgement.

Why its own format: the proxy must answer an agent only after the call's recording is
safe, and must delete recordings only once the trainer acknowledged them. Records are
``[u32 length][u32 crc32][u8 kind][u16 key length][key][payload]`` in numbered segment
files. One ``os.write`` per record puts it in the page cache, which survives ``kill -9``
of the process; ``fsync="always"`` also survives power loss (group commit, off the loop).

A key (an episode id) is *live* until an ACK record for it is appended. A segment is
deleted once every key with data in it is acknowledged and no older segment still needs
the acknowledgements it carries (see :func:`deletable_segments`).
"""

from __future__ import annotations

import asyncio
import enum
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_HEADER = struct.Struct("<IIBH")  # payload+key length, crc32, kind, key length
_SEGMENT_SUFFIX = ".wal"


class RecordKind(enum.IntEnum):
    DATA = 1
    ACK = 2


class WalFullError(RuntimeError):
    """Appending would exceed the disk bound; the caller should push back."""


@dataclass(frozen=True, slots=True)
class WalEntry:
    kind: RecordKind
    key: str
    payload: bytes


@dataclass(slots=True)
class SegmentInfo:
    """What a segment holds, enough to decide when it may be deleted."""

    number: int
    size: int = 0
    data_keys: set[str] = field(default_factory=set)
    ack_keys: set[str] = field(default_factory=set)


def encode_record(kind: RecordKind, key: str, payload: bytes) -> bytes:
    key_bytes = key.encode()
    body = bytes([kind]) + len(key_bytes).to_bytes(2, "little") + key_bytes + payload
    crc = zlib.crc32(body)
    return struct.pack("<II", len(body) - 3, crc) + body


def decode_records(buffer: bytes) -> tuple[list[WalEntry], int]:
    """Decodes whole records from ``buffer``; returns them and the bytes consumed.

    Stops at the first torn or corrupt record (a crash mid-write leaves one at the end).
    """
    entries: list[WalEntry] = []
    offset = 0
    while offset + _HEADER.size <= len(buffer):
        rest_length, crc, kind, key_length = _HEADER.unpack_from(buffer, offset)
        end = offset + 8 + 3 + rest_length
        if end > len(buffer) or key_length > rest_length:
            break
        body = buffer[offset + 8 : end]
        if zlib.crc32(body) != crc or kind not in (RecordKind.DATA, RecordKind.ACK):
            break
        key = body[3 : 3 + key_length].decode()
        entries.append(WalEntry(RecordKind(kind), key, bytes(body[3 + key_length :])))
        offset = end
    return entries, offset


def deletable_segments(segments: list[SegmentInfo], acked: set[str]) -> list[int]:
    """Numbers of segments whose deletion loses nothing.

    A segment may go when all its data keys are acknowledged and, for each ACK it holds,
    no *remaining* segment still holds data for that key (else replay would resurrect it).
    Deleting can unblock others, so iterate to a fixed point.
    """
    remaining = {s.number: s for s in segments}
    doomed: list[int] = []
    changed = True
    while changed:
        changed = False
        for number, seg in sorted(remaining.items()):
            if not seg.data_keys <= acked:
                continue
            needed = any(
                key in other.data_keys
                for key in seg.ack_keys
                for other_no, other in remaining.items()
                if other_no != number
            )
            if not needed:
                doomed.append(number)
                del remaining[number]
                changed = True
                break
    return sorted(doomed)


class WriteAheadLog:
    """Segmented log in one directory. Not thread-safe: use from one event loop."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 << 20,
        max_bytes: int = 8 << 30,
        fsync: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._segments: list[SegmentInfo] = []
        self._acked: set[str] = set()
        self._fd = -1
        self._size = 0
        self._sync_lock = asyncio.Lock()
        self._written_generation = 0
        self._synced_generation = 0

    # -- reading ---------------------------------------------------------------------

    def replay(self) -> Iterator[WalEntry]:
        """Yields every intact record in order and prepares the log for appending.

        Must be called once before :meth:`append`. A torn tail is truncated away.
        """
        numbers = sorted(
            int(p.name.removesuffix(_SEGMENT_SUFFIX))
            for p in self.directory.glob(f"*{_SEGMENT_SUFFIX}")
            if p.name.removesuffix(_SEGMENT_SUFFIX).isdigit()
        )
        for number in numbers:
            path = self._path(number)
            data = path.read_bytes()
            entries, consumed = decode_records(data)
            if consumed < len(data):
                with path.open("r+b") as handle:  # drop the torn tail before appending
                    handle.truncate(consumed)
            info = SegmentInfo(number, size=consumed)
            self._size += consumed
            for entry in entries:
                if entry.kind is RecordKind.DATA:
                    info.data_keys.add(entry.key)
                else:
                    info.ack_keys.add(entry.key)
                    self._acked.add(entry.key)
                yield entry
            self._segments.append(info)
        self._open_segment((numbers[-1] + 1) if numbers else 0)
        self.collect()

    # -- writing ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in all segment files (kept as a running total: read on every request)."""
        return self._size

    def append(self, kind: RecordKind, key: str, payload: bytes, *, bounded: bool = True) -> None:
        """Writes one record; on return it survives a crash of this process.

        ``bounded=False`` lets records that lead to freeing space (an episode's end) pass
        the size bound; ACK records always pass it.
        """
        if self._fd < 0:
            raise RuntimeError("replay() the log before appending")
        record = encode_record(kind, key, payload)
        if bounded and kind is RecordKind.DATA and self.size + len(record) > self.max_bytes:
            raise WalFullError(f"write-ahead log holds {self.size} of {self.max_bytes} bytes")
        current = self._segments[-1]
        if current.size and current.size + len(record) > self.segment_bytes:
            self._open_segment(current.number + 1)
            current = self._segments[-1]
        written = os.write(self._fd, record)
        if written != len(record):  # regular files write fully or raise; be explicit
            raise OSError(f"short write to write-ahead log: {written} of {len(record)}")
        current.size += written
        self._size += written
        if kind is RecordKind.DATA:
            current.data_keys.add(key)
        else:
            current.ack_keys.add(key)
            self._acked.add(key)
        self._written_generation += 1

    async def sync(self) -> None:
        """Makes appended records survive power loss when ``fsync`` is on (group commit)."""
        if not self.fsync:
            return
        target = self._written_generation
        async with self._sync_lock:
            if self._synced_generation >= target:
                return  # a concurrent sync covered us
            generation, fd = self._written_generation, self._fd
            await asyncio.to_thread(os.fsync, fd)
            self._synced_generation = generation

    def acknowledge(self, key: str) -> None:
        """Marks a key's records as no longer needed and deletes what became garbage."""
        self.append(RecordKind.ACK, key, b"")
        self.collect()

    def collect(self) -> list[int]:
        """Deletes closed segments whose records are all acknowledged."""
        closed = self._segments[:-1]
        doomed = deletable_segments(closed, self._acked)
        for number in doomed:
            self._path(number).unlink(missing_ok=True)
        if doomed:
            gone = set(doomed)
            self._size -= sum(s.size for s in self._segments if s.number in gone)
            self._segments = [s for s in self._segments if s.number not in gone]
            still_referenced = set().union(*(s.data_keys | s.ack_keys for s in self._segments))
            self._acked &= still_referenced
        return doomed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- internals -------------------------------------------------------------------

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:012d}{_SEGMENT_SUFFIX}"

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            if self.fsync:
                os.fsync(self._fd)  # the closed segment must be durable before we move on
            os.close(self._fd)
        self._fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if not self._segments or self._segments[-1].number != number:
            existing = os.fstat(self._fd).st_size
            self._segments.append(SegmentInfo(number, size=existing))
            self._size += existing
        if self.fsync:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.collect()
