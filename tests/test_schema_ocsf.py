"""OCSF and ECS renderings, validated against the real OCSF 1.5.0 schema shipped by the
ocsf-json-schema package (offline JSON Schema generation from the OCSF schema export)."""

from __future__ import annotations

import functools

import jsonschema
import orjson
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from sinks.ecs import to_ecs, to_ecs_json
from sinks.ocsf import OCSF_VERSION, to_ocsf, to_ocsf_json
from sinks.schema import RecordFactory, classify
from test_schema import T0, sample_records


@functools.cache
def _ocsf() -> OcsfJsonSchemaEmbedded:
    return OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION))


@functools.cache
def _validator(class_uid: int, profiles: tuple[str, ...]) -> jsonschema.Draft202012Validator:
    ocsf = _ocsf()
    name = ocsf.lookup_class_name_from_uid(class_uid=class_uid)
    schema = ocsf.get_class_schema(class_name=name, profiles=list(profiles))
    return jsonschema.Draft202012Validator(schema)


def ocsf_errors(event: dict) -> list[str]:
    """Violations of the OCSF schema of the event's class (with its declared profiles)."""
    profiles = tuple(event.get("metadata", {}).get("profiles", ()))
    validator = _validator(event["class_uid"], profiles)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(event)]


def every_class_records() -> list[dict]:
    """Records covering every OCSF class and activity the renderer emits."""
    f = RecordFactory("vm-ocsf", "lab", "obs", T0)
    base = dict(vcpu=0, pid=7, tid=8, process_uid="vm-ocsf/7/1", comm="sh", uid=0)
    records = sample_records()
    for action, extra in [
        ("openat", dict(path="/etc/passwd", flags="O_RDONLY", ret=3)),
        ("unlinkat", dict(path="/tmp/x", ret=0)),
        ("renameat2", dict(path="/a", target_path="/b", ret=0)),
        ("mkdir", dict(path="/d/", mode=0o755, ret=0)),
        ("newfstatat", dict(path="", ret=-2, errno="ENOENT")),
        ("fchmodat", dict(path="/x", mode=0o644, ret=0)),
        ("mount", dict(path="/mnt", ret=-1, errno="EPERM")),
        ("umount2", dict(path="/mnt", ret=0)),
        ("truncate", dict(path="/x", length=0, ret=0)),
        ("connect", dict(family="AF_INET6", remote_addr="::1", remote_port=22, ret=-111,
                         errno="ECONNREFUSED")),
        ("connect", dict(family="AF_UNIX", remote_addr="/run/sock", ret=-2, errno="ENOENT")),
        ("accept4", dict(family="AF_INET", remote_addr="10.0.0.1", remote_port=40000, ret=4)),
        ("listen", dict(fd=3, ret=0)),
        ("shutdown", dict(fd=3, ret=0)),
        ("mprotect", dict(addr=0x7F0000000000, length=4096, prot="PROT_READ", ret=0)),
        ("munmap", dict(addr=0xFFFFFFFFFFFFF000, length=2**64 - 1, ret=-22, errno="EINVAL")),
        ("process_vm_readv", dict(target_pid=1, ret=10)),
        ("process_vm_writev", dict(target_pid=1, ret=10)),
        ("kill", dict(target_pid=1, signal="SIGTERM", ret=0)),
    ]:
        records.append(f.new("syscall", "call", T0, action=action, **base, **extra))
    records.append(f.new("syscall", "call", T0, syscall_nr=450, ret=-38, errno="ENOSYS"))
    records.append(f.new("process", "start", T0, ppid=1, parent_process_uid="vm-ocsf/1/0"))
    records.append(f.new("process", "exit", T0, exit_code=0, **base))
    records.append(f.new("process", "snapshot", T0, action="snapshot", ppid=1, argv=["sh"],
                         parent_process_uid="vm-ocsf/1/0", **base))
    records.append(f.new("hv_event", "msr", T0, reg_nr=0xC0000082, reg_name="LSTAR",
                         old_value=0, new_value=2**64 - 1, **base))
    records.append(f.new("hypercall", "hypercall", T0, hypercall_nr=2**64 - 1))
    records.append(f.loss("kafka.dropped", 12, T0 - 10**9, T0))
    return records


def test_every_rendered_class_validates_against_ocsf_schema():
    seen = set()
    for record in every_class_records():
        event = to_ocsf(record)
        assert ocsf_errors(event) == [], (record, event)
        seen.add((event["class_uid"], event["activity_id"]))
        # JSON bytes parse back to the same event
        assert orjson.loads(to_ocsf_json(record)) == event
    assert {c for c, _ in seen} == {0, 1001, 1003, 1004, 1007, 4001}
    assert {(1001, a) for a in (1, 3, 4, 5, 6, 8, 12, 13, 14)} <= seen
    assert {(4001, a) for a in (1, 2, 4, 5, 7)} <= seen
    assert {(1004, a) for a in (1, 2, 3, 7, 8)} <= seen
    assert {(1007, 1), (1007, 2), (1007, 99), (1003, 4), (1003, 99)} <= seen


