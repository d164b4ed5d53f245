"""`vmitrace demo`: boot the lab guest, trace its steady workload with every monitor, write a
Parquet dataset and a session recording, and summarize what was seen.

The tracing itself is the collector's (tracer.collector.Collector) through the real QEMU plugin
and KVMI path; this module only orchestrates it and reads the written dataset back. The
summary is computed from the Parquet files (pyarrow + pandas), so it shows what a downstream
reader will find, not what the collector believes it wrote.

Python API: `summarize(dataset_dir) -> dict` (also usable on any vmitrace dataset) and
`render_summary(summary) -> str`.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import click

MARKER = ".vmitrace-demo"          # marks an output directory as the demo's own
DATASET_DIR = "dataset"
RECORDING_FILE = "session.kvmirec"
SUMMARY_FILE = "summary.json"
PROGRESS_EVERY_S = 10.0
MAX_TREE_DEPTH = 8                 # the rendered process tree is bounded in depth and width
MAX_TREE_CHILDREN = 12             # ... when rendered as text
MAX_JSON_CHILDREN = 100            # ... in the JSON summary (the rest is counted in "more")
MAX_LABEL = 48                     # comm/path strings come from the guest: bound what we print
WRITE_FLAGS = re.compile(r"\b(?:O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND)\b")
OPEN_CALLS = ("open", "openat", "openat2", "creat")
NETWORK_CALLS = ("connect", "accept", "accept4", "bind", "listen")

# Columns the summary reads (a subset keeps memory small on long traces).
_COLUMNS = ["time", "vm_id", "vm_name", "kind", "event_type", "action", "pid", "ppid", "comm",
            "exe", "cmdline", "process_uid", "parent_process_uid", "ret", "errno", "path",
            "flags", "family", "remote_addr", "remote_port", "local_addr", "local_port",
            "exit_code", "target", "reg_name", "old_value", "new_value", "detail",
            "hypercall_nr", "counter", "count"]


class DemoError(click.ClickException):
    """A failed demo step (exit status 1), with what to do about it."""


def _say(message: str) -> None:
    click.echo(f"[demo] {message}", err=True)


def _short(value: Any, limit: int = MAX_LABEL) -> str:
    text = "" if value is None else str(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- reading a dataset --------------------------------------------------------------------------

def load_dataset(dataset_dir: str | Path, columns: Iterable[str] = _COLUMNS) -> Any:
    """The dataset's rows (only `columns` that exist) as a pandas DataFrame."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(dataset_dir), format="parquet", partitioning="hive")
    names = [c for c in columns if c in dataset.schema.names]
    # Nullable integer dtypes: the default (float64 for columns with nulls) would round
    # 64-bit values such as kernel addresses.
    exact = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(),
             pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype()}
    return dataset.to_table(columns=names).to_pandas(types_mapper=exact.get)


def duckdb_command(query: str) -> str:
    """A shell command running `query` with DuckDB's Python package (installed by setup.sh)."""
    # Double quotes keep the SQL readable; anything the shell would expand inside them falls
    # back to full quoting.
    quoted = shlex.quote(query) if re.search(r'["$`\\!]', query) else f'"{query}"'
    return (f"{shlex.quote(sys.executable)} -c "
            f"'import duckdb, sys; duckdb.sql(sys.argv[1]).show()' {quoted}")


def duckdb_query(dataset_dir: str | Path) -> str:
    """A ready-to-paste DuckDB query over the dataset: system calls per process."""
    glob = str(Path(dataset_dir).resolve() / "**" / "*.parquet").replace("'", "''")
    return ("SELECT comm, action, count(*) AS calls, count(errno) AS failed "
            f"FROM read_parquet('{glob}', hive_partitioning = true) "
            "WHERE kind = 'syscall' GROUP BY ALL ORDER BY calls DESC LIMIT 20;")


def _none(value: Any) -> Any:
    """pandas NA/NaN -> None, numpy scalars -> Python values (for JSON)."""
    import pandas as pd

    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value


