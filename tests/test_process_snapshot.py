"""Process snapshot at attach: a collector attached to a lab guest that has been running for a
while records every process already there (kind "process", event_type "snapshot"), compared
with the guest's own /proc; and the task list walk's bounds, on the same guest's real memory."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import pytest

from guestlab.guest import Guest
from test_trace_support import lab_profile
from tracer.collector import Collector, MemorySink, TraceOptions
from tracer.kvmi.transport import Listener
from tracer.memory import GuestMemory, RamFile
from tracer.monitors.base import Filters
from tracer.monitors.kernel import PF_KTHREAD, TaskReader

pytestmark = pytest.mark.guest

# One line per /proc/<pid>: "<pid> <exe or -> <stat line>"; argv of every process with a
# command line, NULs made visible.
PROC_LIST = ("for d in /proc/[0-9]*; do p=${d#/proc/}; "
             "s=$(cat $d/stat 2>/dev/null) || continue; "
             "e=$(readlink $d/exe 2>/dev/null) || e=-; echo \"P $p $e $s\"; "
             "a=$(tr '\\0' '\\1' < $d/cmdline 2>/dev/null); "
             "[ -n \"$a\" ] && echo \"A $p $a\"; done; true")


@dataclasses.dataclass
class GuestProcess:
    pid: int
    comm: str
    ppid: int
    kthread: bool
    exe: str | None
    argv: list[str] | None = None


def guest_processes(guest: Guest) -> dict[int, GuestProcess]:
    """The guest's processes as its own /proc shows them."""
    status, out = guest.run(PROC_LIST)
    assert status == 0, out
    procs: dict[int, GuestProcess] = {}
    for line in out.splitlines():
        tag, pid, rest = line.split(" ", 2)
        if tag == "P":
            exe, stat = rest.split(" ", 1)
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session tty tpgid flags
            procs[int(pid)] = GuestProcess(int(pid), comm, int(fields[1]),
                                           bool(int(fields[6]) & PF_KTHREAD),
                                           None if exe == "-" else exe)
        elif tag == "A" and int(pid) in procs:
            procs[int(pid)].argv = rest.rstrip("\1").split("\1")
    return procs


class AttachedLab:
    """A lab guest booted with nobody listening (the plugin retries until someone does);
    collectors attach to it later, and detach again (the plugin reconnects)."""

    def __init__(self, kernel: str) -> None:
        self.profile = lab_profile(kernel)
        self.dir = tempfile.mkdtemp(prefix="vmitrace-snapshot-")
        self.socket = f"{self.dir}/kvmi.sock"
        self.guest = Guest(kernel=kernel, vcpus=1,
                           plugin_options={"socket": self.socket, "reconnect": True})
        self.guest.start()
        self.collector: Collector | None = None
        self.listener: Listener | None = None
        self.sink = MemorySink()

    def attach(self, options: TraceOptions | None = None) -> Any:
        """Attach a collector; returns its VmTracer once the snapshot has been taken."""
        self.sink = MemorySink()
        self.listener = Listener(f"unix:{self.socket}")
        session = self.listener.accept(timeout=60)
        assert session is not None, "the plugin did not connect"
        self.collector = Collector(lambda s: self.profile, [self.sink], options or TraceOptions())
        self.collector.trace_in_thread(session, RamFile(self.guest.ram_path))
        deadline = time.monotonic() + 120
        while not (self.collector.tracers and self.collector.tracers[0].active):
            assert not self.collector.errors, self.collector.errors
            assert time.monotonic() < deadline, "the collector did not activate"
            time.sleep(0.1)
        return self.collector.tracers[0]

    def records(self) -> list[dict[str, Any]]:
        assert self.collector is not None and self.collector.pump.sync(30)
        return list(self.sink.records)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        snap = [r for r in self.records() if r["event_type"] == "snapshot"]
        by_pid = {r["pid"]: r for r in snap}
        assert len(by_pid) == len(snap), "a process recorded twice"
        return by_pid

    def detach(self) -> dict[str, Any]:
        assert self.collector is not None and self.listener is not None
        self.collector.stop()
        summary = self.collector.close()
        self.listener.close()
        self.collector = self.listener = None
        return summary

    def close(self) -> None:
        if self.collector is not None:
            self.detach()
        self.guest.stop()


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def lab(request):
    lab = AttachedLab(request.param)
    try:
        lab.guest.wait_ready(240)
        status, out = lab.guest.run("sleep 1000 </dev/null >/dev/null 2>&1 & echo sleeper $!")
        assert status == 0, out
        lab.sleeper = int(out.split("sleeper ")[1].split()[0])
        lab.before = guest_processes(lab.guest)
        lab.tracer = lab.attach()
        lab.after = guest_processes(lab.guest)
        yield lab
    finally:
        lab.close()


