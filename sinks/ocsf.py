"""OCSF 1.5.0 JSON rendering of schema v1 records.

Classes: Kernel Activity 1003 (syscalls in general, kernel.type_id 2 System Call; also
hypercalls, integrity changes and raw hypervisor events with kernel.type_id 99 Other), File
System Activity 1001, Network Activity 4001, Memory Activity 1004, Process Activity 1007
(process start/exec/exit; 99 Other, activity_name "Snapshot", for processes already running
at attach), Base Event 0 (loss counters). Network Activity events declare the
"host" profile (metadata.profiles), which gives them `device` and `actor`. The classification is the record's
own (class_uid/activity_id, see sinks.schema.classify). OCSF `time` is milliseconds; the
nanoseconds stay in `unmapped.time_ns`. Every column without an OCSF home is kept in
`unmapped` under its schema name, 64-bit registers and addresses as "0x..." strings (JSON
consumers often hold numbers as doubles).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

import orjson

from sinks.schema import SCHEMA_VERSION, classify

OCSF_VERSION = "1.5.0"
PRODUCT = {"name": "vmitrace", "vendor_name": "vmitrace", "version": "0.1.0"}

CLASS_NAMES = {0: "Base Event", 1001: "File System Activity", 1003: "Kernel Activity",
               1004: "Memory Activity", 1007: "Process Activity", 4001: "Network Activity"}
CATEGORY_NAMES = {0: "Uncategorized", 1: "System Activity", 4: "Network Activity"}
ACTIVITY_NAMES = {
    1001: {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 5: "Rename", 6: "Set Attributes",
           7: "Set Security", 8: "Get Attributes", 9: "Get Security", 12: "Mount",
           13: "Unmount", 14: "Open"},
    1003: {1: "Create", 2: "Read", 3: "Delete", 4: "Invoke"},
    1004: {1: "Allocate Page", 2: "Modify Page", 3: "Delete Page", 7: "Read", 8: "Write",
           9: "Map View"},
    1007: {1: "Launch", 2: "Terminate", 3: "Open", 4: "Inject", 5: "Set User ID"},
    4001: {1: "Open", 2: "Close", 3: "Reset", 4: "Fail", 5: "Refuse", 6: "Traffic",
           7: "Listen"},
}
# activity_name of 99 Other, which OCSF leaves to the data source: (kind, event_type) -> name
OTHER_ACTIVITY_NAMES = {("process", "snapshot"): "Snapshot"}
SEVERITY_NAMES = {0: "Unknown", 1: "Informational", 2: "Low", 3: "Medium", 4: "High",
                  5: "Critical", 6: "Fatal", 99: "Other"}

# Columns rendered as hex strings in `unmapped`.
_HEX_COLUMNS = frozenset({"cr3", "rip", "old_value", "new_value", "gpa", "gva", "addr",
                          "hypercall_nr"})
# Columns that always have an OCSF home (never repeated in `unmapped`).
_MAPPED = frozenset({"event_uid", "time", "seq", "vm_id", "vm_name", "class_uid",
                     "activity_id", "severity_id", "type_uid", "message", "pid", "tid",
                     "process_uid", "comm", "exe", "cmdline", "uid", "ppid",
                     "parent_process_uid", "errno", "ret", "action"})
_DEVICE_TYPE_VIRTUAL = 6
_KERNEL_SYSCALL = 2
_KERNEL_OTHER = 99
_FILE_UNKNOWN = 0
_LOG_NAME = f"vmitrace-v{SCHEMA_VERSION}"


@functools.lru_cache(maxsize=1024)
def _classification(class_uid: int, activity_id: int, severity_id: int) -> dict[str, Any]:
    """The classification attributes of an event, with their captions."""
    category_uid = class_uid // 1000
    return {
        "class_uid": class_uid,
        "class_name": CLASS_NAMES.get(class_uid, "Other"),
        "category_uid": category_uid,
        "category_name": CATEGORY_NAMES.get(category_uid, "Other"),
        "activity_id": activity_id,
        "activity_name": ACTIVITY_NAMES.get(class_uid, {}).get(activity_id, "Other"),
        "type_uid": class_uid * 100 + activity_id,
        "severity_id": severity_id,
        "severity": SEVERITY_NAMES.get(severity_id, "Other"),
    }


def to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    """One schema v1 record as an OCSF 1.5.0 event (a JSON-ready dict)."""
    r = record
    class_uid = r.get("class_uid")
    activity_id = r.get("activity_id")
    severity_id = r.get("severity_id")
    if class_uid is None or activity_id is None or severity_id is None:
        class_uid, activity_id, severity_id = classify(r["kind"], r["event_type"],
                                                       r.get("action"), r.get("errno"))
    time_ns = r["time"]
    event: dict[str, Any] = _classification(class_uid, activity_id, severity_id).copy()
    if activity_id == 99:
        event["activity_name"] = OTHER_ACTIVITY_NAMES.get((r["kind"], r["event_type"]),
                                                          event["activity_name"])
    event["time"] = time_ns // 1_000_000
    event["metadata"] = {"version": OCSF_VERSION, "product": PRODUCT, "uid": r["event_uid"],
                         "sequence": r["seq"], "log_name": _LOG_NAME}
    unmapped: dict[str, Any] = {"time_ns": time_ns, "kind": r["kind"],
                                "event_type": r["event_type"]}
    if r.get("message") is not None:
        event["message"] = r["message"]
    if class_uid != 0:
        device: dict[str, Any] = {"type_id": _DEVICE_TYPE_VIRTUAL, "type": "Virtual",
                                  "hypervisor": "KVM", "instance_uid": r["vm_id"]}
        if r.get("vm_name") is not None:
            device["name"] = r["vm_name"]
        event["device"] = device
    else:
        unmapped["vm_id"] = r["vm_id"]
        if r.get("vm_name") is not None:
            unmapped["vm_name"] = r["vm_name"]

    process = _process(r)
    used: set[str] = set()
    if class_uid == 1007:
        event["process"] = process or {"pid": -1}
        event["actor"] = {"process": _parent(r) or process or {"pid": -1}}
    elif class_uid in (1001, 1003, 1004):
        event["actor"] = {"process": process or {"pid": -1}}
        if class_uid == 1004:
            event["process"] = process or {"pid": -1}
    elif class_uid == 4001:
        # actor and device belong to the "host" profile in Network Activity
        event["metadata"]["profiles"] = ["host"]
        if process:
            event["actor"] = {"process": process}

    if class_uid == 1003:
        event["kernel"] = _kernel(r)
    elif class_uid == 1001:
        event["file"] = _file(r.get("path") or "")
        used.add("path")
        if r.get("target_path") is not None:
            event["file_result"] = _file(r["target_path"])
            used.add("target_path")
    elif class_uid == 1004:
        if r.get("addr") is not None:
            event["base_address"] = hex(r["addr"])
        if r.get("length") is not None and r["length"] < 1 << 63:
            event["size"] = r["length"]
            used.add("length")
    elif class_uid == 4001:
        # The VM is one end (instance_uid); the peer is the other. The initiator is the
        # source: the VM for connect, the peer for accept.
        local = {"instance_uid": r["vm_id"], **_endpoint(r.get("local_addr"), r.get("local_port"))}
        remote = _endpoint(r.get("remote_addr"), r.get("remote_port"))
        used.update(("local_addr", "local_port", "remote_addr", "remote_port"))
        if r.get("action") in ("accept", "accept4") and remote:
            event["src_endpoint"], event["dst_endpoint"] = remote, local
        else:
            event["src_endpoint"] = local
            if remote:
                event["dst_endpoint"] = remote
    elif class_uid == 0 and r["kind"] == "loss":
        event["count"] = r.get("count", 0)
        event["end_time"] = time_ns // 1_000_000
        if r.get("interval_start") is not None:
            event["start_time"] = r["interval_start"] // 1_000_000
        event.setdefault("message", f"{r.get('count', 0)} records lost: {r.get('counter')}")

    if r["kind"] == "syscall" and r["event_type"] == "call":
        failed = r.get("errno") is not None
        event["status_id"] = 2 if failed else 1
        event["status"] = "Failure" if failed else "Success"
        if failed:
            event["status_code"] = r["errno"]
    if r.get("action") is not None:
        unmapped["action"] = r["action"]
    if r.get("ret") is not None:
        unmapped["ret"] = r["ret"]
    if r.get("errno") is not None:
        unmapped["errno"] = r["errno"]

    for name, value in r.items():
        if value is None or name in _MAPPED or name in used or name in unmapped:
            continue
        if name in _HEX_COLUMNS:
            value = hex(value)
        elif name == "args":
            value = [hex(v) for v in value]
        unmapped[name] = value
    event["unmapped"] = unmapped
    return event


def to_ocsf_json(record: dict[str, Any]) -> bytes:
    """The rendering as compact UTF-8 JSON bytes."""
    return orjson.dumps(to_ocsf(record))


def _process(r: dict[str, Any]) -> dict[str, Any] | None:
    if r.get("pid") is None and r.get("process_uid") is None:
        return None
    process: dict[str, Any] = {}
    if r.get("pid") is not None:
        process["pid"] = r["pid"]
    if r.get("tid") is not None:
        process["tid"] = r["tid"]
    if r.get("process_uid") is not None:
        process["uid"] = r["process_uid"]
    if r.get("comm") is not None:
        process["name"] = r["comm"]
    if r.get("cmdline") is not None:
        process["cmd_line"] = r["cmdline"]
    if r.get("exe") is not None:
        process["file"] = _file(r["exe"])
    if r.get("uid") is not None:
        process["user"] = {"uid": str(r["uid"])}
    parent = _parent(r)
    if parent:
        process["parent_process"] = parent
    return process


def _parent(r: dict[str, Any]) -> dict[str, Any] | None:
    parent: dict[str, Any] = {}
    if r.get("ppid") is not None:
        parent["pid"] = r["ppid"]
    if r.get("parent_process_uid") is not None:
        parent["uid"] = r["parent_process_uid"]
    return parent or None


def _file(path: str) -> dict[str, Any]:
    name = path.rstrip("/").rsplit("/", 1)[-1] or path or "?"
    return {"path": path, "name": name, "type_id": _FILE_UNKNOWN}


def _kernel(r: dict[str, Any]) -> dict[str, Any]:
    kind = r["kind"]
    if kind == "syscall":
        name = r.get("action") or f"syscall_{r.get('syscall_nr', '?')}"
        return {"name": name, "type_id": _KERNEL_SYSCALL, "type": "System Call",
                "system_call": name}
    if kind == "hypercall":
        name = r.get("action") or f"hypercall_{r.get('hypercall_nr', '?')}"
    elif kind == "integrity":
        name = r.get("target") or "integrity"
    else:
        name = r.get("reg_name") or r.get("action") or r["event_type"]
    return {"name": name, "type_id": _KERNEL_OTHER, "type": kind}


def _endpoint(addr: str | None, port: int | None) -> dict[str, Any]:
    """An OCSF network endpoint: `ip` for an IP address, `name` for anything else (an
    AF_UNIX path)."""
    endpoint: dict[str, Any] = {}
    if addr is not None:
        try:
            endpoint["ip"] = str(ipaddress.ip_address(addr))
        except ValueError:
            endpoint["name"] = addr
    if port is not None:
        endpoint["port"] = port
    return endpoint
