"""JSONL sink (file, stdout, full disk) and open_sink / fan-out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import orjson
import pytest

from sinks import FanoutSink, SinkError, open_sink, open_sinks
from sinks.jsonl import JsonlSink
from sinks.schema import RecordError
from test_schema import sample_records
from test_schema_ocsf import ocsf_errors
from test_sink_parquet import small_tmpfs, syscall_records  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def test_jsonl_formats(tmp_path):
    records = sample_records()
    for fmt in ("ocsf", "ecs", "raw"):
        sink = open_sink(f"jsonl:{tmp_path}/{fmt}.jsonl?format={fmt}")
        sink.write(records[:5])
        sink.write(records[5:])
        assert sink.close()["written"] == len(records)
    ocsf = [orjson.loads(line) for line in (tmp_path / "ocsf.jsonl").read_bytes().splitlines()]
    assert [e["metadata"]["uid"] for e in ocsf] == [r["event_uid"] for r in records]
    assert all(ocsf_errors(e) == [] for e in ocsf)
    ecs = [orjson.loads(line) for line in (tmp_path / "ecs.jsonl").read_bytes().splitlines()]
    assert [e["event"]["id"] for e in ecs] == [r["event_uid"] for r in records]
    raw = [orjson.loads(line) for line in (tmp_path / "raw.jsonl").read_bytes().splitlines()]
    assert raw == records
    # an independent reader
    count = duckdb.sql(f"SELECT count(*) FROM read_json('{tmp_path}/raw.jsonl', "
                       "format='newline_delimited')").fetchall()[0][0]
    assert count == len(records)


def test_jsonl_appends_and_rejects_bad_records(tmp_path):
    path = tmp_path / "out.jsonl"
    JsonlSink(path).close()
    sink = JsonlSink(path)
    good = syscall_records("vm-j", 4)
    with pytest.raises(RecordError):
        sink.write([good[0], dict(good[1], ret="0")])
    sink.write(good[:2])
    sink.close()
    sink = JsonlSink(path)
    sink.write(good[2:])
    sink.close()
    assert len(path.read_bytes().splitlines()) == 4


def test_jsonl_stdout():
    script = ("import sys; sys.path.insert(0, 'tests'); from sinks import open_sink;"
              "from test_schema import sample_records;"
              "s = open_sink('jsonl:-'); s.write(sample_records()); print(s.close(), "
              "file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=REPO,
                            check=True)
    lines = result.stdout.splitlines()
    assert len(lines) == len(sample_records())
    assert orjson.loads(lines[0])["class_uid"] == 1001
    assert "'written': 13" in result.stderr.decode()


def test_jsonl_to_dev_null_and_to_a_fifo(tmp_path):
    """Not regular files: nothing to roll back or fsync, and writing must still work."""
    records = sample_records()
    null = JsonlSink("/dev/null")
    null.write(records)
    assert null.close() == {**null.stats.as_dict(), "written": len(records), "errors": 0}
    fifo = tmp_path / "records.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    sink = JsonlSink(fifo)
    sink.write(records)
    assert sink.close()["written"] == len(records)
    out, _ = reader.communicate(timeout=30)
    assert [orjson.loads(line)["metadata"]["uid"] for line in out.splitlines()] == \
        [r["event_uid"] for r in records]


def test_jsonl_full_disk_keeps_whole_lines(small_tmpfs):
    path = small_tmpfs / "out.jsonl"
    sink = JsonlSink(path, format="raw")
    written = 0
    with pytest.raises(SinkError, match="No space left on device.*records not written"):
        for session in range(10_000):
            records = syscall_records("vm-j", 100, session=session)
            sink.write(records)
            written += len(records)
    stats = sink.close()
    assert stats["written"] == written and stats["dropped"] == 100
    lines = path.read_bytes().splitlines()
    assert len(lines) == written  # no torn line: the failed write was cut back
    assert orjson.loads(lines[-1])["seq"] == 99


def test_open_sink_errors():
    for spec, message in [
        ("parquet", "expected parquet:DIR"),
        ("nosuch:/x", "unknown sink kind 'nosuch'"),
        ("kafka:localhost/topic", "is not HOST:PORT"),
        ("kafka:localhost:9092", "expected kafka:HOST:PORT"),
        ("kafka:localhost:9092/a/b", "expected kafka:HOST:PORT"),
        ("parquet:/tmp/x?batch_rows=many", "batch_rows='many' is not a valid int"),
        ("parquet:/tmp/x?colour=red", "unknown option 'colour'"),
        ("parquet:/tmp/x?batch_rows=1&batch_rows=2", "given twice"),
        ("jsonl:/tmp/x?format=xml", "unknown format 'xml'"),
        ("kafka:localhost:1/t?sasl_colour=red", "unknown option"),
        ("kafka:localhost:1/t?ssl_check_hostname=maybe", "not a valid bool"),
    ]:
        with pytest.raises(SinkError, match=message):
            open_sink(spec)


def test_kafka_spec_options_reach_the_sink(tmp_path):
    """Parsed and typed options (no broker listens on port 1: the sink spills)."""
    spec = (f"kafka:127.0.0.1:1/topic?spill_dir={tmp_path}&queue_records=10&compression=lz4"
            "&max_block_ms=200&security_protocol=SASL_SSL&ssl_cafile=/etc/ca.pem"
            "&ssl_check_hostname=false&sasl_mechanism=SCRAM-SHA-512"
            "&sasl_plain_username=u&sasl_plain_password=p%26w")
    sink = open_sink(spec)
    config = sink._producer_config
    assert sink.queue_records == 10 and sink.topic == "topic"
    assert config["compression_type"] == "lz4" and config["max_block_ms"] == 200
    assert config["security_protocol"] == "SASL_SSL" and config["ssl_cafile"] == "/etc/ca.pem"
    assert config["ssl_check_hostname"] is False
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_password"] == "p&w"
    assert config["enable_idempotence"] is True and config["acks"] == "all"
    sink.write(syscall_records("vm-k", 3))
    stats = sink.close(timeout=1)
    assert stats["spilled"] == 3 and stats["spill_pending"] == 3


def test_fanout_writes_everywhere_and_survives_one_failure(tmp_path, small_tmpfs):
    fan = open_sinks([f"parquet:{tmp_path}/pq?batch_seconds=0&file_seconds=0",
                      f"jsonl:{tmp_path}/a.jsonl", f"jsonl:{small_tmpfs}/full.jsonl?format=raw"])
    assert isinstance(fan, FanoutSink)
    records = syscall_records("vm-f", 100)
    fan.write(records)
    with pytest.raises(RecordError):
        fan.write([dict(records[0], pid=None, vcpu="x")])
    (small_tmpfs / "filler").write_bytes(b"\0" * 900_000)  # fill the small disk up
    with pytest.raises(SinkError, match="full.jsonl.*No space left"):
        for session in range(1, 200):
            fan.write(syscall_records("vm-f", 100, session=session))
    failed_at = session
    stats = fan.close()
    assert stats[f"jsonl:{tmp_path}/a.jsonl"]["written"] == failed_at * 100 + 100
    parquet_stats = next(v for k, v in stats.items() if k.startswith("parquet:"))
    assert parquet_stats["written"] == failed_at * 100 + 100
    assert len(fan.errors) == 1