def summarize(dataset_dir: str | Path, top: int = 10) -> dict[str, Any]:
    """What a vmitrace dataset holds, for people: top system calls, the process tree, files
    written, network activity, hypercalls, integrity alerts and losses."""
    frame = load_dataset(dataset_dir)
    if frame.empty:
        return {"records": 0, "by_kind": {}, "vms": [], "top_syscalls": [], "processes": 0,
                "process_tree": [], "files_written": [], "network": [], "hypercalls": [],
                "integrity_alerts": [], "losses": []}
    frame = frame.sort_values("time", kind="stable")
    syscalls = frame[frame["kind"] == "syscall"]
    vms = []
    for vm_id, rows in frame.groupby("vm_id", observed=True, sort=True):
        vms.append({"vm_id": str(vm_id), "vm_name": _none(rows["vm_name"].iloc[0]),
                    "first": rows["time"].iloc[0].isoformat(),
                    "last": rows["time"].iloc[-1].isoformat(),
                    "seconds": round((rows["time"].iloc[-1] - rows["time"].iloc[0])
                                     .total_seconds(), 3),
                    "records": int(len(rows))})
    processes = _processes(frame)
    return {
        "records": int(len(frame)),
        "by_kind": {str(k): int(v) for k, v in frame["kind"].value_counts().sort_index().items()},
        "vms": vms,
        "top_syscalls": _top_syscalls(syscalls, top),
        "processes": len(processes),
        "process_tree": _process_tree(processes),
        "files_written": _files_written(syscalls, top),
        "network": _network(syscalls, top),
        "hypercalls": _hypercalls(frame[frame["kind"] == "hypercall"]),
        "integrity_alerts": _integrity(frame[frame["kind"] == "integrity"]),
        "losses": _losses(frame[frame["kind"] == "loss"]),
    }


def _top_syscalls(syscalls: Any, top: int) -> list[dict[str, Any]]:
    if syscalls.empty:
        return []
    rows = []
    grouped = syscalls.groupby("action", observed=True, dropna=False)
    counts = grouped.size().sort_values(ascending=False, kind="stable").head(top)
    for action, calls in counts.items():
        group = grouped.get_group(action)
        top_comms = group["comm"].value_counts().head(3)
        rows.append({"syscall": _none(action), "calls": int(calls),
                     "failed": int(group["errno"].notna().sum()),
                     "processes": int(group["process_uid"].nunique()),
                     "top_comms": {_short(c, 24): int(n) for c, n in top_comms.items()}})
    return rows


def _processes(frame: Any) -> dict[str, dict[str, Any]]:
    """Every process seen (by process_uid), with its best-known name and parent."""
    rows = frame[frame["kind"].isin(["syscall", "process"]) & frame["process_uid"].notna()]
    procs: dict[str, dict[str, Any]] = {}
    for rec in rows[["time", "kind", "event_type", "pid", "ppid", "comm", "exe", "cmdline",
                     "process_uid", "parent_process_uid", "exit_code"]].itertuples(index=False):
        p = procs.get(rec.process_uid)
        if p is None:
            p = procs[rec.process_uid] = {
                "process_uid": rec.process_uid, "pid": _none(rec.pid), "ppid": None,
                "comm": None, "exe": None, "cmdline": None, "parent_process_uid": None,
                "first_seen": rec.time, "syscalls": 0, "exit_code": None}
        if p["ppid"] is None and _none(rec.ppid) is not None:
            p["ppid"] = _none(rec.ppid)
        if _none(rec.comm) is not None:
            p["comm"] = rec.comm       # the latest name wins: an exec renames the task
        if rec.kind == "syscall":
            p["syscalls"] += 1
        else:
            if _none(rec.parent_process_uid) is not None:
                p["parent_process_uid"] = rec.parent_process_uid
            if rec.event_type in ("exec", "snapshot"):  # the later exec's image wins
                p["exe"] = _none(rec.exe) or p["exe"]
                p["cmdline"] = _none(rec.cmdline) or p["cmdline"]
            elif rec.event_type == "start":  # a fork runs its parent's image until it execs
                p["exe"] = p["exe"] or _none(rec.exe)
                p["cmdline"] = p["cmdline"] or _none(rec.cmdline)
            if rec.event_type == "exit":
                p["exit_code"] = _none(rec.exit_code)
    # Processes without parent_process_uid (e.g. no snapshot at attach): find the parent by ppid
    # (the latest process with that pid seen before the child; pids are reused).
    by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for p in procs.values():
        if p["pid"] is not None:
            by_pid[p["pid"]].append(p)
    for p in procs.values():
        if p["parent_process_uid"] is None and p["ppid"] is not None:
            candidates = [c for c in by_pid.get(p["ppid"], [])
                          if c["first_seen"] <= p["first_seen"] and c is not p]
            if candidates:
                p["parent_process_uid"] = max(candidates, key=lambda c: c["first_seen"])[
                    "process_uid"]
    return procs


