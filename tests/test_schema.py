"""Schema v1: validation, round trip, classification, and docs/schema.md in step with it."""

import datetime as dt
import re
from pathlib import Path

import pyarrow as pa
import pytest

from sinks import schema
from sinks.schema import (COLUMNS, SCHEMA, SCHEMA_VERSION, RecordError, RecordFactory,
                          batch_to_records, classify, make_process_uid, records_to_batch)

T0 = 1_763_000_000_123_456_789
DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"


def sample_records() -> list[dict]:
    """One record of every kind, filled the way monitors fill them."""
    f = RecordFactory("0f1e2d3c-0000-4000-8000-000000000001", "lab", "observer-1", T0)
    puid = make_process_uid(f.vm_id, 42, 123456)
    common = dict(vcpu=1, pid=42, tid=42, cr3=0x1234000, process_uid=puid)
    return [
        f.new("syscall", "call", T0 + 1, action="openat", syscall_nr=257, ppid=1, uid=0, gid=0,
              comm="cat", exe="/bin/cat", args=[0xFFFFFF9C, 0x7FFC0000, 0, 0], ret=-2,
              errno="ENOENT", path="/nonexistent", fd=-100, flags="O_RDONLY", mode=0,
              decoded_args=[{"name": "dfd", "type": "int", "value": "AT_FDCWD",
                             "truncated": False, "error": None},
                            {"name": "filename", "type": "const char *",
                             "value": "/nonexistent", "truncated": False, "error": None}],
              rip=0x401000, task_start_ns=123456, **common),
        f.new("syscall", "call", T0 + 2, action="connect", syscall_nr=42, args=[3, 0x7FFC0010, 16],
              ret=0, fd=3, family="AF_INET", remote_addr="10.0.2.2", remote_port=8080, **common),
        f.new("syscall", "call", T0 + 3, action="mmap", syscall_nr=9, ret=0x7F0000000000,
              addr=0, length=4096, prot="PROT_READ|PROT_WRITE", flags="MAP_PRIVATE|MAP_ANONYMOUS",
              **common),
        f.new("syscall", "call", T0 + 4, action="getpid", syscall_nr=39, args=[], ret=42, **common),
        f.new("syscall", "enter", T0 + 5, action="exit_group", syscall_nr=231, args=[0], **common),
        f.new("process", "exec", T0 + 6, action="execve", path="/bin/ls", exe="/bin/ls",
              argv=["ls", "-l", "/"], cmdline="ls -l /", ppid=1, parent_process_uid="x/1/0",
              comm="ls", **common),
        f.new("process", "start", T0 + 7, action="clone", ppid=1, parent_process_uid="x/1/0",
              **common),
        f.new("process", "exit", T0 + 8, action="exit_group", exit_code=3, **common),
        f.new("integrity", "changed", T0 + 9, target="msr:LSTAR", reg_name="LSTAR",
              old_value=0xFFFFFFFF81000000, new_value=0xFFFFFFFFC0000000, detail="module", vcpu=0),
        f.new("hypercall", "hypercall", T0 + 10, hypercall_nr=9, args=[1, 2, 3, 4], rip=0xFFFF1,
              **common),
        f.new("hv_event", "cr", T0 + 11, action="cr", reg_nr=3, reg_name="cr3", old_value=1,
              new_value=2, **common),
        f.new("hv_event", "breakpoint", T0 + 12, action="breakpoint", gpa=0x1000,
              gva=0xFFFFFFFF81001000, extra={"insn_len": "1"}, **common),
        f.loss("collector.events_lost", 7, T0, T0 + 13),
    ]


def test_every_kind_round_trips():
    records = sample_records()
    batch = records_to_batch(records)
    assert batch.schema.equals(SCHEMA, check_metadata=True)
    assert batch.schema.metadata[b"vmitrace.schema_version"] == SCHEMA_VERSION.encode()
    assert batch_to_records(batch) == records
    assert batch.column("time")[0].value == T0 + 1
    assert str(batch.column("time").type) == "timestamp[ns, tz=UTC]"
    assert set(batch.column("kind").to_pylist()) == set(schema.KINDS)


