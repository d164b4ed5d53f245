"""`vmitrace probe` against real hosts: a lab guest it boots itself, and a guest that
connects to the address it listens on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import guestlab
from tracer.cli import main

REPO = Path(__file__).resolve().parent.parent
PLUGIN_COMMANDS = {
    "KVMI_GET_VERSION", "KVMI_CHECK_COMMAND", "KVMI_CHECK_EVENT", "KVMI_GET_GUEST_INFO",
    "KVMI_GET_VCPU_INFO", "KVMI_PAUSE_VCPU", "KVMI_CONTROL_VM_EVENTS", "KVMI_CONTROL_EVENTS",
    "KVMI_CONTROL_CR", "KVMI_CONTROL_MSR", "KVMI_GET_REGISTERS", "KVMI_READ_PHYSICAL",
    "KVMI_WRITE_PHYSICAL", "KVMI_VCPU_TRANSLATE_GVA", "VMITRACE_SET_BREAKPOINT",
    "VMITRACE_CLEAR_BREAKPOINT", "VMITRACE_SET_DELIVERY", "VMITRACE_SET_BREAKPOINT_EX",
    "VMITRACE_SET_CAPTURE_TABLE", "VMITRACE_GET_VCPU_STATS",
}
PLUGIN_EVENTS = {
    "KVMI_EVENT_UNHOOK", "KVMI_EVENT_CR", "KVMI_EVENT_MSR", "KVMI_EVENT_BREAKPOINT",
    "KVMI_EVENT_HYPERCALL", "KVMI_EVENT_CREATE_VCPU", "KVMI_EVENT_PAUSE_VCPU",
}


def test_probe_needs_exactly_one_host_source():
    runner = CliRunner()
    assert runner.invoke(main, ["probe"]).exit_code == 2
    assert runner.invoke(main, ["probe", "--lab", "--listen", "unix:/tmp/x"]).exit_code == 2


def test_probe_lab_options_are_those_of_trace_and_demo():
    """--lab is a flag, the kernel series is --kernel 6.1|6.12, --vcpus is 1..4: bad values are
    usage errors before anything boots."""
    runner = CliRunner()
    for args in (["--lab", "6.12"], ["--lab", "--kernel", "5.10"], ["--lab", "--vcpus", "0"],
                 ["--lab", "--vcpus", "5"]):
        result = runner.invoke(main, ["probe", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Usage:" in result.output


@pytest.mark.guest
def test_probe_lab_reports_plugin_capabilities_and_counts(tmp_path):
    result = CliRunner().invoke(main, ["probe", "--lab", "--kernel", "6.1", "--duration", "4", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["handshake"]["name"].startswith("lab-6.1-")
    assert report["handshake"]["struct_size"] == 96
    assert report["version"] == 1
    assert {n for n, ok in report["commands"].items() if ok} == PLUGIN_COMMANDS
    assert {n for n, ok in report["events"].items() if ok} == PLUGIN_EVENTS
    assert report["vcpu_count"] == 1
    assert report["delivery"] == "non-blocking"
    # The steady workload runs processes: address-space switches are CR3 writes.
    assert report["event_counts"].get("KVMI_EVENT_CR", 0) > 0
    assert set(report["event_counts"]) <= PLUGIN_EVENTS
    # what delivering them cost the vCPU: non-blocking, so nothing waited
    [cost] = report["vcpu_cost"]
    assert cost["vcpu"] == 0 and cost["events"] >= sum(report["event_counts"].values())
    assert cost["waits"] == 0 and cost["wait_us"] == 0 and cost["event_us"] > 0


@pytest.mark.guest
def test_probe_listen_waits_for_a_host(tmp_path):
    sock = str(tmp_path / "kvmi.sock")
    probe = subprocess.Popen(
        [sys.executable, "-c", "from tracer.cli import main; main()", "probe", "--listen", f"unix:{sock}",
         "--duration", "3", "--blocking", "--timeout", "180"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert probe.poll() is None, probe.stderr.read()
            assert time.monotonic() < deadline, "probe never listened"
            time.sleep(0.1)
        assert os.stat(sock).st_mode & 0o777 == 0o600  # not world-writable
        with guestlab.Guest("6.12", vcpus=2, workload="steady",
                            plugin_options={"socket": sock}) as guest:
            out, err = probe.communicate(timeout=300)
            name = guest.name
            guest.run("true")  # the guest outlived its introspector
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    assert probe.returncode == 0, err
    assert f"host        {name!r}" in out
    assert "vcpus       2" in out
    assert ", blocking delivery" in out
    assert "VMITRACE_SET_BREAKPOINT" in out
    # blocking: each counted event waited for the probe's reply
    waited = [int(line.split(" events delivered, ")[1].split()[0])
              for line in out.splitlines() if line.startswith("  vCPU ")]
    assert len(waited) == 2 and sum(waited) > 0, out