def test_process_snapshot_rendering():
    snapshot = next(r for r in every_class_records() if r["event_type"] == "snapshot")
    event = to_ocsf(snapshot)
    assert (event["class_uid"], event["activity_id"], event["type_uid"]) == (1007, 99, 100799)
    assert event["activity_name"] == "Snapshot"  # OCSF: 99 Other names the source's activity
    assert event["process"]["pid"] == 7 and event["actor"]["process"]["pid"] == 1
    assert to_ecs(snapshot)["event"]["type"] == ["info"]


def test_ocsf_mapping_details():
    records = {(r["kind"], r.get("action"), r["event_type"]): r for r in sample_records()}
    openat = to_ocsf(records[("syscall", "openat", "call")])
    assert openat["class_uid"] == 1001 and openat["type_uid"] == 100114
    assert openat["time"] == (T0 + 1) // 1_000_000
    assert openat["unmapped"]["time_ns"] == T0 + 1
    assert openat["device"] == {"type_id": 6, "type": "Virtual", "hypervisor": "KVM",
                                "instance_uid": "0f1e2d3c-0000-4000-8000-000000000001",
                                "name": "lab"}
    assert openat["file"]["path"] == "/nonexistent" and openat["file"]["name"] == "nonexistent"
    assert openat["status_id"] == 2 and openat["status_code"] == "ENOENT"
    assert openat["actor"]["process"]["uid"] == "0f1e2d3c-0000-4000-8000-000000000001/42/123456"
    assert openat["unmapped"]["args"] == ["0xffffff9c", "0x7ffc0000", "0x0", "0x0"]
    assert openat["unmapped"]["decoded_args"][1]["value"] == "/nonexistent"

    getpid = to_ocsf(records[("syscall", "getpid", "call")])
    assert getpid["class_uid"] == 1003 and getpid["activity_id"] == 4
    assert getpid["kernel"] == {"name": "getpid", "type_id": 2, "type": "System Call",
                                "system_call": "getpid"}
    assert getpid["status_id"] == 1

    connect = to_ocsf(records[("syscall", "connect", "call")])
    assert connect["dst_endpoint"] == {"ip": "10.0.2.2", "port": 8080}
    assert connect["metadata"]["profiles"] == ["host"]

    execve = to_ocsf(records[("process", "execve", "exec")])
    assert execve["class_uid"] == 1007 and execve["activity_id"] == 1
    assert execve["process"]["cmd_line"] == "ls -l /"
    assert execve["actor"]["process"] == {"pid": 1, "uid": "x/1/0"}  # the parent acts
    assert execve["unmapped"]["argv"] == ["ls", "-l", "/"]

    integrity = to_ocsf(records[("integrity", None, "changed")])
    assert integrity["severity_id"] == 4 and integrity["kernel"]["name"] == "msr:LSTAR"
    assert integrity["unmapped"]["new_value"] == "0xffffffffc0000000"

    loss = to_ocsf(records[("loss", None, "counter")])
    assert loss["class_uid"] == 0 and loss["count"] == 7
    assert loss["start_time"] == T0 // 1_000_000 and loss["unmapped"]["counter"] == \
        "collector.events_lost"


def test_missing_classification_is_computed():
    record = dict(sample_records()[0])
    for name in ("class_uid", "activity_id", "severity_id", "type_uid"):
        del record[name]
    event = to_ocsf(record)
    assert (event["class_uid"], event["activity_id"], event["severity_id"]) == \
        classify("syscall", "call", "openat", "ENOENT")
    assert ocsf_errors(event) == []


def test_ecs_rendering():
    records = every_class_records()
    for record in records:
        doc = to_ecs(record)
        assert orjson.loads(to_ecs_json(record)) == doc
        assert doc["@timestamp"].endswith("Z") and len(doc["@timestamp"]) == 30
        assert doc["host"]["id"] == record["vm_id"] and doc["host"]["type"] == "vm"
        assert doc["event"]["id"] == record["event_uid"]
        assert doc["vmitrace"]["time_ns"] == record["time"]
    openat = to_ecs(records[0])
    assert openat["@timestamp"] == "2025-11-13T02:13:20.123456790Z"
    assert openat["event"]["category"] == ["file"] and openat["event"]["outcome"] == "failure"
    assert openat["file"]["path"] == "/nonexistent"
    assert openat["process"]["entity_id"].endswith("/42/123456")
    assert openat["user"] == {"id": "0", "group": {"id": "0"}}
    connect = to_ecs(records[1])
    assert connect["destination"] == {"address": "10.0.2.2", "port": 8080}
    execve = to_ecs(records[5])
    assert execve["process"]["args"] == ["ls", "-l", "/"]
    assert execve["event"]["type"] == ["start", "change"]
    integrity = to_ecs(records[8])
    assert integrity["event"]["kind"] == "alert"
    assert integrity["vmitrace"]["old_value"] == "0xffffffff81000000"


@pytest.mark.parametrize("bad", [{"type_id": 1}, {"name": "x"}])
def test_validator_catches_bad_events(bad):
    """The oracle can fail: a kernel object missing a required field is reported."""
    event = to_ocsf(sample_records()[3])
    event["kernel"] = bad
    assert ocsf_errors(event)
