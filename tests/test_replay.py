"""Recording a traced lab session and replaying it: `vmitrace replay` re-runs the collector on
the recording deterministically (byte-identical output twice) and reproduces the live records."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from guestlab import workloads as wl
from test_trace_support import TracedLab, arg, program_calls
from tracer.kvmi import abi
from tracer.kvmi.recording import RecordingReader

pytestmark = pytest.mark.guest
VMITRACE = str(Path(sys.executable).with_name("vmitrace"))
VOLATILE = ("time", "observer_host", "interval_start")
# In a KVMI_EVENT message: 8-byte header, kvmi_event's 8, the arch block's 8, then kvm_regs
# (16 general registers before rip).
EVENT_RIP_OFFSET = 8 + 8 + 8 + 16 * 8


def stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay")
    recording = out / "lab.kvmirec"
    # Memory through KVMI (not the RAM file), so the recording holds every read.
    lab = TracedLab("6.1", vcpus=1, record=str(recording), ram=False)
    try:
        pid, _, _ = lab.run_pid(wl.WORKLOAD_BINARIES["file"])
        live = lab.records()
    finally:
        lab.close()
    return recording, lab.profile.path, pid, live


def replay(recording: Path, profile: Path, out: Path) -> list[dict]:
    proc = subprocess.run([VMITRACE, "replay", str(recording), "--profile", str(profile),
                           "--sink", f"jsonl:{out}?format=raw"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "losses:" in proc.stderr  # the final loss summary
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_replay_is_deterministic_and_matches_live(recorded, tmp_path):
    recording, profile, pid, live = recorded
    first = replay(recording, profile, tmp_path / "a.jsonl")
    second = replay(recording, profile, tmp_path / "b.jsonl")
    assert second == first
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    ours = program_calls(first, pid, wl.WORKLOAD_BINARIES["file"])
    theirs = program_calls(live, pid, wl.WORKLOAD_BINARIES["file"])
    assert [stable(r) for r in ours] == [stable(r) for r in theirs]
    opened = next(r for r in ours if r["action"] == "openat" and r.get("mode") == wl.FILE_MODE)
    assert opened["path"] == wl.FILE_PATH and opened["ret"] == 3
    assert arg(opened, "flags")["value"] == "O_WRONLY|O_CREAT|O_TRUNC"
    # Replayed times come from the recording, not from the replay's clock.
    start = RecordingReader(recording).wallclock_ns
    assert all(start <= r["time"] <= start + 600 * 10**9 for r in first)


def test_replay_of_a_damaged_file_fails_cleanly(recorded, tmp_path):
    recording, profile, _, _ = recorded
    broken = tmp_path / "broken.kvmirec"
    broken.write_bytes(recording.read_bytes()[:50])
    proc = subprocess.run([VMITRACE, "replay", str(broken), "--profile", str(profile),
                           "--sink", f"jsonl:{tmp_path / 'x.jsonl'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot replay" in proc.stderr and "Traceback" not in proc.stderr


def test_entry_arguments_are_read_before_the_call_returns(recorded):
    """Entries run on without a reply (the host captures pt_regs and the current task with
    the event; tracer/monitors/syscalls.py) and are decoded before the call's exit is
    answered. In the recording, the command reading the file workload's path (its second
    openat: the page is mapped by then) comes after that call's entry event, which asked for
    no reply, and before any reply to an event that arrived after that entry: its exit's
    reply among them."""
    recording, _, _, _ = recorded
    path = wl.FILE_PATH.encode() + b"\0"
    stream = []  # (direction, message id, seq, kvmi_event.flags, rip of breakpoint events)
    path_reads = []
    for rec in RecordingReader(recording):
        msg_id, _size, seq = struct.unpack_from("<HHI", rec.raw)
        breakpoint_event = rec.direction == "in" and msg_id == abi.KVMI_EVENT and \
            rec.raw[12] == abi.KVMI_EVENT_BREAKPOINT
        rip = struct.unpack_from("<Q", rec.raw, EVENT_RIP_OFFSET)[0] if breakpoint_event else None
        stream.append((rec.direction, msg_id, seq, rec.raw[13] if breakpoint_event else 0, rip))
        if rec.direction == "in" and msg_id == abi.KVMI_READ_PHYSICAL and path in rec.raw:
            path_reads.append(seq)
    sites = {rip for *_, rip in stream if rip is not None}
    entry_site = min(r for r in sites if r + 5 in sites)  # `call do_syscall_64`, its return
    assert len(path_reads) >= 2, "the workload's path was read fewer than twice"
    read = next(i for i, (d, m, seq, _, _) in enumerate(stream)
                if d == "out" and m == abi.KVMI_READ_PHYSICAL and seq == path_reads[-1])
    entry = max(i for i, item in enumerate(stream[:read]) if item[4] == entry_site)
    assert stream[entry][3] & abi.VMITRACE_EVENT_NO_REPLY
    later = {seq: rip for d, m, seq, _, rip in stream[entry + 1:] if d == "in" and m == abi.KVMI_EVENT}
    replied = [(i, later[seq]) for i, (d, m, seq, _, _) in enumerate(stream)
               if i > entry and d == "out" and m == abi.KVMI_EVENT_REPLY and seq in later]
    assert replied and all(i > read for i, _ in replied)
    assert replied[0][1] == entry_site + 5  # the first of them: this call's exit
