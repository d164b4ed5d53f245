"""Parquet sink against real readers (DuckDB, pandas, polars), a real full disk (tmpfs) and
a writer process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sinks import open_sink
from sinks.base import SinkError
from sinks.parquet import ParquetSink
from sinks.schema import SCHEMA, SCHEMA_VERSION, RecordError, RecordFactory, make_process_uid
from test_schema import sample_records

DAY_NS = 86_400 * 10**9
T0 = 1_763_000_000_000_000_000  # 2025-11-13T02:13:20Z
MIDNIGHT = (T0 // DAY_NS + 1) * DAY_NS  # 2025-11-14T00:00:00Z
REPO = Path(__file__).resolve().parents[1]


def syscall_records(vm_id: str, count: int, start_ns: int = T0, step_ns: int = 1000,
                    session: int = 7) -> list[dict]:
    """Realistic syscall records (one per call, a few shapes) with decoded args."""
    factory = RecordFactory(vm_id, f"name-{vm_id}", "observer", session)
    records = []
    for i in range(count):
        pid = 100 + i % 37
        common = dict(vcpu=i % 2, pid=pid, tid=pid, ppid=1, uid=1000, gid=1000,
                      process_uid=make_process_uid(vm_id, pid, 5_000_000 + pid),
                      comm=f"worker{pid % 5}", exe="/bin/busybox", cr3=0x1000 * (pid % 4))
        if i % 3 == 0:
            records.append(factory.new(
                "syscall", "call", start_ns + i * step_ns, action="openat", syscall_nr=257,
                args=[0xFFFFFF9C, 0x7FFC0000 + i, 0x80000, 0], ret=3 + i % 5, path=f"/tmp/f{i % 97}",
                fd=-100, flags="O_RDONLY|O_CLOEXEC", mode=0,
                decoded_args=[{"name": "dfd", "type": "int", "value": "AT_FDCWD",
                               "truncated": False, "error": None},
                              {"name": "filename", "type": "const char *",
                               "value": f"/tmp/f{i % 97}", "truncated": False, "error": None}],
                **common))
        elif i % 3 == 1:
            records.append(factory.new(
                "syscall", "call", start_ns + i * step_ns, action="read", syscall_nr=0,
                args=[3, 0x7FFC1000, 4096], ret=-11, errno="EAGAIN", fd=3, length=4096,
                **common))
        else:
            records.append(factory.new(
                "process", "exec", start_ns + i * step_ns, action="execve", path="/bin/ls",
                argv=["ls", "-l", f"/dir{i}"], cmdline=f"ls -l /dir{i}",
                parent_process_uid=make_process_uid(vm_id, 1, 0), **common))
    return records


def visible_files(root: Path) -> list[Path]:
    return sorted(root.glob("vm_id=*/date=*/*.parquet"))


def duckdb_rows(root: Path) -> list[dict]:
    con = duckdb.connect()
    rel = con.sql("SELECT * REPLACE (epoch_ns(time) AS time, "
                  "epoch_ns(interval_start) AS interval_start) "
                  f"FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true) "
                  "ORDER BY vm_id, seq")
    names = rel.columns
    return [dict(zip(names, row)) for row in rel.fetchall()]


def test_dataset_round_trips_through_duckdb_pandas_polars(tmp_path):
    records = (syscall_records("vm-a", 3000) + sample_records()
               + syscall_records("vm-b", 500, start_ns=MIDNIGHT - 250_000, step_ns=1000))
    sink = ParquetSink(tmp_path, batch_rows=1024)
    for i in range(0, len(records), 333):
        sink.write(records[i:i + 333])
    stats = sink.close()
    assert stats["written"] == len(records) and stats["dropped"] == 0

    dirs = sorted(str(p.parent.relative_to(tmp_path)) for p in visible_files(tmp_path))
    assert "vm_id=vm-a/date=2025-11-13" in dirs
    assert {"vm_id=vm-b/date=2025-11-13", "vm_id=vm-b/date=2025-11-14"} <= set(dirs)

    # DuckDB (independent reader): every record, field by field.
    rows = duckdb_rows(tmp_path)
    assert len(rows) == len(records)
    by_uid = {r["event_uid"]: r for r in rows}
    for record in records:
        row = by_uid[record["event_uid"]]
        for name in SCHEMA.names:
            expected = record.get(name)
            got = row[name]
            if name == "extra" and got is not None:
                got = dict(got)
            assert got == expected, (name, record["event_uid"], got, expected)
        day = (record["time"] // DAY_NS)
        assert row["date"].toordinal() - 719163 == day  # date partition = UTC day of time

    frame = pd.read_parquet(tmp_path)
    assert len(frame) == len(records)
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]"
    assert sorted(frame["event_uid"]) == sorted(r["event_uid"] for r in records)
    assert set(frame["vm_id"].astype(str)) == {"vm-a", "vm-b", sample_records()[0]["vm_id"]}

    lazy = pl.scan_parquet(tmp_path, hive_partitioning=True)
    counts = dict(lazy.group_by("vm_id").len().collect().iter_rows())
    assert counts == {"vm-a": 3000, "vm-b": 500, sample_records()[0]["vm_id"]: 13}
    errors = lazy.filter(pl.col("errno") == "EAGAIN").select(pl.len()).collect().item()
    assert errors == sum(1 for r in records if r.get("errno") == "EAGAIN")


def test_file_format_row_groups_compression_dictionary_metadata(tmp_path):
    records = syscall_records("vm-a", 140_000, step_ns=10)
    sink = ParquetSink(tmp_path)  # defaults: 64k-row batches
    for i in range(0, len(records), 10_000):
        sink.write(records[i:i + 10_000])
    sink.close()
    [path] = visible_files(tmp_path)
    meta = pq.read_metadata(path)
    assert meta.metadata[b"vmitrace.schema_version"] == SCHEMA_VERSION.encode()
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 140_000
    assert all(size >= 65536 for size in sizes[:-1]) and len(sizes) <= 3
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
               for i in range(meta.row_group(0).num_columns)}
    assert all(c.compression == "ZSTD" for c in columns.values())
    for low_cardinality in ("comm", "kind", "action", "flags"):
        assert "RLE_DICTIONARY" in columns[low_cardinality].encodings or \
            "PLAIN_DICTIONARY" in columns[low_cardinality].encodings
    assert not any("DICTIONARY" in e for e in columns["event_uid"].encodings)
    table = pq.read_table(path)
    assert table.schema.field("time").type == pa.timestamp("ns", tz="UTC")


def test_files_appear_only_complete_and_roll(tmp_path):
    sink = ParquetSink(tmp_path, batch_rows=100, file_rows=250)
    records = syscall_records("vm-a", 1000)
    sink.write(records[:99])
    assert visible_files(tmp_path) == []  # still buffered
    sink.write(records[99:200])
    assert visible_files(tmp_path) == []  # written to a hidden temporary file only
    assert list(tmp_path.glob("vm_id=vm-a/date=*/.part-*.parquet.tmp"))
    for start in range(200, 1000, 100):
        sink.write(records[start:start + 100])
    files = visible_files(tmp_path)
    assert len(files) >= 3  # rolled by rows
    assert all(pq.read_metadata(f).num_rows >= 250 for f in files)
    sink.flush()
    assert sum(pq.read_metadata(f).num_rows for f in visible_files(tmp_path)) == 1000
    assert not list(tmp_path.glob("**/.part-*"))
    sink.close()


def test_time_based_flush_and_roll(tmp_path):
    # Zero intervals: every write() flushes its rows and finalizes its file at once.
    sink = ParquetSink(tmp_path, batch_seconds=0, file_seconds=0)
    sink.write(syscall_records("vm-a", 10))
    assert sum(pq.read_metadata(f).num_rows for f in visible_files(tmp_path)) == 10
    sink.write(syscall_records("vm-a", 5, session=8))
    assert sum(pq.read_metadata(f).num_rows for f in visible_files(tmp_path)) == 15
    assert sink.close()["files"] == 2


def test_bad_records_rejected_nothing_written(tmp_path):
    sink = ParquetSink(tmp_path, batch_seconds=0, file_seconds=0)
    good = syscall_records("vm-a", 3)
    with pytest.raises(RecordError, match="record 1: column 'pid'"):
        sink.write([good[0], dict(good[1], pid="12"), good[2]])
    assert visible_files(tmp_path) == []
    sink.write(good)
    assert sink.close()["written"] == 3


def test_vm_id_with_special_characters_is_encoded(tmp_path):
    factory = RecordFactory("lab/vm 1=x")
    sink = ParquetSink(tmp_path)
    sink.write([factory.new("syscall", "call", T0, action="getpid")])
    sink.close()
    [path] = visible_files(tmp_path)
    assert path.parent.parent.name == "vm_id=lab%2Fvm%201%3Dx"
    assert pd.read_parquet(tmp_path)["vm_id"].astype(str).tolist() == ["lab/vm 1=x"]


def test_open_sink_spec(tmp_path):
    sink = open_sink(f"parquet:{tmp_path}/ds?batch_rows=10&file_rows=20")
    assert isinstance(sink, ParquetSink) and sink.batch_rows == 10 and sink.file_rows == 20
    sink.write(syscall_records("vm-a", 45))
    assert sink.close()["written"] == 45


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB file system that fills up."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                   check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_full_disk_clear_error_earlier_files_intact_losses_counted(small_tmpfs):
    root = small_tmpfs / "ds"
    sink = ParquetSink(root, batch_rows=2000, file_rows=2000)
    accepted = 0
    error = None
    for chunk in range(200):
        records = syscall_records("vm-a", 2000, start_ns=T0 + chunk * 10**9, session=chunk)
        try:
            sink.write(records)
            accepted += len(records)
        except SinkError as exc:
            error = exc
            accepted += len(records)  # handed over; the error counts what was lost
            break
    assert error is not None, "the 1 MiB file system never filled up"
    assert "No space left on device" in str(error)
    assert "records not written" in str(error) and "intact" in str(error)
    stats = sink.stats.as_dict()
    assert stats["dropped"] > 0 and stats["errors"] == 1
    # Every completed file is intact and readable; what they hold plus what was dropped and
    # what is still pending accounts for every record handed over.
    files = visible_files(root)
    assert files
    on_disk = sum(pq.read_table(f).num_rows for f in files)
    assert on_disk == stats["written"]
    assert not list(root.glob("**/.part-*.tmp"))  # the broken temporary file is gone
    pending = sink._buffered_rows + sum(f.rows for f in sink._files.values())
    assert stats["written"] + stats["dropped"] + pending == accepted

    # Space comes back: the sink goes on, and its next file starts with a loss record.
    for f in files[: len(files) // 2 + 1]:
        f.unlink()
    removed = on_disk - sum(pq.read_table(f).num_rows for f in visible_files(root))
    sink.write(syscall_records("vm-a", 10, start_ns=T0 + 500 * 10**9, session=999))
    final = sink.close()
    assert final["dropped"] == stats["dropped"] and final["loss_records"] == 1
    losses = duckdb.sql(f"SELECT counter, count, kind FROM read_parquet('{root}/**/*.parquet')"
                        " WHERE kind = 'loss'").fetchall()
    assert losses == [("parquet.dropped", stats["dropped"], "loss")]
    total = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/**/*.parquet')").fetchall()[0][0]
    assert total == final["written"] - removed  # written includes the loss record


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from sinks.parquet import ParquetSink
    from test_sink_parquet import syscall_records
    sink = ParquetSink({root!r}, batch_rows=700, file_rows=1500)
    chunk = 0
    while True:
        sink.write(syscall_records("vm-k", 350, start_ns={t0} + chunk * 10**9, session=chunk))
        chunk += 1
        if chunk % 3 == 0:
            print(chunk, flush=True)
""")


@pytest.mark.parametrize("chunks_before_kill", [1, 4, 9, 15, 22])
def test_sigkill_leaves_only_complete_files(tmp_path, chunks_before_kill):
    root = tmp_path / "ds"
    script = WRITER.format(tests=str(REPO / "tests"), root=str(root), t0=T0)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        progress = 0
        while progress < chunks_before_kill:
            line = proc.stdout.readline()
            assert line, f"writer died: {proc.wait()}"
            progress = int(line)
        time.sleep(0.01 * chunks_before_kill)  # land the kill at varying points
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    files = visible_files(root)
    for path in files:
        table = pq.read_table(path)  # complete: footer present, every row group readable
        assert table.num_rows >= 1500
        assert pq.read_metadata(path).metadata[b"vmitrace.schema_version"] == b"1"
    if files:
        count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/**/*.parquet')").fetchall()[0][0]
        assert count == sum(pq.read_metadata(f).num_rows for f in files)
    # Hidden leftovers of the killed writer are removed by the next sink on the directory.
    ParquetSink(root).close()
    assert not list(root.glob("**/.part-*.tmp"))
    assert visible_files(root) == files
