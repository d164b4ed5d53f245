"""Parquet dataset sink: hive partitions vm_id=/date=, large row groups, atomic files.

Layout: DIR/vm_id=<vm_id>/date=<YYYY-MM-DD>/part-<start ns>-<pid>-<n>.parquet.

* Records are validated and converted to Arrow when write() is called, then buffered until
  `batch_rows` rows (one row group of >= 64k rows) or `batch_seconds` have passed.
* A file is written under a hidden temporary name (`.part-....parquet.tmp`, ignored by DuckDB,
  pyarrow, pandas and polars), and only when it is complete (footer written, fsynced) is it
  renamed to its final name and the directory fsynced. Files roll after `file_rows` rows or
  `file_seconds`. A process killed at any moment therefore leaves only complete files under
  final names; what sat in the buffer or the open temporary file is lost (the temporary file
  is not visible and is removed by the next sink opened on the directory).
* flush() writes the buffer and finalizes the open files: after it returns, everything
  written so far is durable and visible.
* A storage error (disk full, I/O error) removes the broken temporary file, counts every row
  it held or was about to hold as dropped and raises SinkError; finished files are never
  touched. The sink stays usable, and the next file it completes starts with loss records
  (`counter` = "parquet.dropped", one per VM) for the rows lost.
* Readers: `duckdb.read_parquet('DIR/**/*.parquet', hive_partitioning=true)`,
  `pandas.read_parquet(DIR)`, `polars.scan_parquet(DIR, hive_partitioning=True)`. As usual for
  hive datasets, `vm_id` is in the directory names only (pyarrow and pandas refuse a column
  that is both in the path and in the file); readers infer its type from the values, so a
  purely numeric vm_id reads back as an integer (KVMI vm ids are UUIDs).
"""

from __future__ import annotations

import datetime
import os
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sinks.base import SinkError, SinkStats
from sinks.schema import DICTIONARY_COLUMNS, SCHEMA, loss_record, records_to_batch

NS_PER_DAY = 86_400 * 10**9
_LOSS_COUNTER = "parquet.dropped"
# vm_id lives in the directory name only: readers that merge partition and file columns
# (pyarrow, hence pandas) refuse a column present in both.
FILE_SCHEMA = SCHEMA.remove(SCHEMA.get_field_index("vm_id"))
_SAFE_PARTITION_VALUE = re.compile(r"[A-Za-z0-9._-]+\Z")


def partition_value(value: str) -> str:
    """A vm_id as a directory name: itself when plain, percent-encoded otherwise (hive
    readers decode it)."""
    if _SAFE_PARTITION_VALUE.match(value) and value not in (".", ".."):
        return value
    return urllib.parse.quote(value, safe="")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _OpenFile:
    """The temporary file of one partition being filled."""

    final: Path
    temp: Path
    writer: pq.ParquetWriter
    opened: float
    rows: int = 0
    data_rows_by_vm: dict[str, int] = field(default_factory=dict)  # rows other than our losses
    losses_carried: dict[str, int] = field(default_factory=dict)  # counts in our loss records


