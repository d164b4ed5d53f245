"""`vmitrace demo` end to end: a real lab guest under QEMU with the vmitrace KVMI plugin, traced
by the collector over KVMI, written to Parquet, summarized, read back by DuckDB (an independent
reader) and replayed from its session recording.

The demo run is shared with tests/test_notebook.py (`demo_run()`): one real trace per session.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

from guestlab import workloads as wl
from tracer.demo import MARKER, render_summary

pytestmark = pytest.mark.guest

VMITRACE = str(Path(sys.executable).with_name("vmitrace"))
DEMO_SECONDS = 20
# System calls every round of the steady workload makes (guestlab/workloads/README.md).
WORKLOAD_SYSCALLS = {"openat", "write", "read", "close", "fork", "execve", "wait4", "socket",
                     "setsockopt", "bind", "listen", "connect", "accept", "rt_sigaction",
                     "exit_group"}


@dataclass(frozen=True)
class DemoRun:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def dataset(self) -> Path:
        return self.out / "dataset"

    def summary(self) -> dict[str, Any]:
        assert self.returncode == 0, f"vmitrace demo failed ({self.returncode}):\n" \
                                     f"{self.stderr[-4000:]}"
        return json.loads(self.stdout)


@functools.cache
def demo_run() -> DemoRun:
    """Run `vmitrace demo --duration 20 --json` once per test session (real guest, ~1-2 min)."""
    parent = Path(tempfile.mkdtemp(prefix="vmitrace-test-demo-"))
    atexit.register(shutil.rmtree, parent, True)
    out = parent / "out"
    proc = subprocess.run([VMITRACE, "demo", "--duration", str(DEMO_SECONDS), "--out", str(out),
                           "--top", "100", "--json"],
                          capture_output=True, text=True, timeout=900)
    return DemoRun(out, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def run() -> DemoRun:
    return demo_run()


@pytest.fixture(scope="module")
def summary(run: DemoRun) -> dict[str, Any]:
    return run.summary()


def _tree_nodes(nodes: list[dict[str, Any]], parent: str | None = None):
    for node in nodes:
        yield parent, node
        yield from _tree_nodes(node["children"], node["name"])


def _sql(run: DemoRun, query: str) -> list[tuple[Any, ...]]:
    glob = str(run.dataset / "**" / "*.parquet")
    con = duckdb.connect()
    con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{glob}', "
                "hive_partitioning = true)")
    return con.execute(query).fetchall()


def test_progress_goes_to_stderr_and_json_to_stdout(run: DemoRun, summary: dict[str, Any]) -> None:
    for step in ("step 1/4", "step 2/4", "step 3/4", "step 4/4", "records written"):
        assert step in run.stderr
    assert "[demo]" not in run.stdout
    # what tracing cost the guest, by the plugin's count: in the summary and on stderr
    [vm] = summary["collector"]["vms"]
    cost = vm["host_cost"]
    assert cost["events"] > 0 and 0 < cost["waits"] < cost["events"]
    assert cost["event_us"] >= cost["wait_us"] > 0
    assert f"[demo] host: {cost['waits']} of {cost['events']} events made their vCPU wait" \
        in run.stderr
    assert summary["dataset"] == str(run.dataset)
    assert json.loads((run.out / "summary.json").read_text())["records"] == summary["records"]
    assert (run.out / MARKER).exists()


def test_summary_shows_the_workload_syscalls(summary: dict[str, Any]) -> None:
    seen = {row["syscall"]: row for row in summary["top_syscalls"]}
    assert WORKLOAD_SYSCALLS <= seen.keys()
    # wl-enoent's openat fails with ENOENT every round.
    assert seen["openat"]["failed"] >= 1
    assert summary["by_kind"]["syscall"] == sum(r["calls"] for r in summary["top_syscalls"])


def test_summary_process_tree_has_the_workload(summary: dict[str, Any]) -> None:
    nodes = list(_tree_nodes(summary["process_tree"]))
    for comm in wl.WORKLOAD_COMMS.values():
        # A wl-exec child forked just before the trace ended keeps its parent's name, so
        # look for the driver's children by parent as well as by name.
        node = next((n for p, n in nodes if p == "workload" and n["name"] == comm), None)
        assert node is not None, comm
        assert node["count"] >= 2  # the steady workload repeats every round
        assert node["exe"] == wl.WORKLOAD_BINARIES[comm.removeprefix("wl-")]
    parent, busybox = next((p, n) for p, n in nodes if p == "wl-exec")
    assert busybox["cmdline"] == " ".join(wl.EXEC_ARGV)
    assert busybox["exit_codes"].get(str(wl.EXEC_EXIT_CODE), 0) >= 1
    driver = next(n for p, n in nodes if n["name"] == "workload" and p != "workload")
    assert driver["cmdline"].startswith(wl.WORKLOAD_DRIVER)
    for forked in (n for p, n in nodes if n["name"] == "workload" and p == "workload"):
        assert forked["cmdline"] == driver["cmdline"]  # not exec'd yet: the parent's image


def test_summary_files_network_hypercalls_integrity_losses(summary: dict[str, Any]) -> None:
    files = {row["path"]: row for row in summary["files_written"]}
    assert files[wl.FILE_PATH]["comms"] == ["wl-file"]
    assert "O_WRONLY|O_CREAT|O_TRUNC" in files[wl.FILE_PATH]["flags"]
    assert wl.ENOENT_PATH not in files  # opened read-only
    network = {(r["comm"], r["syscall"]): r for r in summary["network"]}
    for call in ("connect", "bind"):
        row = network[("wl-tcp", call)]
        assert (row["family"], row["address"], row["port"], row["result"]) == \
            ("AF_INET", wl.TCP_ADDRESS, wl.TCP_PORT, "ok")
    assert ("wl-tcp", "accept") in network and ("wl-tcp", "listen") in network
    assert {(h["comm"], h["nr"]) for h in summary["hypercalls"]} == \
        {("wl-vmcall", wl.VMCALL_RAX)}
    assert summary["integrity_alerts"] == []  # nothing in the lab touches LSTAR or CR0/CR4
    losses = {row["counter"]: row["count"] for row in summary["losses"]}
    assert losses.get("dropped_records", 0) == 0 and losses.get("parquet.dropped", 0) == 0


def test_text_summary_renders_every_section(summary: dict[str, Any]) -> None:
    text = render_summary(summary)
    for heading in ("Top system calls", "Processes (", "Files written", "Network",
                    "Hypercalls", "Integrity alerts", "Losses", "Dataset:", "DuckDB"):
        assert heading in text
    assert wl.FILE_PATH in text and "wl-exec" in text and summary["duckdb_query"] in text


def test_dataset_is_readable_by_duckdb(run: DemoRun, summary: dict[str, Any]) -> None:
    # The ready-to-paste query runs as printed and ranks (program, syscall) pairs.
    rows = duckdb.sql(summary["duckdb_query"]).fetchall()
    busiest = _sql(run, "SELECT comm, action, count(*) AS n FROM events WHERE kind = 'syscall' "
                        "GROUP BY ALL ORDER BY n DESC LIMIT 1")
    assert 1 <= len(rows) <= 20 and rows[0][2] == busiest[0][2]
    assert all(calls >= failed for _, _, calls, failed in rows)
    shell = subprocess.run(summary["duckdb_command"], shell=True, capture_output=True, text=True,
                           timeout=120)
    assert shell.returncode == 0, shell.stderr
    assert busiest[0][0] in shell.stdout and busiest[0][1] in shell.stdout
    # The summary agrees with an independent reader.
    per_action = dict(_sql(run, "SELECT action, count(*) FROM events WHERE kind = 'syscall' "
                                "GROUP BY action"))
    assert per_action == {r["syscall"]: r["calls"] for r in summary["top_syscalls"]}
    enoent = _sql(run, f"SELECT comm, errno, ret FROM events WHERE action = 'openat' "
                       f"AND path = '{wl.ENOENT_PATH}'")
    assert enoent and set(enoent) == {("wl-enoent", "ENOENT", -wl.ENOENT)}
    written = _sql(run, f"SELECT DISTINCT ret FROM events WHERE action = 'write' "
                        f"AND comm = 'wl-file' AND length = {wl.FILE_BYTES}")
    assert written == [(wl.FILE_BYTES,)]


@pytest.fixture(scope="module")
def replayed(summary: dict[str, Any],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`vmitrace replay` of the demo's recording into a Parquet dataset."""
    out = tmp_path_factory.mktemp("replayed")
    proc = subprocess.run([VMITRACE, "replay", summary["recording"], "--profile",
                           summary["profile"], "--sink", f"parquet:{out}"],
                          capture_output=True, text=True, timeout=600)
    return out, proc


