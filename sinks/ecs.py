"""Elastic Common Schema (ECS 8.x) JSON rendering of schema v1 records.

The traced VM is the ECS `host` (type "vm"), the collector machine the `observer`. Fields
with an ECS home go there (process, user, file, source/destination, event); everything else
is kept under `vmitrace.*` with its schema name (64-bit registers as "0x..." strings).
"""

from __future__ import annotations

import datetime
from typing import Any

import orjson

from sinks.schema import SCHEMA_VERSION

ECS_VERSION = "8.11.0"

_CATEGORY = {1001: ["file"], 1003: ["host"], 1004: ["host"], 1007: ["process"],
             4001: ["network"], 0: []}
_PROCESS_TYPES = {"start": ["start"], "exec": ["start", "change"], "exit": ["end"],
                  "snapshot": ["info"]}
_FILE_TYPES = {1: ["creation"], 3: ["change"], 4: ["deletion"], 5: ["change"],
               6: ["change"], 8: ["access"], 12: ["change"], 13: ["change"], 14: ["access"]}
_NETWORK_TYPES = {1: ["connection", "start"], 2: ["connection", "end"], 4: ["connection"],
                  5: ["connection", "denied"], 7: ["connection", "start"]}
_HEX = frozenset({"cr3", "rip", "old_value", "new_value", "gpa", "gva", "addr",
                  "hypercall_nr"})
_MAPPED = frozenset({"event_uid", "time", "seq", "vm_id", "vm_name", "observer_host",
                     "kind", "event_type", "action", "message", "pid", "tid", "ppid", "uid",
                     "gid", "process_uid", "parent_process_uid", "comm", "exe", "cmdline",
                     "argv", "path", "target_path", "remote_addr", "remote_port",
                     "local_addr", "local_port", "exit_code", "class_uid", "activity_id",
                     "severity_id", "type_uid"})


def _iso(time_ns: int) -> str:
    seconds, ns = divmod(time_ns, 1_000_000_000)
    base = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return base.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"


def to_ecs(record: dict[str, Any]) -> dict[str, Any]:
    """One schema v1 record as an ECS document (a JSON-ready dict)."""
    r = record
    class_uid = r.get("class_uid") or 0
    activity_id = r.get("activity_id") or 0
    kind = r["kind"]
    event: dict[str, Any] = {
        "kind": "metric" if kind == "loss" else "alert" if kind == "integrity" else "event",
        "category": _CATEGORY.get(class_uid, []),
        "action": r.get("action") or f"{kind}-{r['event_type']}",
        "id": r["event_uid"],
        "sequence": r["seq"],
        "dataset": f"vmitrace.{kind}",
        "module": "vmitrace",
        "severity": r.get("severity_id") or 0,
        "created": _iso(r["time"]),
    }
    if kind == "process":
        event["type"] = _PROCESS_TYPES.get(r["event_type"], ["info"])
    elif class_uid == 1001:
        event["type"] = _FILE_TYPES.get(activity_id, ["info"])
    elif class_uid == 4001:
        event["type"] = _NETWORK_TYPES.get(activity_id, ["info"])
    else:
        event["type"] = ["info"]
    if kind == "syscall" and r["event_type"] == "call":
        event["outcome"] = "failure" if r.get("errno") else "success"
    doc: dict[str, Any] = {
        "@timestamp": _iso(r["time"]),
        "ecs": {"version": ECS_VERSION},
        "event": event,
        "host": {"id": r["vm_id"], "type": "vm"},
        "labels": {"vmitrace_schema_version": SCHEMA_VERSION},
    }
    if r.get("vm_name") is not None:
        doc["host"]["name"] = r["vm_name"]
    if r.get("observer_host") is not None:
        doc["observer"] = {"hostname": r["observer_host"], "type": "hypervisor"}
    if r.get("message") is not None:
        doc["message"] = r["message"]
    process = _process(r)
    if process:
        doc["process"] = process
    if r.get("uid") is not None or r.get("gid") is not None:
        user: dict[str, Any] = {}
        if r.get("uid") is not None:
            user["id"] = str(r["uid"])
        if r.get("gid") is not None:
            user["group"] = {"id": str(r["gid"])}
        doc["user"] = user
    if r.get("path") is not None and kind == "syscall":
        doc["file"] = {"path": r["path"], "name": r["path"].rstrip("/").rsplit("/", 1)[-1]}
        if r.get("target_path") is not None:
            doc["file"]["target_path"] = r["target_path"]
    for prefix, side in (("remote", "destination"), ("local", "source")):
        if r.get(f"{prefix}_addr") is not None or r.get(f"{prefix}_port") is not None:
            endpoint: dict[str, Any] = {}
            if r.get(f"{prefix}_addr") is not None:
                endpoint["address"] = r[f"{prefix}_addr"]
            if r.get(f"{prefix}_port") is not None:
                endpoint["port"] = r[f"{prefix}_port"]
            doc[side] = endpoint
    extra: dict[str, Any] = {"kind": kind, "event_type": r["event_type"], "time_ns": r["time"]}
    for name in ("class_uid", "activity_id", "type_uid"):
        if r.get(name) is not None:
            extra[f"ocsf_{name}"] = r[name]
    for name, value in r.items():
        if value is None or name in _MAPPED:
            continue
        if name in _HEX:
            value = hex(value)
        elif name == "args":
            value = [hex(v) for v in value]
        extra[name] = value
    doc["vmitrace"] = extra
    return doc


def _process(r: dict[str, Any]) -> dict[str, Any] | None:
    process: dict[str, Any] = {}
    for column, field in (("pid", "pid"), ("comm", "name"), ("exe", "executable"),
                          ("cmdline", "command_line"), ("argv", "args"),
                          ("process_uid", "entity_id"), ("exit_code", "exit_code")):
        if r.get(column) is not None:
            process[field] = r[column]
    if r.get("tid") is not None:
        process["thread"] = {"id": r["tid"]}
    parent: dict[str, Any] = {}
    if r.get("ppid") is not None:
        parent["pid"] = r["ppid"]
    if r.get("parent_process_uid") is not None:
        parent["entity_id"] = r["parent_process_uid"]
    if parent:
        process["parent"] = parent
    return process or None


def to_ecs_json(record: dict[str, Any]) -> bytes:
    """The rendering as compact UTF-8 JSON bytes."""
    return orjson.dumps(to_ecs(record))