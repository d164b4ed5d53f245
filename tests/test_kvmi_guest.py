"""The KVMI client on real traffic: a lab guest's plugin host, recorded live, then replayed.

One guest boot (QEMU TCG + vmitrace's plugin). The same client function runs against the
live VM and against the ReplayHost serving the recording; everything it observes (events,
registers, memory) must be identical, which is what forensic replay relies on.
"""
from __future__ import annotations

import os

import pytest

from guestlab.guest import Guest
from tracer.kvmi import (ConnectionClosed, Listener, RecordingReader, RecordingWriter,
                         ReplayHost, Session, abi)

pytestmark = pytest.mark.guest

MSR_LSTAR = 0xC0000082
N_EVENTS = 120


def observe(s: Session) -> list:
    """Pause, read state, trace CR3 writes, then stop; returns all observations."""
    seen: list = []
    s.pause_vcpu(0)
    ev = s.next_event(timeout=60)
    seen.append((ev.name, ev.seq, ev.regs.rip, ev.sregs.cr3))
    regs = s.get_registers(0, msrs=[MSR_LSTAR])
    lstar = regs.msrs[MSR_LSTAR]
    seen.append(("regs", regs.mode, regs.regs.rip, regs.sregs.cr3, lstar))
    gpa = s.translate_gva(0, lstar)
    seen.append(("entry", gpa, s.read_physical(gpa, 64)))
    s.control_events(0, abi.KVMI_EVENT_CR, True)
    s.control_cr(0, 3, True)
    s.reply(ev)
    for _ in range(N_EVENTS):
        ev = s.next_event(timeout=60)
        seen.append((ev.name, ev.seq, ev.vcpu, ev.values(), ev.regs.rip, ev.arch.msrs.lstar))
        s.reply(ev)
    s.control_cr(0, 3, False)
    try:  # CR3 events already in flight when tracing stopped
        while (ev := s.next_event(timeout=2)) is not None:
            seen.append((ev.name, ev.seq, ev.vcpu, ev.values(), ev.regs.rip, ev.arch.msrs.lstar))
            s.reply(ev)
    except ConnectionClosed:
        pass  # the replay host hangs up at the end of the recording
    assert s.unanswered() == []
    return seen


def test_live_session_replays_identically(tmp_path) -> None:
    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    sock = tmp_path / "kvmi.sock"
    with Listener(f"unix:{sock}", recorder_factory=RecordingWriter.factory(rec_dir)) as lst:
        with Guest(kernel="6.1", vcpus=1, plugin_options={"socket": str(sock)},
                   workload="steady") as guest:
            s = lst.accept(timeout=120)
            assert s is not None and (s.uuid, s.name) == (guest.uuid, guest.name)
            live = observe(s)
            s.close()
    (name,) = os.listdir(rec_dir)
    path = rec_dir / name
    # what was observed is real: CR3 writes with kernel entry points and a 64-bit guest
    crs = [x for x in live if x[0] == "KVMI_EVENT_CR"]
    assert len(crs) >= N_EVENTS
    assert all(x[3]["cr"] == 3 and x[3]["new_value"] & 0xFFF == 0 for x in crs)
    assert live[1][1] == 8 and live[1][4] >= 0xFFFFFFFF80000000
    assert live[2][2][:3] == b"\x0f\x01\xf8"  # swapgs: first instruction of entry_SYSCALL_64

    reader = RecordingReader(path)
    assert (reader.uuid, reader.name) == (guest.uuid, guest.name)
    host = ReplayHost(reader)
    replayed = observe(Session.from_socket(host.socketpair(), handshake_timeout=30))
    assert replayed == live
    assert host.unmatched_commands == 0 and host.error is None
