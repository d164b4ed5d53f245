"""`vmitrace trace --lab` as a user runs it: filters, a JSONL sink, a clean stop on SIGINT with
the final loss summary on stderr, and clear errors for bad input."""
from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guestlab import workloads as wl

VMITRACE = str(Path(sys.executable).with_name("vmitrace"))


@pytest.mark.guest
def test_trace_lab_filtered_to_jsonl_stops_cleanly_on_sigint(tmp_path):
    out = tmp_path / "trace.jsonl"
    proc = subprocess.Popen([VMITRACE, "trace", "--lab", "--vcpus", "2", "--workload", "steady",
                             "--comm", wl.WORKLOAD_COMMS["file"], "--syscall", "openat",
                             "--syscall", "write", "--sink", f"jsonl:{out}?format=raw"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 300
        while not any("is up" in line for line in stderr):
            assert time.monotonic() < deadline, "".join(stderr)
            assert proc.poll() is None, "".join(stderr) + proc.stderr.read()
            if sel.select(timeout=1):
                stderr.append(proc.stderr.readline())
        time.sleep(12)  # several rounds of the steady workload
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr.append(rest)
    text = "".join(stderr)
    assert proc.returncode == 0, text
    assert "SIGINT: stopping" in text and "losses:" in text and "Traceback" not in text
    records = [json.loads(line) for line in out.read_text().splitlines()]
    calls = [r for r in records if r["kind"] == "syscall"]
    assert calls and {r["comm"] for r in calls} == {wl.WORKLOAD_COMMS["file"]}
    assert {r["action"] for r in calls} == {"openat", "write"}
    opened = [r for r in calls if r["action"] == "openat" and r.get("mode") == wl.FILE_MODE]
    assert opened and all(r["path"] == wl.FILE_PATH and r["ret"] == 3 for r in opened)
    assert all(r["ret"] == wl.FILE_BYTES for r in calls if r["action"] == "write")
    lifecycle = [r for r in records if r["kind"] == "process"]
    assert lifecycle and all(r["comm"] == wl.WORKLOAD_COMMS["file"] or r["event_type"] == "start"
                             for r in lifecycle)
    assert [r for r in records if r["kind"] == "loss"]  # periodic and/or final counters


def test_trace_needs_exactly_one_source():
    proc = subprocess.run([VMITRACE, "trace"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "exactly one of --lab or --listen" in proc.stderr


def test_trace_bad_profile_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    proc = subprocess.run([VMITRACE, "trace", "--listen", f"unix:{tmp_path}/k.sock",
                           "--profile", str(bogus)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot load profile" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trace_bad_sink_is_a_clear_error(tmp_path):
    from guestlab import build
    from tracer.trace_cli import profile_for_image
    profile = profile_for_image(build.ensure("6.1", refresh=False).vmlinuz)
    proc = subprocess.run([VMITRACE, "trace", "--listen", f"unix:{tmp_path}/k.sock",
                           "--profile", str(profile), "--sink", "nosuch:thing"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot open sink" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_replay_missing_profile_option():
    proc = subprocess.run([VMITRACE, "replay", "/nonexistent.kvmirec"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2


def seen_vms(path: Path) -> set[str]:
    """Names of the VMs with an openat record in a JSONL file being written."""
    if not path.exists():
        return set()
    names = set()
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record.get("action") == "openat":
            names.add(record.get("vm_name"))
    return names


@pytest.mark.guest
def test_trace_listen_two_vms_each_with_its_own_profile(tmp_path):
    """Two KVMI hosts of different kernels connect on their own (not --lab); --profile auto
    builds each VM's profile from its own memory; records say which VM they come from."""
    from guestlab.guest import Guest

    out = tmp_path / "listen.jsonl"
    sock = tmp_path / "kvmi.sock"
    proc = subprocess.Popen([VMITRACE, "trace", "--listen", f"unix:{sock}", "--profile", "auto",
                             "--duration", "90", "--comm", wl.WORKLOAD_COMMS["enoent"],
                             "--sink", f"jsonl:{out}?format=raw"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        with Guest(kernel="6.1", vcpus=1, plugin_options={"socket": str(sock)}) as old, \
                Guest(kernel="6.12", vcpus=1, plugin_options={"socket": str(sock)}) as new:
            names = {old.name, new.name}
            deadline = time.monotonic() + 150  # each VM's profile is built from its memory
            while time.monotonic() < deadline and seen_vms(out) != names:
                old.run(wl.WORKLOAD_BINARIES["enoent"])
                new.run(wl.WORKLOAD_BINARIES["enoent"])
                time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "SIGTERM: stopping" in stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [r for r in records if r["kind"] == "syscall" and r["action"] == "openat"]
    assert {r["vm_name"] for r in failed} == names, stderr
    assert all(r["path"] == wl.ENOENT_PATH and r["errno"] == "ENOENT" for r in failed)
    assert len({r["vm_id"] for r in failed}) == 2