def test_snapshot_lists_the_processes_running_at_attach(lab):
    snap = lab.snapshot()
    # Processes that lived through the attach (in /proc before and after) are all there,
    # with the guest's own pid, parent, name, executable and arguments.
    # A zombie in the later listing (no exe) was exiting around the attach: busybox's
    # `timeout` leaves a watchdog child that exits within a second of its command.
    lasting = [p for pid, p in lab.before.items()
               if not p.kthread and pid in lab.after and lab.after[pid].comm == p.comm
               and lab.after[pid].exe == p.exe]
    assert {1, lab.sleeper} <= {p.pid for p in lasting}
    for p in lasting:
        r = snap.get(p.pid)
        assert r is not None, f"{p} missing from the snapshot"
        # A record leaves out what is unknown: a zombie has no exe and no arguments.
        assert (r["tid"], r["comm"], r["ppid"], r.get("exe")) == \
            (p.pid, p.comm, p.ppid, p.exe), (p, r)
        assert r.get("argv") == p.argv, (p, r)
        assert (r.get("cmdline") or "") == " ".join(p.argv or []), (p, r)
        assert r["action"] == "snapshot" and r.get("vcpu") is None
        assert r["class_uid"] == 1007 and r["activity_id"] == 99
        assert r["process_uid"] == f"{lab.tracer.ctx.vm_id}/{p.pid}/{r['task_start_ns']}"
        assert r["cr3"] and r["cr3"] % 4096 == 0
    sleeper = snap[lab.sleeper]
    assert (sleeper["comm"], sleeper["argv"]) == ("sleep", ["sleep", "1000"])
    assert snap[1]["comm"] == "init" and snap[1]["ppid"] == 0
    # Parents in the snapshot are named by the same process_uid their own record carries.
    for r in snap.values():
        if r["ppid"] in snap:
            assert r["parent_process_uid"] == snap[r["ppid"]]["process_uid"], r


def test_snapshot_has_no_kernel_threads(lab):
    snap = lab.snapshot()
    kthreads = {pid for pid, p in lab.before.items() if p.kthread}
    assert 2 in kthreads  # kthreadd: the guest does have kernel threads
    assert not kthreads & set(snap)
    losses = {r["counter"] for r in lab.records() if r["kind"] == "loss"}
    assert "snapshot_truncated" not in losses


def test_snapshot_process_continues_into_its_exit(lab):
    """The sleeper's exit (seen live) carries the process_uid its snapshot gave."""
    status, out = lab.guest.run(f"kill {lab.sleeper}")
    assert status == 0, out
    deadline = time.monotonic() + 60
    while True:
        exits = [r for r in lab.records() if r["event_type"] == "exit"
                 and r["pid"] == lab.sleeper]
        if exits or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert exits and exits[0]["signal"] == "SIGTERM"
    assert exits[0]["process_uid"] == lab.snapshot()[lab.sleeper]["process_uid"]


def _reader(lab, init_task_delta: int = 0) -> TaskReader:
    """A TaskReader over the guest's real memory, the task list head moved by
    `init_task_delta` bytes."""
    layout = lab.tracer.layout
    moved = dataclasses.replace(layout, symbols={
        **layout.symbols, "init_task": layout.symbols["init_task"] + init_task_delta})
    return TaskReader(moved, GuestMemory(RamFile(lab.guest.ram_path)), "vm")


def test_task_walk_bounds_on_real_memory(lab):
    cr3 = lab.tracer.layout.kernel_cr3
    reader = _reader(lab)
    tasks, ended = reader.task_list(cr3)
    assert ended == "complete" and len(tasks) == len(set(tasks))
    pids = {reader.info(cr3, t).pid for t in tasks}
    assert {1, 2} <= pids and 0 not in pids  # init and kthreadd; init_task itself is the head
    # The step limit stops the walk where it is.
    assert reader.task_list(cr3, max_steps=3) == (tasks[:3], "limit")
    # A head that is not on the list (init_task.tasks.prev read as a list_head) leads into
    # the real, circular list, which never comes back to it: a cycle, detected.
    init_task = lab.tracer.layout.address("init_task")
    cyc, ended = _reader(lab, 8).task_list(cr3)
    assert ended == "cycle" and init_task in cyc and len(cyc) > len(tasks) // 2
    # A head whose next is init_task's own group_leader pointer (init_task itself, not a
    # list_head): the "task" it leads to is not its own group leader.
    layout = lab.tracer.layout
    assert _reader(lab, layout.task["group_leader"] - layout.task["tasks"]).task_list(cr3) == \
        ([], "inconsistent")
    # A head in the never-mapped guard hole below the direct map: the first link is unreadable.
    hole = 0xFFFF_8000_0000_1000 - lab.tracer.layout.task["tasks"]
    assert _reader(lab, hole - init_task).task_list(cr3) == ([], "unreadable")


def test_snapshot_respects_the_pid_filter(lab):
    """Re-attached (the plugin reconnects) with --pid: only that process is listed."""
    lab.detach()
    # The lab's control channel: a long-lived shell (short-lived commands may be gone by now).
    pid = next(p for p, q in lab.after.items() if q.comm == "control")
    lab.attach(TraceOptions(filters=Filters(pids=frozenset({pid}))))
    assert set(lab.snapshot()) == {pid}
