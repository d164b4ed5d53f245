"""An append-only on-disk journal of Kafka messages that could not be delivered yet.

File `spill.journal` in the spill directory holds frames
`u32 payload length | u32 crc32(payload) | payload`, payload = `u16 key length | u32 OCSF
class | key | value`. `spill.offset` holds the offset of the first frame
not yet known to be delivered (written atomically): entries handed back by read() count as
consumed only when the caller says so (mark_consumed_if), so a crash while they are in
flight replays them. The directory is locked (flock) by one sink at a time. On opening,
frames after the offset are checked and a torn or corrupt tail (a writer killed mid-append)
is cut off. When everything has been read back the journal is truncated to zero.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from pathlib import Path

_FRAME = struct.Struct("<II")
_PAYLOAD = struct.Struct("<HI")
MAX_FRAME = 16 << 20

Entry = tuple[bytes, int, bytes]  # key, OCSF class_uid, value


class SpillError(OSError):
    pass


class SpillJournal:
    def __init__(self, directory: str | os.PathLike, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = open(self.directory / "spill.lock", "a+b")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SpillError(f"spill directory {self.directory} is in use by another sink")
        self._path = self.directory / "spill.journal"
        self._offset_path = self.directory / "spill.offset"
        self._file = open(self._path, "a+b")
        self._read_offset = self._load_offset()  # cursor of read()
        self.pending = 0  # entries not yet read back
        self.torn_bytes = 0  # bytes of a torn tail cut off when opening
        self._end = self._recover()
        self._safe_offset = self._read_offset  # everything before it was delivered
        self._last_read_sizes: list[int] = []
        self._dirty = False

    @property
    def size(self) -> int:
        return self._end

    def _load_offset(self) -> int:
        try:
            return int(self._offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _recover(self) -> int:
        """Count complete frames after the read offset; cut a torn tail."""
        size = os.fstat(self._file.fileno()).st_size
        if self._read_offset > size:
            self._read_offset = 0
        position = self._read_offset
        with open(self._path, "rb") as reader:
            reader.seek(position)
            while True:
                header = reader.read(_FRAME.size)
                if len(header) < _FRAME.size:
                    break
                length, crc = _FRAME.unpack(header)
                if length > MAX_FRAME:
                    break
                payload = reader.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    break
                position += _FRAME.size + length
                self.pending += 1
        if position < size:
            self.torn_bytes = size - position
            self._file.truncate(position)
            os.fsync(self._file.fileno())
        return position

    def append(self, entries: list[Entry], reserve: int = 0) -> int:
        """Append as many entries as fit under max_bytes (+ reserve); return how many."""
        chunks = []
        added = 0
        end = self._end
        for key, class_uid, value in entries:
            payload = _PAYLOAD.pack(len(key), class_uid) + key + value
            frame_size = _FRAME.size + len(payload)
            if end + frame_size > self.max_bytes + reserve:
                break
            chunks.append(_FRAME.pack(len(payload), zlib.crc32(payload)))
            chunks.append(payload)
            end += frame_size
            added += 1
        if chunks:
            self._file.seek(0, os.SEEK_END)
            self._file.write(b"".join(chunks))
            self._file.flush()
            self._end = end
            self.pending += added
            self._dirty = True
        return added

    def read(self, max_entries: int) -> list[Entry]:
        """Hand back up to max_entries from the cursor, oldest first."""
        entries: list[Entry] = []
        sizes: list[int] = []
        with open(self._path, "rb") as reader:
            reader.seek(self._read_offset)
            while len(entries) < max_entries and self._read_offset < self._end:
                length, _ = _FRAME.unpack(reader.read(_FRAME.size))
                payload = reader.read(length)
                key_length, class_uid = _PAYLOAD.unpack_from(payload)
                start = _PAYLOAD.size
                entries.append((payload[start:start + key_length], class_uid,
                                payload[start + key_length:]))
                sizes.append(_FRAME.size + length)
                self._read_offset += _FRAME.size + length
        self._last_read_sizes = sizes
        self.pending -= len(entries)
        return entries

    def unread(self, count: int) -> None:
        """Put the last `count` entries of the latest read() back (the caller could not use
        them)."""
        if count <= 0:
            return
        sizes = self._last_read_sizes[-count:]
        self._read_offset -= sum(sizes)
        self.pending += len(sizes)
        del self._last_read_sizes[-count:]

    def mark_consumed_if(self, condition: bool) -> None:
        """When `condition` (every entry read so far is delivered), the cursor becomes the
        durable start of the journal at the next commit()."""
        if condition and self._safe_offset != self._read_offset:
            self._safe_offset = self._read_offset
            self._dirty = True

    def commit(self) -> None:
        """Make appended entries and the consumed position durable; truncate when drained."""
        if not self._dirty:
            return
        if self._safe_offset >= self._end:
            self._file.truncate(0)
            self._read_offset = self._safe_offset = self._end = 0
            self._last_read_sizes = []
        os.fsync(self._file.fileno())
        temp = self._offset_path.with_suffix(".tmp")
        with open(temp, "w") as f:
            f.write(str(self._safe_offset))
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, self._offset_path)
        self._dirty = False

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._file.close()
            self._lock.close()