def test_factory_fills_common_fields():
    records = sample_records()
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert len({r["event_uid"] for r in records}) == len(records)
    for r in records:
        assert r["type_uid"] == r["class_uid"] * 100 + r["activity_id"]
        assert r["vm_name"] == "lab" and r["observer_host"] == "observer-1"
    again = sample_records()  # same session start -> same ids (deterministic replay)
    assert [r["event_uid"] for r in again] == [r["event_uid"] for r in records]


def test_datetime_times_accepted():
    r = sample_records()[3]
    r["time"] = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc)
    batch = records_to_batch([r])
    assert batch.column("time").cast(pa.int64())[0].as_py() == 1767323045000006000


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown column(s) ['bogus']"),
    ({"pid": "42"}, "column 'pid' expects int32, got str"),
    ({"seq": -1}, "column 'seq' expects uint64"),
    ({"ret": 2 ** 64}, "column 'ret' expects int64"),
    ({"args": [1, "2"]}, "column 'args' expects list<item: uint64>"),
    ({"path": b"/x"}, "column 'path' expects string, got bytes"),
    ({"uid": 1.5}, "column 'uid' expects int64, got float"),
    ({"vcpu": True}, "column 'vcpu' expects int32, got bool"),
    ({"kind": "nope"}, "kind 'nope' is not one of"),
    ({"vm_id": None}, "required column 'vm_id' is null"),
])
def test_bad_records_rejected_clearly(change, message):
    good = sample_records()
    bad = dict(good[0], **change)
    with pytest.raises(RecordError) as info:
        records_to_batch([good[1], good[2], bad])
    assert "record 2" in str(info.value)
    assert message in str(info.value)


def test_missing_required_and_non_dict():
    r = sample_records()[0]
    del r["event_uid"]
    with pytest.raises(RecordError, match=r"required column\(s\) \[.event_uid.\] missing"):
        records_to_batch([r])
    with pytest.raises(RecordError, match="record 1: records must be dicts"):
        records_to_batch([sample_records()[0], [("pid", 1)]])


def test_factory_rejects_bad_fields():
    f = RecordFactory("vm")
    with pytest.raises(RecordError, match="unknown column"):
        f.new("syscall", "call", T0, syscal_nr=1)
    with pytest.raises(RecordError, match="not valid for kind 'process'"):
        f.new("process", "call", T0)


def test_classification():
    assert classify("syscall", "call", "read") == (1003, 4, 1)
    assert classify("syscall", "call", "openat") == (1001, 14, 1)
    assert classify("syscall", "call", "unlinkat") == (1001, 4, 1)
    assert classify("syscall", "call", "connect", "ECONNREFUSED") == (4001, 5, 1)
    assert classify("syscall", "call", "connect", "ENETUNREACH") == (4001, 4, 1)
    assert classify("syscall", "call", "mprotect") == (1004, 2, 1)
    assert classify("process", "exit") == (1007, 2, 1)
    assert classify("process", "snapshot") == (1007, 99, 1)  # no launch was seen
    assert classify("integrity", "changed")[2] == 4


def test_docs_describe_every_column_with_its_type():
    text = DOC.read_text()
    text = text[text.index("\n## Columns"):]
    text = text[:text.index("\n## ", 1)]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+(?:\\\|[^|]+)*) \|", text, re.M))
    for field in SCHEMA:
        assert field.name in rows, f"docs/schema.md lacks column {field.name}"
        documented = rows[field.name].strip().replace(" ", "")
        actual = str(field.type).replace(" ", "").replace("item:", "")
        actual = actual.replace("timestamp[ns,tz=UTC]", "timestamp[ns,UTC]")
        actual = actual.replace("map<string,string>", "map<string,string>")
        actual = actual.replace("bool", "bool").replace("entries:", "")
        assert documented == actual, (field.name, documented, actual)
    assert set(rows) <= set(COLUMNS) | set(schema.KINDS)
