"""Schema v1: the one typed Arrow schema every vmitrace record conforms to.

Records travel between monitors and sinks as plain dicts keyed by column name; a missing key
means null. `records_to_batch` validates a list of them and builds an Arrow RecordBatch column
by column; OCSF and ECS JSON (sinks.ocsf, sinks.ecs) are renderings of the same dicts.
Every column is documented in docs/schema.md (a test keeps the two in step).

Monitors build records with `RecordFactory`, which fills the common fields (event_uid, seq,
VM identity, observer, OCSF classification).
"""

from __future__ import annotations

import datetime
import gc
import itertools
import operator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = "1"

# Record kinds (column `kind`) and the event types (column `event_type`) each one uses.
KIND_SYSCALL = "syscall"
KIND_PROCESS = "process"
KIND_INTEGRITY = "integrity"
KIND_HYPERCALL = "hypercall"
KIND_HV_EVENT = "hv_event"
KIND_LOSS = "loss"
KINDS: tuple[str, ...] = (KIND_SYSCALL, KIND_PROCESS, KIND_INTEGRITY, KIND_HYPERCALL,
                          KIND_HV_EVENT, KIND_LOSS)
EVENT_TYPES: dict[str, tuple[str, ...]] = {
    # "call": entry and return seen; "enter": entry only (exit, exit_group, execve that
    # replaced the image, or a trace that stopped first).
    KIND_SYSCALL: ("call", "enter"),
    # "snapshot": already running when tracing attached (its start was not seen)
    KIND_PROCESS: ("start", "exec", "exit", "snapshot"),
    KIND_INTEGRITY: ("changed", "restored"),
    KIND_HYPERCALL: ("hypercall",),
    KIND_HV_EVENT: ("cr", "msr", "xsetbv", "breakpoint", "pf", "trap", "descriptor",
                    "create_vcpu", "pause_vcpu", "singlestep", "cpuid", "unhook"),
    KIND_LOSS: ("counter",),
}

DECODED_ARG = pa.struct([
    pa.field("name", pa.string()),
    pa.field("type", pa.string()),
    pa.field("value", pa.string()),
    pa.field("truncated", pa.bool_()),
    pa.field("error", pa.string()),
])

TIMESTAMP = pa.timestamp("ns", tz="UTC")

# (name, type, nullable). Order is the column order of every file and batch.
_COLUMNS: list[tuple[str, pa.DataType, bool]] = [
    # identity and placement
    ("event_uid", pa.string(), False),
    ("time", TIMESTAMP, False),
    ("seq", pa.uint64(), False),
    ("vm_id", pa.string(), False),
    ("vm_name", pa.string(), True),
    ("observer_host", pa.string(), True),
    ("vcpu", pa.int32(), True),
    ("kind", pa.string(), False),
    ("event_type", pa.string(), False),
    # OCSF classification
    ("class_uid", pa.int32(), True),
    ("activity_id", pa.int32(), True),
    ("severity_id", pa.int32(), True),
    ("type_uid", pa.int64(), True),
    ("action", pa.string(), True),
    ("message", pa.string(), True),
    # process context
    ("pid", pa.int32(), True),
    ("tid", pa.int32(), True),
    ("ppid", pa.int32(), True),
    ("uid", pa.int64(), True),
    ("gid", pa.int64(), True),
    ("process_uid", pa.string(), True),
    ("task_start_ns", pa.uint64(), True),
    ("comm", pa.string(), True),
    ("exe", pa.string(), True),
    ("cmdline", pa.string(), True),
    ("argv", pa.list_(pa.string()), True),
    ("cr3", pa.uint64(), True),
    ("rip", pa.uint64(), True),
    # system call
    ("syscall_nr", pa.int32(), True),
    ("args", pa.list_(pa.uint64()), True),
    ("ret", pa.int64(), True),
    ("errno", pa.string(), True),
    ("decoded_args", pa.list_(DECODED_ARG), True),
    # typed copies of the common decoded arguments
    ("path", pa.string(), True),
    ("target_path", pa.string(), True),
    ("fd", pa.int32(), True),
    ("flags", pa.string(), True),
    ("mode", pa.uint32(), True),
    ("addr", pa.uint64(), True),
    ("length", pa.uint64(), True),
    ("prot", pa.string(), True),
    ("family", pa.string(), True),
    ("remote_addr", pa.string(), True),
    ("remote_port", pa.int32(), True),
    ("local_addr", pa.string(), True),
    ("local_port", pa.int32(), True),
    ("target_pid", pa.int32(), True),
    ("signal", pa.string(), True),
    # process lifecycle
    ("parent_process_uid", pa.string(), True),
    ("exit_code", pa.int32(), True),
    # integrity
    ("target", pa.string(), True),
    ("old_value", pa.uint64(), True),
    ("new_value", pa.uint64(), True),
    ("detail", pa.string(), True),
    # hypercall and raw hypervisor events
    ("hypercall_nr", pa.uint64(), True),
    ("reg_nr", pa.uint32(), True),
    ("reg_name", pa.string(), True),
    ("gpa", pa.uint64(), True),
    ("gva", pa.uint64(), True),
    # loss counters
    ("counter", pa.string(), True),
    ("count", pa.uint64(), True),
    ("interval_start", TIMESTAMP, True),
    # anything else a monitor wants to keep, as text
    ("extra", pa.map_(pa.string(), pa.string()), True),
]

