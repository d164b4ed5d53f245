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


def test_call_arguments_travel_in_the_events(recorded):
    """The file workload's openat entries and exits run on without a reply: the host copies
    pt_regs, the current task and, from its capture table, the path into the events
    (tracer/monitors/syscalls.py). The collector decodes the path from them and never reads
    it through READ_PHYSICAL; the records have it, and replaying the recording reproduces
    them (test_replay_is_deterministic_and_matches_live)."""
    recording, _, pid, live = recorded
    path = wl.FILE_PATH.encode() + b"\0"
    carried = {abi.VMITRACE_EVENT_NO_REPLY | abi.VMITRACE_EVENT_CAPTURED |
               abi.VMITRACE_EVENT_TABLE_CAPTURED}
    events_with_path, path_reads = [], 0
    for rec in RecordingReader(recording):
        msg_id, _size, _seq = struct.unpack_from("<HHI", rec.raw)
        if rec.direction == "in" and msg_id == abi.KVMI_EVENT and \
                rec.raw[12] == abi.KVMI_EVENT_BREAKPOINT and path in rec.raw:
            events_with_path.append(rec.raw[13])
        path_reads += rec.direction == "in" and msg_id == abi.KVMI_READ_PHYSICAL and \
            path in rec.raw
    # each openat: its entry (IN captures) and its exit (the IN ones again, for a retry)
    assert len(events_with_path) >= 4 and set(events_with_path) == carried, events_with_path
    assert path_reads == 0
    opens = [r for r in program_calls(live, pid, wl.WORKLOAD_BINARIES["file"])
             if r["action"] == "openat" and r.get("path") == wl.FILE_PATH]
    assert len(opens) == 2 and opens[0]["ret"] == 3