def test_recording_dumps_and_replays(summary: dict[str, Any], replayed) -> None:
    recording = Path(summary["recording"])
    assert recording.stat().st_size > 0
    dump = subprocess.run([VMITRACE, "kvmi", "dump", str(recording), "--limit", "20"],
                          capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr
    assert len(dump.stdout.splitlines()) >= 20
    out, proc = replayed
    assert proc.returncode == 0, proc.stderr[-3000:]
    glob = str(out / "**" / "*.parquet")
    rows = duckdb.sql(f"SELECT DISTINCT comm, path FROM read_parquet('{glob}', "
                      f"hive_partitioning = true) WHERE action = 'openat'").fetchall()
    assert ("wl-file", wl.FILE_PATH) in rows


def test_replay_reproduces_the_live_records(run: DemoRun, replayed) -> None:
    """`vmitrace replay` gives the same records as the live session when the live trace read
    guest memory over KVMI, as the demo does. Compared by content: event_uid carries `seq`,
    which periodic loss records (timed differently live and in replay) also consume."""
    out, proc = replayed
    assert proc.returncode == 0, proc.stderr[-3000:]
    query = ("SELECT kind, event_type, action, pid, tid, comm, path, ret, errno "
             "FROM read_parquet('{}', hive_partitioning = true) WHERE kind <> 'loss'")
    live = Counter(duckdb.sql(query.format(run.dataset / "**" / "*.parquet")).fetchall())
    again = Counter(duckdb.sql(query.format(out / "**" / "*.parquet")).fetchall())
    missing, extra = live - again, again - live
    assert not missing and not extra, (
        f"replay differs from the live trace: {sum(missing.values())} of {sum(live.values())} "
        f"live records missing, {sum(extra.values())} extra; e.g. missing "
        f"{sorted(missing)[:3]}, extra {sorted(extra)[:3]}; replay stderr: {proc.stderr[-1500:]}")


def test_out_dir_not_made_by_the_demo_is_refused(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    proc = subprocess.run([VMITRACE, "demo", "--out", str(tmp_path), "--duration", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not made by `vmitrace demo`" in proc.stderr
    assert precious.read_text() == "keep me" and not (tmp_path / MARKER).exists()
    assert proc.stdout == ""


def test_rerun_replaces_only_the_demo_files(tmp_path: Path) -> None:
    from tracer.demo import prepare_out_dir

    out = tmp_path / "out"
    prepare_out_dir(out)
    (out / "dataset" / "vm_id=x").mkdir(parents=True)
    (out / "session.kvmirec").write_bytes(b"old")
    (out / "summary.json").write_text("{}")
    (out / "mine.txt").write_text("kept")
    prepare_out_dir(out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "mine.txt"]