SCHEMA: pa.Schema = pa.schema(
    [pa.field(name, dtype, nullable=nullable) for name, dtype, nullable in _COLUMNS],
    metadata={b"vmitrace.schema_version": SCHEMA_VERSION.encode()},
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
REQUIRED: tuple[str, ...] = tuple(name for name, _, nullable in _COLUMNS if not nullable)
_COLUMN_SET = frozenset(COLUMNS)
_KIND_SET = pa.array(KINDS)

# Low-cardinality strings: Parquet dictionary-encodes these.
DICTIONARY_COLUMNS: tuple[str, ...] = (
    "vm_id", "vm_name", "observer_host", "kind", "event_type", "action", "errno", "comm",
    "exe", "flags", "prot", "family", "signal", "reg_name", "counter", "target",
)


_get = dict.get


def _python_types(dtype: pa.DataType) -> frozenset[type]:
    """The Python types a column of `dtype` accepts at its top level (None always)."""
    if pa.types.is_timestamp(dtype):
        return frozenset({type(None), int, datetime.datetime})
    if pa.types.is_integer(dtype):
        return frozenset({type(None), int})
    if pa.types.is_string(dtype):
        return frozenset({type(None), str})
    if pa.types.is_boolean(dtype):
        return frozenset({type(None), bool})
    if pa.types.is_map(dtype):
        return frozenset({type(None), dict})
    return frozenset({type(None), list, tuple})


_ALLOWED_TYPES = {field.name: _python_types(field.type) for field in SCHEMA}


class RecordError(ValueError):
    """A record does not conform to schema v1."""


def records_to_batch(records: list[dict[str, Any]]) -> pa.RecordBatch:
    """Validate records (plain dicts) and build one RecordBatch of SCHEMA, column by column.

    `time` and `interval_start` accept int nanoseconds since the epoch (UTC) or aware
    datetimes. Raises RecordError naming the column and the first offending record for an
    unknown key, a value of the wrong Python type (no silent float->int or bytes->string
    conversion), a missing required field or an unknown kind.
    """
    count = len(records)
    if set(map(type, records)) - {dict}:
        index = next(i for i, r in enumerate(records) if type(r) is not dict)
        raise RecordError(f"record {index}: records must be dicts, "
                          f"got {type(records[index]).__name__}")
    present: set[str] = set().union(*records) if records else set()
    unknown = present - _COLUMN_SET
    if unknown:
        name = sorted(unknown)[0]
        index = next(i for i, r in enumerate(records) if name in r)
        raise RecordError(f"record {index}: unknown column(s) {sorted(unknown)}")
    missing = [name for name in REQUIRED if name not in present]
    if missing:
        raise RecordError(f"record 0: required column(s) {missing} missing")
    names = [name for name in COLUMNS if name in present]
    by_name = dict(zip(names, _transpose(records, names)))
    arrays = []
    for field in SCHEMA:
        name = field.name
        if name not in by_name:
            arrays.append(pa.nulls(count, field.type))
            continue
        values = by_name[name]
        allowed = _ALLOWED_TYPES[name]
        if not set(map(type, values)) <= allowed:
            index = next(i for i, v in enumerate(values) if type(v) not in allowed)
            raise RecordError(f"record {index}: column {name!r} expects {field.type}, "
                              f"got {type(values[index]).__name__} {values[index]!r:.80}")
        try:
            array = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            raise RecordError(_explain(name, field.type, values, exc)) from None
        if not field.nullable and array.null_count:
            index = next(i for i, v in enumerate(values) if v is None)
            raise RecordError(f"record {index}: required column {name!r} is null")
        arrays.append(array)
    kinds = arrays[COLUMNS.index("kind")]
    if not pc.all(pc.is_in(kinds, value_set=_KIND_SET)).as_py():
        bad = next(i for i, k in enumerate(kinds.to_pylist()) if k not in KINDS)
        raise RecordError(f"record {bad}: kind {records[bad]['kind']!r} is not one of {KINDS}")
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def _transpose(records: list[dict[str, Any]], names: list[str]) -> list[tuple[Any, ...]]:
    """Rows to columns. Reading each record's values in one go keeps its hash table in cache
    (column-at-a-time access misses the cache once per value), and the cyclic GC is paused
    because the many small tuples made here would trigger full collections over the records;
    nothing made here can form a cycle."""
    if len(names) == 1:
        return [tuple(map(_get, records, itertools.repeat(names[0])))]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            rows = list(map(operator.itemgetter(*names), records))  # uniform key sets
        except KeyError:
            rows = [tuple(map(record.get, names)) for record in records]
        return list(zip(*rows))
    finally:
        if gc_was_enabled:
            gc.enable()


def _explain(name: str, dtype: pa.DataType, values: list[Any], exc: Exception) -> str:
    """Find the first value of a column that Arrow refuses, for the error message."""
    for index, value in enumerate(values):
        try:
            pa.array([value], type=dtype)
        except Exception:  # noqa: BLE001 - any refusal identifies the culprit
            return (f"record {index}: column {name!r} expects {dtype}, "
                    f"got {type(value).__name__} {value!r:.80}: {exc}")
    return f"column {name!r} expects {dtype}: {exc}"


def batch_to_records(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """Rows of a batch back to record dicts, dropping nulls (the inverse of records_to_batch,
    with times as int nanoseconds)."""
    columns = {}
    for name in batch.schema.names:
        column = batch.column(name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.int64())
        columns[name] = column.to_pylist()
    rows = []
    for i in range(batch.num_rows):
        row = {}
        for name, values in columns.items():
            value = values[i]
            if value is not None:
                row[name] = dict(value) if name == "extra" else value
        rows.append(row)
    return rows


# --- OCSF classification ---------------------------------------------------------------------

CLASS_FILE = 1001
CLASS_KERNEL = 1003
CLASS_MEMORY = 1004
CLASS_PROCESS = 1007
CLASS_NETWORK = 4001
CLASS_BASE = 0
ACTIVITY_OTHER = 99
SEVERITY_INFORMATIONAL = 1
SEVERITY_MEDIUM = 3
SEVERITY_HIGH = 4

# syscall name -> (class_uid, activity_id) for those with a more specific OCSF class than
# Kernel Activity / Invoke. Activity ids are OCSF 1.x's.
_SYSCALL_CLASSES: dict[str, tuple[int, int]] = {
    **{n: (CLASS_FILE, 14) for n in ("open", "openat", "openat2")},           # Open
    **{n: (CLASS_FILE, 1) for n in ("creat", "mkdir", "mkdirat", "mknod", "mknodat", "link",
                                     "linkat", "symlink", "symlinkat")},     # Create
    **{n: (CLASS_FILE, 3) for n in ("truncate",)},                             # Update
    **{n: (CLASS_FILE, 4) for n in ("unlink", "unlinkat", "rmdir")},          # Delete
    **{n: (CLASS_FILE, 5) for n in ("rename", "renameat", "renameat2")},      # Rename
    **{n: (CLASS_FILE, 6) for n in ("chmod", "fchmodat", "fchmodat2", "chown", "lchown",
                                     "fchownat", "utimensat", "utimes", "utime",
                                     "setxattr", "lsetxattr", "removexattr",
                                     "lremovexattr")},                         # Set Attributes
    **{n: (CLASS_FILE, 8) for n in ("stat", "lstat", "newfstatat", "statx", "access",
                                     "faccessat", "faccessat2", "readlink", "readlinkat",
                                     "getxattr", "lgetxattr", "listxattr",
                                     "llistxattr")},                           # Get Attributes
    "mount": (CLASS_FILE, 12), "umount2": (CLASS_FILE, 13),
    **{n: (CLASS_NETWORK, 1) for n in ("connect", "accept", "accept4")},      # Open
    "listen": (CLASS_NETWORK, 7), "shutdown": (CLASS_NETWORK, 2),            # Listen, Close
    **{n: (CLASS_MEMORY, 1) for n in ("mmap",)},                               # Allocate Page
    **{n: (CLASS_MEMORY, 2) for n in ("mprotect", "pkey_mprotect", "mremap")},  # Modify Page
    "munmap": (CLASS_MEMORY, 3),                                                # Delete Page
    "process_vm_readv": (CLASS_MEMORY, 7), "process_vm_writev": (CLASS_MEMORY, 8),
}
# Launch, Launch, Terminate; a snapshot saw no launch: OCSF 1.5 has no closer activity
_PROCESS_ACTIVITIES = {"start": 1, "exec": 1, "exit": 2, "snapshot": ACTIVITY_OTHER}


def classify(kind: str, event_type: str, action: str | None = None,
             errno: str | None = None) -> tuple[int, int, int]:
    """(class_uid, activity_id, severity_id) of a record; type_uid = class_uid*100+activity."""
    if kind == KIND_SYSCALL:
        class_uid, activity = _SYSCALL_CLASSES.get(action or "", (CLASS_KERNEL, 4))  # Invoke
        if class_uid == CLASS_NETWORK and action == "connect" and errno:
            activity = 5 if errno == "ECONNREFUSED" else 4 if errno != "EINPROGRESS" else 1
        return class_uid, activity, SEVERITY_INFORMATIONAL
    if kind == KIND_PROCESS:
        return CLASS_PROCESS, _PROCESS_ACTIVITIES.get(event_type, ACTIVITY_OTHER), \
            SEVERITY_INFORMATIONAL
    if kind == KIND_INTEGRITY:
        return CLASS_KERNEL, ACTIVITY_OTHER, SEVERITY_HIGH
    if kind == KIND_HYPERCALL:
        return CLASS_KERNEL, 4, SEVERITY_INFORMATIONAL
    if kind == KIND_HV_EVENT:
        return CLASS_KERNEL, ACTIVITY_OTHER, SEVERITY_INFORMATIONAL
    if kind == KIND_LOSS:
        return CLASS_BASE, ACTIVITY_OTHER, SEVERITY_MEDIUM
    raise RecordError(f"kind {kind!r} is not one of {KINDS}")


# --- building records ------------------------------------------------------------------------

def make_process_uid(vm_id: str, pid: int, task_start_ns: int) -> str:
    """Stable process identity: pids and CR3 values are reused, (VM, pid, start time) is not."""
    return f"{vm_id}/{pid}/{task_start_ns}"


@dataclass
class RecordFactory:
    """Builds the records of one traced VM session with the common fields filled in.

    event_uid is `<vm_id>:<session_start_ns as hex>:<seq>`: unique across sessions of a VM
    and the same when a recorded session is replayed (the start time comes from the KVMI
    handshake, which the recording keeps).
    """

    vm_id: str
    vm_name: str | None = None
    observer_host: str | None = None
    session_start_ns: int = 0

    def __post_init__(self) -> None:
        self._seq = itertools.count()
        self._uid_prefix = f"{self.vm_id}:{self.session_start_ns:x}:"

    def new(self, kind: str, event_type: str, time_ns: int, **fields: Any) -> dict[str, Any]:
        """A record of `kind`/`event_type` at `time_ns` (ns since the epoch, UTC).

        `fields` are further columns (action, pid, path, ...); None values are left out.
        Unknown column names raise RecordError here, at the monitor, not later at a sink.
        """
        if not _COLUMN_SET.issuperset(fields):
            raise RecordError(f"unknown column(s) {sorted(fields.keys() - _COLUMN_SET)}")
        if event_type not in EVENT_TYPES.get(kind, ()):
            raise RecordError(f"event_type {event_type!r} is not valid for kind {kind!r} "
                              f"(expected one of {EVENT_TYPES.get(kind, ())})")
        seq = next(self._seq)
        class_uid, activity_id, severity_id = classify(
            kind, event_type, fields.get("action"), fields.get("errno"))
        record = {
            "event_uid": self._uid_prefix + str(seq),
            "time": time_ns,
            "seq": seq,
            "vm_id": self.vm_id,
            "kind": kind,
            "event_type": event_type,
            "class_uid": class_uid,
            "activity_id": activity_id,
            "severity_id": severity_id,
            "type_uid": class_uid * 100 + activity_id,
        }
        if self.vm_name is not None:
            record["vm_name"] = self.vm_name
        if self.observer_host is not None:
            record["observer_host"] = self.observer_host
        for name, value in fields.items():
            if value is not None:
                record[name] = value
        return record

    def loss(self, counter: str, count: int, interval_start_ns: int, time_ns: int,
             **fields: Any) -> dict[str, Any]:
        """A loss-counter record: `count` items of `counter` lost in [interval_start, time]."""
        return self.new(KIND_LOSS, "counter", time_ns, counter=counter, count=count,
                        interval_start=interval_start_ns, **fields)


def loss_record(vm_id: str, counter: str, count: int, interval_start_ns: int, time_ns: int,
                seq: int, observer_host: str | None = None) -> dict[str, Any]:
    """A loss record made by a sink, which has no RecordFactory of the VM's: its seq comes from
    the sink's own counter and its event_uid says so (`<vm_id>:loss:<counter>:<seq>`)."""
    class_uid, activity_id, severity_id = classify(KIND_LOSS, "counter")
    record = {
        "event_uid": f"{vm_id}:loss:{counter}:{seq}", "time": time_ns, "seq": seq,
        "vm_id": vm_id, "kind": KIND_LOSS, "event_type": "counter",
        "class_uid": class_uid, "activity_id": activity_id, "severity_id": severity_id,
        "type_uid": class_uid * 100 + activity_id, "counter": counter, "count": count,
        "interval_start": interval_start_ns,
    }
    if observer_host is not None:
        record["observer_host"] = observer_host
    return record