def _label(p: dict[str, Any]) -> str:
    return _short(p["comm"] or (f"pid {p['pid']}" if p["pid"] is not None else "?"), 24)


def _process_tree(procs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The process tree folded by name: siblings with the same name become one node with a
    count (the steady workload starts the same programs every second)."""
    children: dict[str | None, list[str]] = defaultdict(list)
    for uid, p in procs.items():
        parent = p["parent_process_uid"]
        children[parent if parent in procs else None].append(uid)

    def fold(uids: list[str], depth: int, seen: frozenset[str]) -> list[dict[str, Any]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for uid in uids:
            if uid not in seen:
                groups[_label(procs[uid])].append(uid)
        nodes = []
        for label, members in groups.items():
            first = procs[members[0]]
            exits = Counter(procs[m]["exit_code"] for m in members
                            if procs[m]["exit_code"] is not None)
            kids = [k for m in members for k in children.get(m, [])]
            node = {"name": label, "count": len(members),
                    "pids": sorted({procs[m]["pid"] for m in members
                                    if procs[m]["pid"] is not None})[:5],
                    "parent_pid": first["ppid"] if first["parent_process_uid"] not in procs
                    else None,
                    "exe": _short(first["exe"], 80) or None,
                    "cmdline": _short(first["cmdline"], 80) or None,
                    "syscalls": sum(procs[m]["syscalls"] for m in members),
                    "exit_codes": {str(k): v for k, v in sorted(exits.items())},
                    "children": (fold(kids, depth + 1, seen | set(members))
                                 if depth < MAX_TREE_DEPTH else [])}
            node["subtree_syscalls"] = node["syscalls"] + sum(
                child["subtree_syscalls"] for child in node["children"])
            nodes.append(node)
        nodes.sort(key=lambda n: (-n["subtree_syscalls"], n["name"]))
        if len(nodes) > MAX_JSON_CHILDREN:
            nodes[MAX_JSON_CHILDREN - 1:] = [{"more": len(nodes) - MAX_JSON_CHILDREN + 1}]
        return nodes

    return fold(children.get(None, []), 0, frozenset())


def _files_written(syscalls: Any, top: int) -> list[dict[str, Any]]:
    opens = syscalls[syscalls["action"].isin(OPEN_CALLS) & syscalls["path"].notna()]
    if opens.empty:
        return []
    writing = opens[(opens["action"] == "creat") |
                    opens["flags"].fillna("").str.contains(WRITE_FLAGS)]
    rows = []
    for path, group in writing.groupby("path", observed=True):
        rows.append({"path": _short(path, 120), "opens": int(len(group)),
                     "failed": int(group["errno"].notna().sum()),
                     "flags": sorted({str(f) for f in group["flags"].dropna()})[:3],
                     "comms": sorted({str(c) for c in group["comm"].dropna()})[:5]})
    rows.sort(key=lambda r: (-r["opens"], r["path"]))
    return rows[:top]


def _network(syscalls: Any, top: int) -> list[dict[str, Any]]:
    net = syscalls[syscalls["action"].isin(NETWORK_CALLS)]
    if net.empty:
        return []
    counts: Counter[tuple[Any, ...]] = Counter()
    for rec in net[["comm", "action", "family", "remote_addr", "remote_port", "local_addr",
                    "local_port", "errno"]].itertuples(index=False):
        remote = rec.action in ("connect", "accept", "accept4")
        addr = _none(rec.remote_addr if remote else rec.local_addr)
        port = _none(rec.remote_port if remote else rec.local_port)
        counts[(_short(rec.comm, 24), rec.action, _none(rec.family), _short(addr, 64) or None,
                None if port is None else int(port), _none(rec.errno) or "ok")] += 1
    rows = [{"comm": k[0], "syscall": k[1], "family": k[2], "address": k[3], "port": k[4],
             "result": k[5], "count": n} for k, n in counts.items()]
    rows.sort(key=lambda r: (-r["count"], r["comm"], r["syscall"]))
    return rows[:top]


def _hypercalls(rows: Any) -> list[dict[str, Any]]:
    counts = Counter((_short(r.comm, 24), _none(r.hypercall_nr))
                     for r in rows[["comm", "hypercall_nr"]].itertuples(index=False))
    return [{"comm": comm, "nr": nr, "nr_hex": None if nr is None else hex(nr), "count": n}
            for (comm, nr), n in sorted(counts.items(), key=lambda kv: -kv[1])]


def _integrity(rows: Any) -> list[dict[str, Any]]:
    out = []
    for r in rows[["time", "event_type", "target", "reg_name", "old_value", "new_value",
                   "detail"]].itertuples(index=False):
        old, new = _none(r.old_value), _none(r.new_value)
        out.append({"time": r.time.isoformat(), "event": r.event_type,
                    "target": _short(_none(r.target) or _none(r.reg_name), 64),
                    "old": None if old is None else hex(old),
                    "new": None if new is None else hex(new), "detail": _short(_none(r.detail), 200)})
    return out


def _losses(rows: Any) -> list[dict[str, Any]]:
    totals: Counter[str] = Counter()
    for r in rows[["counter", "count"]].itertuples(index=False):
        totals[str(r.counter)] += int(_none(r.count) or 0)
    return [{"counter": c, "count": n} for c, n in sorted(totals.items())]


# -- rendering ------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[Any]], indent: str = "  ") -> list[str]:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(r[i].lstrip("-").isdigit() for r in cells if r[i]) and bool(cells)
               for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return indent + "  ".join(v.rjust(w) if num else v.ljust(w)
                                  for v, w, num in zip(values, widths, numeric)).rstrip()
    return [line(headers), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in cells]


def _tree_lines(nodes: list[dict[str, Any]], prefix: str = "") -> list[str]:
    lines = []
    shown = nodes[:MAX_TREE_CHILDREN]
    for i, node in enumerate(shown):
        last = i == len(shown) - 1 and len(nodes) <= MAX_TREE_CHILDREN
        branch = "└─ " if last else "├─ "
        count = f" ×{node['count']}" if node["count"] > 1 else ""
        pids = ",".join(str(p) for p in node["pids"]) + ("…" if node["count"] > 5 else "")
        parent = f" (parent pid {node['parent_pid']}, not traced)" \
            if node["parent_pid"] is not None else ""
        detail = f"  {node['cmdline']}" if node["cmdline"] else ""
        exits = (" exit " + ",".join(f"{k}×{v}" for k, v in node["exit_codes"].items())
                 if node["exit_codes"] else "")
        lines.append(f"{prefix}{branch}{node['name']}{count} [pid {pids}]{parent} "
                     f"{node['syscalls']} syscalls{exits}{detail}")
        lines += _tree_lines(node["children"], prefix + ("   " if last else "│  "))
    if len(nodes) > MAX_TREE_CHILDREN:
        hidden = sum(node.get("more", 1) for node in nodes[MAX_TREE_CHILDREN:])
        lines.append(f"{prefix}└─ … {hidden} more")
    return lines


def render_summary(summary: dict[str, Any]) -> str:
    """The summary as readable text tables."""
    out: list[str] = []
    for vm in summary.get("vms", []):
        out.append(f"VM {vm['vm_name'] or vm['vm_id']} ({vm['vm_id']}): {vm['records']} records "
                   f"over {vm['seconds']} s")
    out.append("records by kind: " + (", ".join(f"{k} {v}" for k, v in
                                               summary["by_kind"].items()) or "none"))
    out += ["", "Top system calls"]
    out += _table(["syscall", "calls", "failed", "processes", "mostly by"],
                  [[r["syscall"], r["calls"], r["failed"], r["processes"],
                    ", ".join(f"{c} {n}" for c, n in r["top_comms"].items())]
                   for r in summary["top_syscalls"]]) if summary["top_syscalls"] else ["  none"]
    out += ["", f"Processes ({summary['processes']}), by parent"]
    out += ["  " + line for line in _tree_lines(summary["process_tree"])] or ["  none"]
    out += ["", "Files written"]
    out += _table(["path", "opens", "failed", "flags", "by"],
                  [[r["path"], r["opens"], r["failed"], " ".join(r["flags"]), ", ".join(r["comms"])]
                   for r in summary["files_written"]]) if summary["files_written"] else ["  none"]
    out += ["", "Network"]
    out += _table(["process", "syscall", "family", "address", "port", "result", "count"],
                  [[r["comm"], r["syscall"], r["family"], r["address"], r["port"], r["result"],
                    r["count"]] for r in summary["network"]]) if summary["network"] else ["  none"]
    out += ["", "Hypercalls"]
    out += _table(["process", "nr", "count"],
                  [[r["comm"], r["nr_hex"], r["count"]] for r in summary["hypercalls"]]) \
        if summary["hypercalls"] else ["  none"]
    out += ["", "Integrity alerts"]
    out += _table(["time", "event", "target", "old", "new", "detail"],
                  [[r["time"], r["event"], r["target"], r["old"], r["new"], r["detail"]]
                   for r in summary["integrity_alerts"]]) \
        if summary["integrity_alerts"] else ["  none"]
    lost = [r for r in summary["losses"] if r["count"]]
    out += ["", "Losses"]
    out += _table(["counter", "count"], [[r["counter"], r["count"]] for r in lost]) \
        if lost else ["  none (every loss counter is 0)" if summary["losses"] else "  none"]
    if "dataset" in summary:
        out += ["", f"Dataset:   {summary['dataset']}",
                f"Recording: {summary['recording']}",
                f"Replay:    {summary['replay_command']}",
                "DuckDB query (paste into the `duckdb` shell or duckdb.sql(...) in Python):",
                f"  {summary['duckdb_query']}",
                "or run it from the shell" + ("" if importlib.util.find_spec("duckdb")
                                              else " (after `pip install duckdb`)") + ":",
                f"  {summary['duckdb_command']}"]
    return "\n".join(out) + "\n"


# -- the demo run -----------------------------------------------------------------------------

def prepare_out_dir(out: Path) -> None:
    """Create the output directory, or clear the demo's own files from an earlier run.
    A non-empty directory the demo did not make is refused (nothing is deleted)."""
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise click.BadParameter(f"{out} is not empty and was not made by `vmitrace demo`; "
                                 "give a new or empty directory", param_hint="--out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("output directory of `vmitrace demo`; rerunning replaces it\n")
    for old in [out / DATASET_DIR, out / SUMMARY_FILE, *out.glob(RECORDING_FILE + "*")]:
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()


def run_trace(kernel: str, vcpus: int, duration: float, dataset: Path, recording: Path,
              say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Build or reuse the lab and the profile, then trace the steady workload for `duration`
    seconds with every monitor on into `dataset` (Parquet) and `recording`. Returns the
    collector's result plus the profile path."""
    from guestlab import build
    from sinks import open_sink
    from tracer.collector import Collector, TraceOptions
    from tracer.kvmi.recording import RecordingWriter
    from tracer.kvmi.transport import Listener
    from tracer.trace_cli import profile_for_image, start_lab_guest

    import profiles

    say(f"step 1/4: lab guest artifacts (kernel {kernel}): building or reusing the cache")
    try:
        lab = build.ensure(kernel, progress=lambda m: say(f"  {m}"), refresh=False)
    except build.BuildError as exc:
        raise DemoError(f"cannot build the lab guest: {exc}") from exc
    say(f"step 2/4: profile of {lab.release}: building or reusing the cache")
    try:
        profile_path = profile_for_image(Path(lab.vmlinuz))
        profile = profiles.load(profile_path)
    except (OSError, profiles.ProfileError) as exc:
        raise DemoError(f"cannot build or load the profile of {lab.vmlinuz}: {exc}") from exc

    options = TraceOptions()  # every monitor on: syscalls, processes, integrity, hypercalls
    sink = open_sink(f"parquet:{dataset}")
    collector = Collector(lambda session: profile, [sink], options)
    stop_requested = threading.Event()
    tracing = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if not tracing.is_set():  # still building or booting: abort (cleanup in `finally`)
            raise KeyboardInterrupt
        say(f"{signal.Signals(signum).name}: stopping early; the summary covers what was traced")
        stop_requested.set()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    tmpdir = Path(tempfile.mkdtemp(prefix="vmitrace-demo-"))
    guest = None
    try:
        listener = Listener(f"unix:{tmpdir}/kvmi.sock",
                            recorder_factory=lambda hs: RecordingWriter(recording, hs))
        with listener:
            say(f"step 3/4: booting the lab guest ({vcpus} vCPU, TCG) with the KVMI plugin")
            # No RAM-file shortcut: every memory read goes over KVMI, so the recording holds
            # everything `vmitrace replay` needs.
            guest = start_lab_guest(kernel, vcpus, "steady", listener, collector,
                                    ram_shortcut=False, error=DemoError)
            say(f"  {guest.name} ({guest.release}) is up after {guest.boot_seconds or 0:.0f} s "
                f"(boot traced: {collector.pump.written} records)")
            say(f"step 4/4: tracing the steady workload for {duration:g} s")
            tracing.set()
            start = time.monotonic()
            next_report = start + PROGRESS_EVERY_S
            while not stop_requested.is_set() and time.monotonic() - start < duration:
                if guest.process is not None and guest.process.poll() is not None:
                    say("the lab guest stopped")
                    break
                if collector.errors:
                    break
                if time.monotonic() >= next_report:
                    next_report += PROGRESS_EVERY_S
                    say(f"  {time.monotonic() - start:4.0f}/{duration:g} s, "
                        f"{collector.pump.written} records written")
                time.sleep(0.2)
    finally:
        collector.stop()
        result = collector.close()
        if guest is not None:
            guest.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(tmpdir, ignore_errors=True)
    result["profile"] = str(profile_path)
    return result


@click.command("demo")
@click.option("--duration", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds of the steady workload to trace (after boot).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("vmitrace-demo-out"), show_default=True,
              help="Output directory: dataset/ (Parquet), session.kvmirec, summary.json.")
@click.option("--kernel", type=click.Choice(["6.1", "6.12"]), default="6.1", show_default=True,
              help="The lab kernel series.")
@click.option("--vcpus", type=click.IntRange(1, 4), default=1, show_default=True,
              help="Number of vCPUs of the lab guest.")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Rows per summary table.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo(duration: float, out_dir: Path, kernel: str, vcpus: int, top: int,
         as_json: bool) -> None:
    """Trace the lab guest's workload end to end and summarize what was seen.

    Builds or reuses the lab guest and its profile, boots it under QEMU (TCG) with the vmitrace
    KVMI plugin, traces its steady workload with every monitor on, writes a Parquet dataset
    and a KVMI session recording to --out, and prints a summary computed from the dataset.
    Progress goes to stderr, the summary to stdout.

    \b
    Examples:
      vmitrace demo
      vmitrace demo --duration 20 --out /tmp/demo --json | jq .top_syscalls
      vmitrace demo --kernel 6.12 --vcpus 2

    Exit status: 0 done, 1 a step failed (message on stderr), 2 bad usage.
    """
    out = out_dir.resolve()
    prepare_out_dir(out)
    dataset, recording = out / DATASET_DIR, out / RECORDING_FILE
    result = run_trace(kernel, vcpus, duration, dataset, recording)
    for error in result["errors"]:
        _say(f"error: {error}")
    from tracer.trace_cli import describe_host_cost
    for vm in result["vms"]:
        if vm.get("host_cost"):
            _say(f"host: {describe_host_cost(vm['host_cost'])}")
        for note in vm["notes"]:
            _say(f"note: {note}")
    if result["errors"] or not result["records"]:
        raise DemoError("tracing failed: " + ("; ".join(result["errors"]) or "no records"))
    _say(f"reading the dataset back ({result['records']} records)")
    summary = summarize(dataset, top)
    summary.update({
        "dataset": str(dataset), "recording": str(recording), "profile": result["profile"],
        "replay_command": f"vmitrace replay {recording} --profile {result['profile']} "
                          "--sink jsonl:-",
        "duckdb_query": duckdb_query(dataset),
        "duckdb_command": duckdb_command(duckdb_query(dataset)),
        "collector": {"records": result["records"], "sinks": result["sinks"],
                      "vms": result["vms"]},
    })
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(render_summary(summary), nl=False)
    sys.stdout.flush()
    if not summary["by_kind"].get("syscall"):
        raise DemoError("the trace holds no system calls (see the losses and notes above); "
                        f"details in {out / SUMMARY_FILE}")