class ParquetSink:
    """Writes schema v1 records to a hive-partitioned Parquet dataset under `root`."""

    def __init__(self, root: str | os.PathLike, *, batch_rows: int = 65536,
                 batch_seconds: float = 5.0, file_rows: int = 1 << 20,
                 file_seconds: float = 300.0, compression: str = "zstd",
                 compression_level: int | None = None) -> None:
        self.root = Path(root)
        self.batch_rows = batch_rows
        self.batch_seconds = batch_seconds
        self.file_rows = file_rows
        self.file_seconds = file_seconds
        self.compression = compression
        self.compression_level = compression_level
        self.stats = SinkStats()
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = 0
        self._buffer_started = time.monotonic()
        self._files: dict[tuple[str, int], _OpenFile] = {}
        self._lost_by_vm: dict[str, int] = {}  # dropped rows not yet in a loss record
        self._loss_since = 0
        self._loss_seq = 0
        self._file_counter = 0
        self._name_prefix = f"part-{time.time_ns()}-{os.getpid()}"
        self._known_dirs: set[Path] = set()
        self._closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    # --- the Sink interface ------------------------------------------------------------------

    def write(self, records: list[dict[str, Any]]) -> None:
        if self._closed:
            raise SinkError("parquet sink is closed")
        if records:
            batch = records_to_batch(records)  # raises RecordError; nothing accepted then
            if not self._buffer:
                self._buffer_started = time.monotonic()
            self._buffer.append(batch)
            self._buffered_rows += batch.num_rows
        self.poll()

    def poll(self) -> None:
        """Time- and size-based work: write a full or old buffer, roll old files."""
        now = time.monotonic()
        if self._buffered_rows >= self.batch_rows or (
                self._buffer and now - self._buffer_started >= self.batch_seconds):
            self._write_buffer()
        now = time.monotonic()
        for key, open_file in list(self._files.items()):
            if now - open_file.opened >= self.file_seconds:
                self._finalize(key)

    def flush(self) -> None:
        self._write_buffer()
        for key in list(self._files):
            self._finalize(key)

    def close(self) -> dict[str, int]:
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True
                for key in list(self._files):  # only after a failed flush
                    self._discard(key)
        return self.stats.as_dict()

    # --- internals ---------------------------------------------------------------------------

    def _write_buffer(self) -> None:
        if not self._buffer and not self._lost_by_vm:
            return
        batches = self._buffer
        losses = self._loss_batch()
        if losses is not None:
            batches = batches + [losses]
        table = pa.Table.from_batches(batches, schema=SCHEMA)
        self._buffer, self._buffered_rows = [], 0
        parts = list(self._partitions(table))
        errors = []
        for key, part in parts:
            try:
                self._write_partition(key, part, losses is not None)
            except SinkError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _partitions(self, table: pa.Table):
        """(vm_id, day number) -> rows, keeping the order of rows within each partition."""
        days = pc.divide(table.column("time").cast(pa.int64()), NS_PER_DAY)
        vm_ids = table.column("vm_id")
        first_vm, first_day = vm_ids[0].as_py(), days[0].as_py()
        if pc.all(pc.equal(vm_ids, first_vm)).as_py() and \
                pc.all(pc.equal(days, first_day)).as_py():
            yield (first_vm, first_day), table  # the common case: one VM, one day
            return
        keys = pa.table({"vm_id": vm_ids, "day": days,
                         "row": pa.array(range(table.num_rows), pa.int64())})
        groups = keys.group_by(["vm_id", "day"], use_threads=False).aggregate([("row", "list")])
        for vm_id, day, rows in zip(groups.column("vm_id").to_pylist(),
                                    groups.column("day").to_pylist(),
                                    groups.column("row_list").to_pylist()):
            yield (vm_id, day), table.take(pa.array(rows, pa.int64()))

    def _write_partition(self, key: tuple[str, int], table: pa.Table,
                         may_carry_losses: bool) -> None:
        vm_id = key[0]
        carried = 0
        loss_rows = 0
        if may_carry_losses:
            ours = pc.fill_null(pc.equal(table.column("counter"), _LOSS_COUNTER), False)
            loss_rows = pc.sum(ours.cast(pa.int64())).as_py() or 0
            carried = pc.sum(pc.filter(table.column("count"), ours)).as_py() or 0
        open_file = self._files.get(key)
        try:
            if open_file is None:
                open_file = self._open(key)
            open_file.writer.write_table(table.drop_columns(["vm_id"]),
                                         row_group_size=max(table.num_rows, 1))
        except OSError as exc:
            self._fail(key, vm_id, table.num_rows - loss_rows, carried, exc)
        open_file.rows += table.num_rows
        data = open_file.data_rows_by_vm
        data[vm_id] = data.get(vm_id, 0) + table.num_rows - loss_rows
        if carried:
            open_file.losses_carried[vm_id] = open_file.losses_carried.get(vm_id, 0) + carried
        if open_file.rows >= self.file_rows:
            self._finalize(key)

    def _loss_batch(self) -> pa.RecordBatch | None:
        """Loss records for rows dropped earlier; they travel with the next write and count as
        reported once their file is complete (a failure puts their counts back)."""
        if not self._lost_by_vm:
            return None
        now = time.time_ns()
        records = []
        for lost_vm, count in sorted(self._lost_by_vm.items()):
            records.append(loss_record(lost_vm, _LOSS_COUNTER, count, self._loss_since, now,
                                       self._loss_seq))
            self._loss_seq += 1
        self._lost_by_vm.clear()
        return records_to_batch(records)

    def _open(self, key: tuple[str, int]) -> _OpenFile:
        vm_id, day = key
        date = datetime.date(1970, 1, 1) + datetime.timedelta(days=day)
        directory = self.root / f"vm_id={partition_value(vm_id)}" / f"date={date.isoformat()}"
        if directory not in self._known_dirs:
            self._make_dirs(directory)
        name = f"{self._name_prefix}-{self._file_counter}.parquet"
        self._file_counter += 1
        temp = directory / f".{name}.tmp"
        writer = pq.ParquetWriter(
            temp, FILE_SCHEMA, compression=self.compression,
            compression_level=self.compression_level, use_dictionary=list(DICTIONARY_COLUMNS),
            write_statistics=True, store_schema=True)
        open_file = _OpenFile(final=directory / name, temp=temp, writer=writer,
                              opened=time.monotonic())
        self._files[key] = open_file
        return open_file

    def _make_dirs(self, directory: Path) -> None:
        """Create the partition directories and make their entries durable."""
        missing = []
        parent = directory
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            _fsync_dir(created.parent)
        self._known_dirs.add(directory)

    def _finalize(self, key: tuple[str, int]) -> None:
        """Footer, fsync, rename to the final name, fsync the directory."""
        open_file = self._files[key]
        try:
            open_file.writer.close()
            fd = os.open(open_file.temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(open_file.temp, open_file.final)
            _fsync_dir(open_file.final.parent)
        except OSError as exc:
            self._fail(key, key[0], 0, 0, exc)
        del self._files[key]
        self.stats.written += open_file.rows
        self.stats.loss_records += open_file.rows - sum(open_file.data_rows_by_vm.values())
        self.stats.files += 1

    def _fail(self, key: tuple[str, int], vm_id: str, data_rows: int, carried: int,
              exc: OSError) -> NoReturn:
        """A storage error: drop the partition's temporary file, count its rows, raise."""
        open_file = self._files.get(key)
        lost = dict(open_file.data_rows_by_vm) if open_file else {}
        lost[vm_id] = lost.get(vm_id, 0) + data_rows
        unreported = dict(open_file.losses_carried) if open_file else {}
        unreported[vm_id] = unreported.get(vm_id, 0) + carried
        self._discard(key)
        if not self._lost_by_vm:
            self._loss_since = time.time_ns()
        for counts in (lost, unreported):
            for lost_vm, count in counts.items():
                if count:
                    self._lost_by_vm[lost_vm] = self._lost_by_vm.get(lost_vm, 0) + count
        total = sum(lost.values())
        self.stats.dropped += total
        self.stats.errors += 1
        where = open_file.temp if open_file else self.root
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SinkError(f"parquet sink: {reason} writing {where}: {total} records not "
                        f"written (files completed earlier are intact)") from exc

    def _discard(self, key: tuple[str, int]) -> None:
        open_file = self._files.pop(key, None)
        if open_file is None:
            return
        try:
            open_file.writer.close()
        except OSError:
            pass  # the file is being thrown away; its error was already reported
        try:
            os.unlink(open_file.temp)
        except FileNotFoundError:
            pass

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a writer that was killed are incomplete: remove them (those of
        a writer process still running are left alone)."""
        for stale in self.root.glob("vm_id=*/date=*/.part-*.parquet.tmp"):
            match = re.match(r"\.part-\d+-(\d+)-\d+\.parquet\.tmp\Z", stale.name)
            if match and _process_alive(int(match.group(1))):
                continue
            stale.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["FILE_SCHEMA", "ParquetSink", "partition_value"]
