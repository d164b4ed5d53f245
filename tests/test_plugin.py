"""The QEMU KVMI host plugin against real lab guests and the project's own KVMI client.

Each configuration boots one guest (module scope) whose plugin connects to a
tracer.kvmi Listener. The plugin holds every vCPU at its first instruction
(``hold=on``) until the CREATE_VCPU event is answered, so the boot-time LSTAR
write is observed. An event pump thread answers every event (CONTINUE unless a
test's handler decides otherwise) and records what it saw.
"""
from __future__ import annotations

import collections
import hashlib
import os
import socket
import struct
import tempfile
import threading
import time
from typing import Any, Callable

import pytest

import guestlab
from guestlab import workloads
from tracer.kvmi import abi
from tracer.kvmi.errors import (ConnectionClosed, KvmEINVAL, KvmENOENT, KvmEOPNOTSUPP)
from tracer.kvmi.events import PointerCapture
from tracer.kvmi.transport import Listener, Session
from tracer.monitors.syscalls import find_call_site

pytestmark = pytest.mark.guest

MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
EFER_LMA = 1 << 10
KERNEL_TEXT_LINK_ADDRESS = 0xFFFFFFFF81000000  # x86-64 default (CONFIG_PHYSICAL_START 16M)
KASLR_ALIGN = 2 << 20
KERNEL_HALF = 0xFFFF800000000000
AT_FDCWD_32 = 0xFFFFFF9C
EVENT_WAIT = 60.0  # generous: TCG on a loaded 2-core machine
SECRET = "plugin-test-cookie"  # the plugin checks the introspector's SHA-1 of it

# What the plugin implements (docs/qemu-kvmi-plugin.md); everything else must be refused.
SUPPORTED_COMMANDS = {
    abi.KVMI_GET_VERSION, abi.KVMI_CHECK_COMMAND, abi.KVMI_CHECK_EVENT,
    abi.KVMI_GET_GUEST_INFO, abi.KVMI_GET_VCPU_INFO, abi.KVMI_PAUSE_VCPU,
    abi.KVMI_CONTROL_VM_EVENTS, abi.KVMI_CONTROL_EVENTS, abi.KVMI_CONTROL_CR,
    abi.KVMI_CONTROL_MSR, abi.KVMI_GET_REGISTERS, abi.KVMI_READ_PHYSICAL,
    abi.KVMI_WRITE_PHYSICAL, abi.KVMI_VCPU_TRANSLATE_GVA,
    abi.VMITRACE_SET_BREAKPOINT, abi.VMITRACE_CLEAR_BREAKPOINT, abi.VMITRACE_SET_DELIVERY,
    abi.VMITRACE_SET_BREAKPOINT_EX, abi.VMITRACE_SET_CAPTURE_TABLE, abi.VMITRACE_GET_VCPU_STATS,
}
SUPPORTED_EVENTS = {
    abi.KVMI_EVENT_UNHOOK, abi.KVMI_EVENT_CR, abi.KVMI_EVENT_MSR, abi.KVMI_EVENT_BREAKPOINT,
    abi.KVMI_EVENT_HYPERCALL, abi.KVMI_EVENT_CREATE_VCPU, abi.KVMI_EVENT_PAUSE_VCPU,
}

Handler = Callable[[Session, Any], "int | None"]


class Lab:
    """A booted guest whose plugin is connected to a Listener, with an event pump."""

    def __init__(self, kernel: str, vcpus: int, max_vcpus: int | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="vmitrace-plugin-test-")
        self.socket_path = os.path.join(self.dir, "kvmi.sock")
        self.listener = Listener("unix:" + self.socket_path, secret=SECRET.encode())
        self.vcpus = vcpus
        self.events: list[Any] = []
        self.cv = threading.Condition()
        self.handler: Handler | None = None
        self.session: Session | None = None
        self.pump_thread: threading.Thread | None = None
        self.started_wall = time.time()
        self.guest = guestlab.Guest(
            kernel, vcpus=vcpus, max_vcpus=max_vcpus,
            # A reply timeout far beyond any test wait: a guest that resumes after an
            # introspector vanished did so because the plugin noticed, not by timing out.
            plugin_options={"socket": self.socket_path, "hold": True, "reconnect": True,
                            "reply_timeout_ms": 600000, "cookie": SECRET})
        self.handler_errors: list[BaseException] = []
        self.guest.start()
        try:
            self.attach(boot=True)
            self.guest.wait_ready(self.guest.boot_timeout)
        except BaseException:
            self.close()
            raise

    # -- session and pump -------------------------------------------------------------------
    def attach(self, boot: bool = False) -> Session:
        session = self.listener.accept(timeout=120)
        assert session is not None, "the plugin did not connect"
        self.session = session
        self.pump_thread = threading.Thread(target=self._pump, args=(session, boot), daemon=True)
        self.pump_thread.start()
        return session

    def _pump(self, session: Session, boot: bool) -> None:
        while True:
            try:
                event = session.next_event(0.5)
            except ConnectionClosed:
                return
            if event is None:
                continue
            if boot and event.event_id == abi.KVMI_EVENT_CREATE_VCPU:
                # Set-up while the vCPU is held: see the kernel's LSTAR write.
                session.control_events(event.vcpu, abi.KVMI_EVENT_MSR, True)
                session.control_msr(event.vcpu, MSR_LSTAR, True)
            action = abi.KVMI_EVENT_ACTION_CONTINUE
            handler = self.handler
            if handler is not None:
                try:
                    decided = handler(session, event)
                except ConnectionClosed:
                    return
                except Exception as exc:  # keep answering: a stuck vCPU would hide it
                    self.handler_errors.append(exc)
                    decided = None
                if decided == -1:  # the handler closed the session instead of replying
                    with self.cv:
                        self.events.append(event)
                        self.cv.notify_all()
                    return
                if decided is not None:
                    action = decided
            with self.cv:
                self.events.append(event)
                self.cv.notify_all()
            try:
                session.reply(event, action)
            except ConnectionClosed:
                return

    def mark(self) -> int:
        with self.cv:
            return len(self.events)

    def since(self, mark: int, event_id: int | None = None) -> list[Any]:
        with self.cv:
            return [e for e in self.events[mark:] if event_id is None or e.event_id == event_id]

    def wait_for(self, predicate: Callable[[Any], bool], mark: int,
                 timeout: float = EVENT_WAIT) -> Any:
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for e in self.events[mark:]:
                    if predicate(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected event did not arrive (handler errors: "
                                         f"{self.handler_errors})")
                self.cv.wait(left)

    # -- guest helpers ----------------------------------------------------------------------
    def run_ok(self, command: str) -> str:
        status, output = self.guest.run(command)
        assert status == 0, (command, status, output)
        return output

    def symbols(self, *names: str) -> dict[str, int]:
        pattern = "|".join(names)
        out = self.run_ok(f"grep -E ' ({pattern})$' /proc/kallsyms")
        found = {}
        for line in out.splitlines():
            address, _kind, name = line.split()[:3]
            found[name] = int(address, 16)
        assert set(names) <= set(found), out
        return found

    def close(self) -> None:
        self.guest.stop()
        if self.session is not None:
            self.session.close()
        self.listener.close()


@pytest.fixture(scope="module", params=[("6.1", 1), ("6.12", 2)], ids=["6.1-1vcpu", "6.12-2vcpu"])
def lab(request):
    kernel, vcpus = request.param
    lab = Lab(kernel, vcpus)
    try:
        yield lab
    finally:
        lab.close()
    assert not lab.handler_errors, lab.handler_errors


# -- handshake and VM-wide commands -----------------------------------------------------------

def test_handshake_fields(lab):
    s = lab.session
    assert s.name == lab.guest.name
    assert s.uuid == lab.guest.uuid
    assert abs(s.start_time - lab.started_wall) < 600  # seconds since the epoch, at QEMU start


def test_version_guest_and_vcpu_info(lab):
    s = lab.session
    assert s.get_version().version == 1
    assert s.get_guest_info().vcpu_count == lab.vcpus
    for vcpu in range(lab.vcpus):
        assert s.get_vcpu_info(vcpu).tsc_speed == 0  # unknown under TCG
    with pytest.raises(KvmEINVAL):
        s.get_vcpu_info(lab.vcpus)


def test_check_command_and_check_event_tell_the_truth(lab):
    s = lab.session
    for command in list(range(64)) + list(range(0x7F00, 0x7F08)):
        assert s.check_command(command) == (command in SUPPORTED_COMMANDS), command
    for event in range(16):
        assert s.check_event(event) == (event in SUPPORTED_EVENTS), event


def test_unsupported_commands_answer_eopnotsupp(lab):
    s = lab.session
    with pytest.raises(KvmEOPNOTSUPP):
        s.get_cpuid(0, 0)
    with pytest.raises(KvmEOPNOTSUPP):
        s.inject_exception(0, 3)
    with pytest.raises(KvmEOPNOTSUPP):
        s.set_registers(0, {f: 0 for f in abi.KVM_REGS.tuple._fields})
    with pytest.raises(KvmEOPNOTSUPP):
        s.get_xsave(0)
    with pytest.raises(KvmEOPNOTSUPP):
        s.request(0x7F00)  # an unknown vendor id
    # Known events the plugin cannot produce are refused, unknown ones are invalid.
    with pytest.raises(KvmEOPNOTSUPP):
        s.control_events(0, abi.KVMI_EVENT_PF, True)
    with pytest.raises(KvmEINVAL):
        s.control_cr(0, 2, True)  # only CR0, CR3, CR4 are reported
    with pytest.raises(KvmEINVAL):
        s.control_msr(0, 0x40000000, True)  # outside the two architectural MSR ranges


# -- boot: LSTAR, KASLR slide, banner ----------------------------------------------------------

def test_lstar_write_at_boot_is_entry_syscall_64_plus_slide(lab):
    syms = lab.symbols("entry_SYSCALL_64", "linux_banner", "_text")
    slide = syms["_text"] - KERNEL_TEXT_LINK_ADDRESS
    assert slide % KASLR_ALIGN == 0
    lstar_writes = [e for e in lab.since(0, abi.KVMI_EVENT_MSR) if e.msr == MSR_LSTAR]
    assert sorted({e.vcpu for e in lstar_writes}) == list(range(lab.vcpus))
    for event in lstar_writes:
        assert event.new_value == syms["entry_SYSCALL_64"]
        assert event.arch.regs.rip >= KERNEL_HALF  # written by kernel code
        assert event.arch.sregs.cs.selector & 3 == 0
    # The slide is real: the banner sits at its kallsyms address in this guest's memory.
    s = lab.session
    gpa = s.translate_gva(0, syms["linux_banner"])
    banner = s.read_physical(gpa, 128)
    assert banner.startswith(b"Linux version " + lab.guest.release.encode() + b" ")
    # And the host's page walk agrees with the plugin's.
    regs = s.get_registers(0, msrs=[MSR_LSTAR, MSR_EFER, MSR_STAR])
    assert regs.msrs[MSR_LSTAR] == syms["entry_SYSCALL_64"]
    assert regs.msrs[MSR_EFER] & EFER_LMA
    assert regs.mode == 8


def test_halted_vcpu_answers_from_its_state_at_hlt(lab):
    # An idle guest's vCPUs sit in the kernel's idle loop after `hlt`: commands for them are
    # answered from the state captured when they halted, without waiting for a wake-up.
    s = lab.session
    halted = []
    for _ in range(50):
        for vcpu in range(lab.vcpus):
            regs = s.get_registers(vcpu)
            rip = regs.regs.rip
            gpa = s.translate_gva(vcpu, rip - 1)
            if rip >= KERNEL_HALF and gpa != 2**64 - 1 and s.read_physical(gpa, 1) == b"\xf4":
                halted.append((vcpu, regs))
        if halted:
            break
        time.sleep(0.1)
    assert halted, "no vCPU was ever seen halted"
    vcpu, regs = halted[0]
    assert regs.sregs.cs.selector & 3 == 0 and regs.mode == 8


def test_get_registers_refuses_msrs_it_cannot_read(lab):
    with pytest.raises(KvmEINVAL):
        lab.session.get_registers(0, msrs=[0x10])  # TSC: never written by the guest


def test_read_and_write_physical_bounds(lab):
    s = lab.session
    syms = lab.symbols("linux_banner")
    gpa = s.translate_gva(0, syms["linux_banner"])
    original = s.read_physical(gpa, 64)
    s.write_physical(gpa, original)  # same bytes back: guest unchanged, path exercised
    assert s.read_physical(gpa, 64) == original
    ram_size = lab.guest.memory_mb << 20
    with pytest.raises(KvmENOENT):
        s.read_physical(ram_size, 16)
    with pytest.raises(KvmENOENT):
        s.write_physical(ram_size - 8, bytes(16))


# -- CR3 writes while processes run -------------------------------------------------------------

def test_cr3_events_page_aligned_while_processes_run(lab):
    s = lab.session
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_CR, True)
        s.control_cr(vcpu, 3, True)
    mark = lab.mark()
    try:
        lab.run_ok(f"{workloads.WORKLOAD_DRIVER} exec")
        lab.run_ok("ls / > /dev/null; cat /proc/version > /dev/null")
    finally:
        for vcpu in range(lab.vcpus):
            s.control_cr(vcpu, 3, False)
    events = lab.since(mark, abi.KVMI_EVENT_CR)
    assert len(events) >= 10
    for e in events:
        assert e.cr == 3
        assert e.new_value & 0xFFF == 0, hex(e.new_value)
        assert e.new_value != e.old_value
        assert e.arch.sregs.cr3 == e.old_value  # arch state is taken before the write
    assert len({e.new_value for e in events}) >= 2
    # Disabled: no more CR events (after one command to let events already in flight land).
    lab.run_ok("true")
    after = lab.mark()
    lab.run_ok("ls / > /dev/null")
    assert lab.since(after, abi.KVMI_EVENT_CR) == []


# -- instrumentation breakpoints ---------------------------------------------------------------

def test_breakpoint_on_kernel_function_fires_with_plausible_registers(lab):
    s = lab.session
    syms = lab.symbols("do_sys_openat2", "do_filp_open")
    target, nested = syms["do_sys_openat2"], syms["do_filp_open"]
    path = "/proc/version"
    filenames: dict[int, bytes] = {}
    live_regs: dict[int, Any] = {}

    def read_filename(session: Session, event: Any) -> None:
        # While the vCPU waits for our reply, commands for it are served on it, and a
        # breakpoint set now cannot deadlock against the stopped vCPU.
        if event.event_id == abi.KVMI_EVENT_BREAKPOINT and event.arch.regs.rip == target:
            session.set_breakpoint(nested)
            live = session.get_registers(event.vcpu)
            live_regs[event.seq] = (live.regs, live.sregs.cr3, live.mode)
            gva = event.arch.regs.rsi
            gpa = session.translate_gva(event.vcpu, gva)
            if gpa != 2**64 - 1:
                room = 4096 - (gpa & 0xFFF)
                raw = session.read_physical(gpa, min(64, room))
                filenames[event.seq] = raw.split(b"\0")[0]
        return None

    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    lab.handler = read_filename
    mark = lab.mark()
    s.set_breakpoint(target)
    try:
        lab.run_ok(f"cat {path}")
        hit = lab.wait_for(lambda e: e.seq in filenames and filenames[e.seq] == path.encode(),
                           mark)
        lab.run_ok(f"cat {path}")
        inner = lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_BREAKPOINT
                             and e.arch.regs.rip == nested, mark)
    finally:
        lab.handler = None
        s.clear_breakpoint(target)
        s.clear_breakpoint(nested)
    assert inner.arch.sregs.cs.selector & 3 == 0
    regs, sregs = hit.arch.regs, hit.arch.sregs
    assert regs.rip == target
    assert hit.gpa == s.translate_gva(hit.vcpu, target)
    assert 1 <= hit.insn_len <= 15
    assert regs.rdi & 0xFFFFFFFF == AT_FDCWD_32  # dfd of open(2) via openat
    assert regs.rsi < KERNEL_HALF  # the user's filename pointer
    assert regs.rsp >= KERNEL_HALF  # on the kernel stack
    assert sregs.cs.selector & 3 == 0 and hit.arch.mode == 8
    assert sregs.cr3 != 0 and sregs.efer & EFER_LMA
    # GET_REGISTERS on the stopped vCPU sees exactly the event's state.
    assert live_regs[hit.seq] == (regs, sregs.cr3, hit.arch.mode)
    assert hit.arch.msrs.lstar == lab.symbols("entry_SYSCALL_64")["entry_SYSCALL_64"]
    # Cleared: the function runs on without events.
    after = lab.mark()
    lab.run_ok(f"cat {path}")
    assert [e for e in lab.since(after, abi.KVMI_EVENT_BREAKPOINT)
            if e.arch.regs.rip in (target, nested)] == []


def test_breakpoint_set_in_an_event_applies_when_its_vcpu_runs_on(lab):
    # A breakpoint set while a vCPU waits in an event applies as soon as that vCPU runs on
    # (the vCPU leaving the event issues the translation flush it needs): the very openat
    # that hit do_sys_openat2 also hits do_filp_open, which it calls (translated before,
    # without the breakpoint).
    s = lab.session
    syms = lab.symbols("do_sys_openat2", "do_filp_open")
    target, nested = syms["do_sys_openat2"], syms["do_filp_open"]
    outer: list[Any] = []

    def set_nested(session: Session, event: Any) -> None:
        if event.event_id == abi.KVMI_EVENT_BREAKPOINT and event.arch.regs.rip == target \
                and not outer:
            session.set_breakpoint(nested)
            outer.append(event)
        return None

    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    s.set_breakpoint(target)
    lab.run_ok("cat /proc/version")  # runs do_filp_open after the flush for the target
    lab.handler = set_nested
    mark = lab.mark()
    try:
        lab.run_ok("cat /proc/version")
        lab.wait_for(lambda e: bool(outer) and e.vcpu == outer[0].vcpu
                     and e.arch.regs.rip == nested, mark)
    finally:
        lab.handler = None
        s.clear_breakpoint(target)
        s.clear_breakpoint(nested)
    hits = [e for e in lab.since(mark, abi.KVMI_EVENT_BREAKPOINT) if e.vcpu == outer[0].vcpu]
    following = hits[hits.index(outer[0]) + 1]
    assert following.arch.regs.rip == nested
    assert following.arch.sregs.cr3 == outer[0].arch.sregs.cr3
    assert following.arch.regs.rsp >> 14 == outer[0].arch.regs.rsp >> 14  # same kernel stack


def current_task_offset(lab: Lab) -> int:
    """Per-CPU offset of the current task pointer (6.12: first member of pcpu_hot)."""
    out = lab.run_ok("grep -E ' (current_task|pcpu_hot)$' /proc/kallsyms")
    return int(out.split()[0], 16)


def test_run_on_breakpoint_with_captures_waits_only_on_chosen_values(lab):
    s = lab.session
    target = lab.symbols("do_sys_openat2")["do_sys_openat2"]
    current = current_task_offset(lab)
    path = b"/proc/version"
    captures = ((abi.VMITRACE_CAPTURE_GS_BASE, current, 8),  # the current task
                (6, 0, len(path)))                             # rsi: the user's filename
    REG_RDI = 7
    current_at_hit: dict[int, int] = {}

    def read_current(session: Session, event: Any) -> None:
        if event.event_id == abi.KVMI_EVENT_BREAKPOINT and event.blocking and \
                event.arch.regs.rip == target:  # still stopped: read it ourselves
            gpa = session.translate_gva(event.vcpu, event.arch.sregs.gs.base + current)
            current_at_hit[event.seq] = int.from_bytes(session.read_physical(gpa, 8), "little")
        return None

    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    lab.handler = read_current
    try:
        # dfd (rdi) is AT_FDCWD for cat's openat: these hits wait for their reply...
        s.set_breakpoint_ex(target, True, REG_RDI, [1, AT_FDCWD_32], captures)
        mark = lab.mark()
        lab.run_ok(f"cat {path.decode()}")
        waited = lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_BREAKPOINT and
                              e.captured is not None and e.captured[1] == path, mark)
        # ... and now none does: the vCPU runs on, the event still carries the captures.
        s.set_breakpoint_ex(target, True, REG_RDI, [1], captures)
        mark = lab.mark()
        lab.run_ok(f"cat {path.decode()}")
        ran_on = lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_BREAKPOINT and
                              e.captured is not None and e.captured[1] == path, mark)
        # An unreadable capture comes back empty, the event still arrives.
        s.set_breakpoint_ex(target, True, REG_RDI, [], ((REG_RDI, 0, 8),))
        mark = lab.mark()
        lab.run_ok(f"cat {path.decode()}")
        unreadable = lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_BREAKPOINT and
                                  e.arch.regs.rip == target, mark)
    finally:
        lab.handler = None
        s.clear_breakpoint(target)
    assert waited.blocking and not ran_on.blocking and not unreadable.blocking
    task = int.from_bytes(waited.captured[0], "little")
    assert task == current_at_hit[waited.seq] and task >= KERNEL_HALF
    assert int.from_bytes(ran_on.captured[0], "little") >= KERNEL_HALF
    assert ran_on.arch.regs.rip == target and ran_on.gpa == s.translate_gva(ran_on.vcpu, target)
    assert unreadable.captured == (b"", b"")  # rdi held AT_FDCWD: nothing maps it
    # Cleared: no more events from it.
    after = lab.mark()
    lab.run_ok(f"cat {path.decode()}")
    assert not [e for e in lab.since(after, abi.KVMI_EVENT_BREAKPOINT) if e.arch.regs.rip == target]


def test_run_on_breakpoint_waits_on_a_captured_value(lab):
    """The value a run-on hit checks can be a word of its first capture, and the values a
    512-bit set: do_sys_openat2's third argument (rdx) points at the kernel's struct open_how
    {flags, mode, resolve}; cat's open has mode 0."""
    s = lab.session
    target = lab.symbols("do_sys_openat2")["do_sys_openat2"]
    path = b"/proc/version"
    REG_RDX, REG_RSI, REG_RDI, MODE_WORD = 2, 6, 7, 1
    how = ((REG_RDX, 0, 24), (REG_RSI, 0, len(path)))
    from_capture = abi.VMITRACE_BLOCK_FROM_CAPTURE
    bitmap = from_capture | abi.VMITRACE_BLOCK_BITMAP
    cases = [  # (captures, values, flags, whether cat's open waits)
        (how, abi.block_bitmap([0, 511]), bitmap, True),
        (how, abi.block_bitmap([1, 0o644]), bitmap, False),
        (how, [0o600, 0], from_capture, True),
        (how, [0o600], from_capture, False),
        # an unreadable first capture (rdi is AT_FDCWD) waits whatever the values
        (((REG_RDI, 0, 8), how[1]), [], from_capture, True),
    ]
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    hits = []
    try:
        for captures, values, flags, _ in cases:
            s.set_breakpoint_ex(target, True, MODE_WORD if captures is how else 0, values,
                                captures, flags)
            mark = lab.mark()
            lab.run_ok(f"cat {path.decode()}")
            hits.append(lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_BREAKPOINT and
                                     e.captured is not None and e.captured[1] == path, mark))
    finally:
        s.clear_breakpoint(target)
    assert [hit.blocking for hit in hits] == [waits for *_, waits in cases]
    flags, mode, resolve = struct.unpack("<QQQ", hits[0].captured[0])
    assert flags & 3 == 0 and mode == 0 and resolve == 0  # O_RDONLY
    assert hits[-1].captured[0] == b""


def test_run_on_exit_waits_where_the_return_was_redirected(lab):
    """VMITRACE_BLOCK_WORDS_DIFFER at the syscall return: pt_regs ip equals cx (both the
    SYSCALL return address) except where the kernel redirected the return. A shell that
    signals itself with a handler set returns from some call (kill's, or the one that
    unblocks the signal) into the handler's frame: that exit waits, ordinary ones run on."""
    s = lab.session
    _, exit_site = syscall_sites(lab)
    W_CX, W_IP = 11, 16
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    mark = lab.mark()
    try:
        s.set_breakpoint_ex(exit_site, True, 0, [], [PT_REGS],
                            abi.VMITRACE_BLOCK_WORDS_DIFFER, (W_IP, W_CX))
        out = lab.run_ok("sh -c 'trap \"echo handled\" USR1; kill -USR1 $$'")
        lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_BREAKPOINT and
                     e.arch.regs.rip == exit_site and bool(e.captured and e.captured[0]) and
                     pt_regs(e)[W_IP] != pt_regs(e)[W_CX],
                     mark)
    finally:
        s.clear_breakpoint(exit_site)
    assert "handled" in out
    exits = [e for e in lab.since(mark, abi.KVMI_EVENT_BREAKPOINT)
             if e.arch.regs.rip == exit_site and e.captured and e.captured[0]]
    redirected = [e for e in exits if pt_regs(e)[W_IP] != pt_regs(e)[W_CX]]
    ordinary = [e for e in exits if pt_regs(e)[W_IP] == pt_regs(e)[W_CX]]
    assert redirected and all(e.blocking for e in redirected)
    assert ordinary and not any(e.blocking for e in ordinary)


@pytest.mark.parametrize("payload", [
    struct.pack("<QBBB5x", 0x1000, 1, 0, 0),                                  # short
    struct.pack("<QBBB5xBxHiBxHi", 0x1000, 2, 0, 0, 0xFF, 0, 0, 0xFF, 0, 0),  # run_on 2
    struct.pack("<QBBB5xBxHiBxHi", 0x1000, 1, 16, 0, 0xFF, 0, 0, 0xFF, 0, 0),  # no register 16
    struct.pack("<QBBB5xBxHiBxHi", 0x1000, 1, 0, 17, 0xFF, 0, 0, 0xFF, 0, 0),  # 17 values
    struct.pack("<QBBB5xBxHiBxHiI", 0x1000, 1, 0, 2, 0xFF, 0, 0, 0xFF, 0, 0, 1),  # 1 of 2 values
    struct.pack("<QBBB5xBxHiBxHi", 0x1000, 1, 0, 0, 4, 0, 0, 0xFF, 0, 0),     # empty capture
    struct.pack("<QBBB5xBxHiBxHi", 0x1000, 1, 0, 0, 4, 257, 0, 0xFF, 0, 0),   # capture too long
    struct.pack("<QBBB5xBxHiBxHi", 0x1000, 1, 0, 0, 17, 8, 0, 0xFF, 0, 0),    # no base 17
    struct.pack("<QBBB4xBBxHiBxHi", 0x1000, 1, 0, 0, 1, 0xFF, 0, 0, 0xFF, 0, 0),  # padding
    struct.pack("<QBBBB4xBxHiBxHi", 0x1000, 1, 0, 0, 16, 0xFF, 0, 0, 0xFF, 0, 0),  # flag 16
    struct.pack("<QBBBB4xBxHiBxHi", 0x1000, 1, 0, 0, 8, 0xFF, 0, 0, 0xFF, 0, 0),
    # ^ DIFFER_REVERSED without a bitmap and differ_words; below: with them, 16 values
    struct.pack("<QBBBBBB2xBxHiBxHi16I", 0x1000, 1, 15, 16, 15, 16, 11, 4, 168, 0, 0xFF, 0,
                0, *range(16)),
    struct.pack("<QBBBB4xBxHiBxHi32I", 0x1000, 1, 0, 32, 2, 0xFF, 0, 0, 0xFF, 0, 0,
                *range(32)),                                                # 32 without it
    struct.pack("<QBBBBBB2xBxHiBxHi", 0x1000, 1, 0, 0, 4, 16, 11, 4, 128, 0, 0xFF, 0, 0),
    # ^ differ_words: word 16 past a 128-byte capture; v without the flag
    struct.pack("<QBBBBBB2xBxHiBxHi", 0x1000, 1, 0, 0, 0, 1, 0, 4, 168, 0, 0xFF, 0, 0),
    struct.pack("<QBBBB4xBxHiBxHi15I", 0x1000, 1, 0, 15, 2, 0xFF, 0, 0, 0xFF, 0, 0,
                *range(15)),                                                # bitmap of 15
    struct.pack("<QBBBB4xBxHiBxHi", 0x1000, 1, 0, 0, 1, 0xFF, 0, 0, 0xFF, 0, 0),  # no capture
    struct.pack("<QBBBB4xBxHiBxHi", 0x1000, 1, 2, 0, 1, 4, 16, 0, 0xFF, 0, 0),  # word 2 of 2
    struct.pack("<QBBBB4xBxHiBxHi", 0x1000, 1, 32, 0, 1, 4, 256, 0, 0xFF, 0, 0),  # word 32
])
def test_extended_breakpoint_refuses_malformed_requests(lab, payload):
    with pytest.raises(KvmEINVAL):
        lab.session.request(abi.VMITRACE_SET_BREAKPOINT_EX, payload)


# -- capture tables: guest memory a hit points at ------------------------------------------------

UNMAPPED = 2**64 - 1
REG_RSP = 4
PT_REGS = (REG_RSP, 0, 168)  # at both syscall sites rsp points at the task's pt_regs
# u64 words of pt_regs
W_R10, W_AX, W_DX, W_SI, W_DI, W_ORIG_AX, W_SP = 7, 10, 12, 13, 14, 15, 19
NR_READ, NR_WRITE, NR_ACCEPT, NR_EXECVE, NR_OPENAT = 0, 1, 43, 59, 257
EISDIR = 21
Entry = abi.CaptureTableEntry


def read_kernel(s: Session, gva: int, size: int) -> bytes:
    out = b""
    while len(out) < size:
        address = gva + len(out)
        chunk = min(size - len(out), 4096 - (address & 0xFFF))
        out += s.read_physical(s.translate_gva(0, address), chunk)
    return out


def syscall_sites(lab: Lab) -> tuple[int, int]:
    """entry_SYSCALL_64's `call do_syscall_64` and the instruction after it (the exit)."""
    syms = lab.symbols("entry_SYSCALL_64", "do_syscall_64")
    entry = syms["entry_SYSCALL_64"]
    site = find_call_site(read_kernel(lab.session, entry, 512), entry, syms["do_syscall_64"])
    assert site is not None
    return site, site + 5


def pt_regs(event: Any) -> tuple[int, ...]:
    return struct.unpack("<21Q", event.captured[0])


def is_call(site: int, nr: int, **words: int) -> Callable[[Any], bool]:
    """Predicate: a hit at `site` whose pt_regs hold system call `nr` and these words."""
    index = {"di": W_DI, "si": W_SI, "dx": W_DX, "r10": W_R10, "ax": W_AX}

    def match(e: Any) -> bool:
        if e.event_id != abi.KVMI_EVENT_BREAKPOINT or e.arch.regs.rip != site or \
                not e.captured or not e.captured[0]:
            return False
        regs = pt_regs(e)
        return regs[W_ORIG_AX] == nr and all(regs[index[w]] == v for w, v in words.items())
    return match


def test_capture_table_at_the_syscall_entry(lab):
    """Keyed by orig_ax: openat's path (a string), write's buffer bounded by dx, and faulted
    captures: a NULL pointer (accept's addr), an unmapped one (write's fd), and execve's
    filename read on to the end of the stack it lies in (checked while the vCPU waits)."""
    s = lab.session
    entry_site, _ = syscall_sites(lab)
    program = workloads.WORKLOAD_BINARIES["file"].encode() + b"\0"
    page_after: dict[int, int] = {}

    def check_fault(session: Session, event: Any) -> None:
        if event.blocking and is_call(entry_site, NR_EXECVE)(event):
            capture = event.pointer_captures[0]
            page_after[event.seq] = session.translate_gva(event.vcpu,
                                                          capture.gva + len(capture.data))
        return None

    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    lab.handler = check_fault
    try:
        # Every hit runs on but execve's (orig_ax, word 15 of pt_regs, in the bitmap).
        s.set_breakpoint_ex(entry_site, True, W_ORIG_AX, abi.block_bitmap([NR_EXECVE]),
                            [PT_REGS], abi.VMITRACE_BLOCK_FROM_CAPTURE | abi.VMITRACE_BLOCK_BITMAP)
        s.set_capture_table(entry_site, W_ORIG_AX, [
            Entry(NR_OPENAT, W_SI, 4096, string=True),
            Entry(NR_WRITE, W_SI, 8192, length_word=W_DX),
            Entry(NR_WRITE, W_DI, 64),      # the fd as an address: nothing maps it
            Entry(NR_EXECVE, W_DI, 8192),   # no length, not a string: up to the first hole
            Entry(NR_ACCEPT, W_SI, 16)])    # accept(fd, NULL, NULL)
        mark = lab.mark()
        # env execs its argument: the filename lies in env's argument strings, which end
        # 8 bytes below the top of its stack, where the mapping ends.
        lab.run_ok("/bin/busybox env " + program[:-1].decode())
        lab.run_ok(workloads.WORKLOAD_BINARIES["tcp"])
        path = workloads.FILE_PATH.encode() + b"\0"
        opened = lab.wait_for(lambda e: is_call(entry_site, NR_OPENAT)(e) and
                              e.pointer_captures[0].data == path, mark)
        written = lab.wait_for(is_call(entry_site, NR_WRITE, di=3, dx=workloads.FILE_BYTES),
                               mark)
        executed = lab.wait_for(lambda e: is_call(entry_site, NR_EXECVE)(e) and
                                e.pointer_captures[0].data.startswith(program), mark)
        accepted = lab.wait_for(is_call(entry_site, NR_ACCEPT), mark)
        other = lab.wait_for(lambda e: any(is_call(entry_site, nr)(e) for nr in (3, 9, 12)),
                             mark)  # close, mmap, brk
    finally:
        lab.handler = None
        s.clear_breakpoint(entry_site)
    assert not opened.blocking and executed.blocking
    assert opened.pointer_captures == (PointerCapture(pt_regs(opened)[W_SI], path, False),)
    assert written.pointer_captures == (
        PointerCapture(pt_regs(written)[W_SI], workloads.FILE_CONTENT, False),
        PointerCapture(3, b"", True))
    (filename,) = executed.pointer_captures
    assert filename.gva == pt_regs(executed)[W_DI] and filename.faulted
    assert filename.data.endswith(b"/bin/busybox\0" + bytes(8)), filename.data  # exec's own
    assert page_after[executed.seq] == UNMAPPED
    assert accepted.pointer_captures == (PointerCapture(0, b"", True),)  # NULL: not read
    assert other.pointer_captures == ()  # no entry for its number: no pointer captures


def test_capture_table_at_the_syscall_exit_bounds_by_a_signed_result(lab):
    """At the exit (after `call do_syscall_64`) pt_regs->ax holds the result: a read's
    buffer bounded by it, and nothing for a failing read (negative ax). The same entry with
    VMITRACE_TABLE_WORDS32 (a 32-bit caller's registers) takes the address's low 32 bits and
    the result as a signed 32-bit value."""
    s = lab.session
    _, exit_site = syscall_sites(lab)
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    try:
        s.set_breakpoint_ex(exit_site, True, 0, [], [PT_REGS])
        s.set_capture_table(exit_site, W_ORIG_AX, [
            Entry(NR_READ, W_SI, 8192, length_word=W_AX, signed_length=True),
            Entry(NR_READ, W_SI, 8192, length_word=W_AX, signed_length=True, words32=True),
            Entry(NR_READ, W_SP, 16, words32=True)])
        mark = lab.mark()
        lab.run_ok(workloads.WORKLOAD_BINARIES["file"])
        lab.guest.run("read x < /")  # read(2) of a directory: -EISDIR
        good = lab.wait_for(is_call(exit_site, NR_READ, ax=workloads.FILE_BYTES), mark)
        failed = lab.wait_for(is_call(exit_site, NR_READ, ax=2**64 - EISDIR), mark)
    finally:
        s.clear_breakpoint(exit_site)
    buffer = pt_regs(good)[W_SI]  # static, below 4 GiB: the same address in 32 bits
    assert good.pointer_captures[:2] == (PointerCapture(buffer, workloads.FILE_CONTENT, False),) * 2
    for event in good, failed:
        stack = pt_regs(event)[W_SP]
        assert stack >> 32 and event.pointer_captures[2].gva == stack & 0xFFFF_FFFF
    failed_buffer = pt_regs(failed)[W_SI]  # the shell's: maybe above 4 GiB
    assert failed.pointer_captures[:2] == (PointerCapture(failed_buffer, b"", False),
                                           PointerCapture(failed_buffer & 0xFFFF_FFFF, b"", False))


def test_exec_exit_runs_on_with_the_strings_of_its_new_stack(lab):
    """The syscall return as the tracer sets it for execve. VMITRACE_BLOCK_DIFFER_REVERSED:
    a successful exec's return is redirected to the new image (pt_regs ip no longer equals
    cx), so it runs on, while a failed one returns to the caller and waits; other calls keep
    the ordinary rule. VMITRACE_TABLE_INDIRECT: the hit carries the strings at the top of
    the new stack, from argv[0] (the pointer at sp + 8) to the end of the mapping: argv,
    envp, then the filename 8 bytes below the top. VMITRACE_TABLE_WAIT_IF_CUT: where they
    are longer than the capture, the exit waits."""
    s = lab.session
    _, exit_site = syscall_sites(lab)
    W_CX, W_IP = 11, 16
    ENOENT = 2
    program = workloads.WORKLOAD_BINARIES["file"]
    flags = abi.VMITRACE_BLOCK_FROM_CAPTURE | abi.VMITRACE_BLOCK_BITMAP | \
        abi.VMITRACE_BLOCK_WORDS_DIFFER | abi.VMITRACE_BLOCK_DIFFER_REVERSED
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    try:
        s.set_breakpoint_ex(exit_site, False, captures=[PT_REGS])
        s.set_capture_table(exit_site, W_ORIG_AX, [Entry(NR_EXECVE, W_SP, 8192, indirect=8,
                                                         wait_if_cut=True)])
        s.set_breakpoint_ex(exit_site, True, W_ORIG_AX,
                            abi.block_bitmap([]) + abi.block_bitmap([NR_EXECVE]), [PT_REGS],
                            flags, (W_IP, W_CX))
        mark = lab.mark()
        lab.run_ok(f"/bin/busybox env VMITRACE_TEST=1 {program}")
        status, _ = lab.guest.run("/bin/busybox env /nonexistent/program")
        executed = lab.wait_for(lambda e: is_call(exit_site, NR_EXECVE, ax=0)(e) and
                                e.pointer_captures[0].data.startswith(program.encode()), mark)
        # strings longer than the capture: VMITRACE_TABLE_WAIT_IF_CUT makes the exit wait
        lab.run_ok("x=$(/bin/busybox head -c 9000 /dev/zero | /bin/busybox tr '\\0' x); "
                   f"/bin/busybox env LONG=$x {program}")
        cut = lab.wait_for(lambda e: is_call(exit_site, NR_EXECVE, ax=0)(e) and
                           e.pointer_captures[0].data.startswith(program.encode() + b"\0") and
                           len(e.pointer_captures[0].data) == 8192, mark)
        failed = lab.wait_for(is_call(exit_site, NR_EXECVE, ax=2**64 - ENOENT), mark)
    finally:
        s.clear_breakpoint(exit_site)
    assert status != 0
    assert not executed.blocking and pt_regs(executed)[W_IP] != pt_regs(executed)[W_CX]
    assert failed.blocking and pt_regs(failed)[W_IP] == pt_regs(failed)[W_CX]
    assert cut.blocking and not cut.pointer_captures[0].faulted
    (strings,) = executed.pointer_captures
    assert strings.faulted and strings.data.endswith(program.encode() + b"\0" + bytes(8))
    args, env = strings.data.split(b"\0", 1)
    assert args == program.encode() and b"VMITRACE_TEST=1\0" in env
    # (rt_sigreturn's exits, orig_ax -1, wait: values from 512 up always do)
    others = [e for e in lab.since(mark, abi.KVMI_EVENT_BREAKPOINT)
              if e.arch.regs.rip == exit_site and e.captured and e.captured[0] and
              pt_regs(e)[W_ORIG_AX] not in (NR_EXECVE, 2**64 - 1)]
    assert others and not [pt_regs(e)[W_ORIG_AX] for e in others
                           if e.blocking and pt_regs(e)[W_IP] == pt_regs(e)[W_CX]]


def test_setting_the_breakpoint_again_drops_its_table(lab):
    """A new rule keeps the table while its first capture holds the table's words (the
    introspector sets the table while hits wait, then lets them run on); a plain breakpoint,
    a rule without those words, clearing, and an empty table drop it."""
    s = lab.session
    entry_site, _ = syscall_sites(lab)
    table = [Entry(NR_OPENAT, W_SI, 4096, string=True)]
    opened = is_call(entry_site, NR_OPENAT, dx=workloads.FILE_WRITE_FLAGS,
                     r10=workloads.FILE_MODE)  # wl-file's first openat

    def set_again() -> None:
        s.set_breakpoint_ex(entry_site, True, 0, [], [PT_REGS])

    def too_short() -> None:  # orig_ax, the key, is word 15: not in 64 bytes
        s.set_breakpoint_ex(entry_site, True, 0, [], [(PT_REGS[0], PT_REGS[1], 64)])

    def open_file() -> Any:
        mark = lab.mark()
        lab.run_ok(workloads.WORKLOAD_BINARIES["file"])
        return lab.wait_for(opened, mark)

    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    with_table, without = [], []
    try:
        for reset in (too_short, lambda: s.set_breakpoint(entry_site),
                      lambda: s.clear_breakpoint(entry_site),
                      lambda: s.set_capture_table(entry_site, W_ORIG_AX, [])):  # removes it
            s.set_breakpoint_ex(entry_site, False, 0, [], [PT_REGS])
            s.set_capture_table(entry_site, W_ORIG_AX, table)
            set_again()  # the same words: the table stays
            with_table.append(open_file())
            reset()
            set_again()
            without.append(open_file())
        # A plain breakpoint has no first capture: no table for it.
        s.set_breakpoint(entry_site)
        with pytest.raises(KvmENOENT):
            s.set_capture_table(entry_site, W_ORIG_AX, table)
    finally:
        s.clear_breakpoint(entry_site)
    with pytest.raises(KvmENOENT):
        s.set_capture_table(entry_site, W_ORIG_AX, table)
    path = workloads.FILE_PATH.encode() + b"\0"
    assert [e.pointer_captures[0].data for e in with_table] == [path] * 4
    assert [e.pointer_captures for e in without] == [()] * 4


def test_capture_table_replaced_while_hits_run(lab):
    """Tables replaced, removed and dropped (by resetting the breakpoint) while every vCPU
    takes hits that use them: the guest runs on and every event is well formed."""
    s = lab.session
    entry_site, _ = syscall_sites(lab)
    tables = ([Entry(NR_OPENAT, W_SI, 4096, string=True)],
              [Entry(NR_OPENAT, W_SI, 64), Entry(NR_READ, W_SI, 64, length_word=W_DX)], [])
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    loops = [lab.run_ok("(while true; do cat /proc/version; done) > /dev/null 2>&1 & echo $!")
             for _ in range(lab.vcpus)]
    mark = lab.mark()
    try:
        s.set_breakpoint_ex(entry_site, True, 0, [], [PT_REGS])
        deadline, rounds = time.monotonic() + 3, 0
        while time.monotonic() < deadline:
            if rounds % 50 == 49:
                s.set_breakpoint_ex(entry_site, True, 0, [], [PT_REGS])
            s.set_capture_table(entry_site, W_ORIG_AX, tables[rounds % len(tables)])
            rounds += 1
    finally:
        s.clear_breakpoint(entry_site)
        lab.run_ok("kill " + " ".join(pid.strip() for pid in loops))
    hits = [e for e in lab.since(mark, abi.KVMI_EVENT_BREAKPOINT) if e.arch.regs.rip == entry_site]
    assert any(e.pointer_captures for e in hits)
    for e in hits:
        assert len(e.pointer_captures) <= 2
        for pc in e.pointer_captures:
            assert pc.gva == pt_regs(e)[W_SI]
    lab.run_ok("cat /proc/version")


def _table(gva: int, key_word: int, *entries: tuple, count: int | None = None,
           padding: bytes = bytes(3)) -> bytes:
    """A raw vmitrace_capture_table payload; entries are (key, pointer_word, length_word,
    max_length, flags[, offset])."""
    head = struct.pack("<QB3sI", gva, key_word, padding, len(entries) if count is None else count)
    return head + b"".join(struct.pack("<HBBHBB", *(e + (0,) * (6 - len(e)))) for e in entries)


BP = 0x1000  # a breakpoint of the test below (never executed), first capture 16 bytes
OK = (1, 0, 0xFF, 8, 0)  # a valid entry


@pytest.mark.parametrize("payload,error", [
    (_table(BP, 0)[:15], KvmEINVAL),                                 # short
    (_table(BP, 0, OK, count=2), KvmEINVAL),                         # 1 entry of 2
    (_table(BP, 0, OK) + b"\0", KvmEINVAL),                          # a byte too many
    (_table(BP, 0, count=2049), KvmEINVAL),                          # above 2048
    (_table(BP, 0, OK, padding=b"\0\1\0"), KvmEINVAL),               # header padding
    (_table(BP, 32, OK), KvmEINVAL),                                 # key word 32
    (_table(BP, 2, OK), KvmEINVAL),                                  # past the first capture
    (_table(BP, 0, (512, 0, 0xFF, 8, 0)), KvmEINVAL),                # key 512
    (_table(BP, 0, (1, 32, 0xFF, 8, 0)), KvmEINVAL),                 # pointer word 32
    (_table(BP, 0, (1, 2, 0xFF, 8, 0)), KvmEINVAL),                  # past the first capture
    (_table(BP, 0, (1, 0, 32, 8, 0)), KvmEINVAL),                    # length word 32
    (_table(BP, 0, (1, 0, 2, 8, 0)), KvmEINVAL),                     # past the first capture
    (_table(BP, 0, (1, 0, 0xFF, 0, 0)), KvmEINVAL),                  # max_length 0
    (_table(BP, 0, (1, 0, 0xFF, 8193, 0)), KvmEINVAL),               # max_length 8193
    (_table(BP, 0, (1, 0, 0xFF, 8, 32)), KvmEINVAL),                 # unknown flag
    (_table(BP, 0, (1, 0, 0xFF, 8, 0, 1)), KvmEINVAL),               # offset, not INDIRECT
    (_table(BP, 0, *[OK] * 5), KvmEINVAL),                           # 5 entries for key 1
    (_table(BP + 1, 0, OK), KvmENOENT),                              # no breakpoint there
    (_table(BP + 2, 0, OK), KvmENOENT),                              # one without captures
    (_table(BP + 3, 0, OK), KvmENOENT),                              # only a second capture
    (_table(BP + 3, 0), KvmENOENT),                                  # (also to remove one)
])
def test_capture_table_refuses_malformed_requests(lab, payload, error):
    s = lab.session
    s.set_breakpoint_ex(BP, True, 0, [], [(REG_RSP, 0, 16)])
    s.set_breakpoint(BP + 2)
    s.set_breakpoint_ex(BP + 3, True, 0, [], [(0xFF, 0, 0), (REG_RSP, 0, 16)])
    try:
        with pytest.raises(error):
            s.request(abi.VMITRACE_SET_CAPTURE_TABLE, payload)
        s.set_capture_table(BP, 1, [Entry(3, 0, 8, length_word=1)])  # the largest words
    finally:
        for gva in (BP, BP + 2, BP + 3):
            s.clear_breakpoint(gva)
    lab.run_ok("true")


# -- hypercalls, pauses ------------------------------------------------------------------------

def vmcall_hypercall(lab: Lab, handler: Handler) -> Any:
    """Run the vmcall workload with hypercall events on and `handler` answering: its event."""
    s = lab.session
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_HYPERCALL, True)
    lab.handler = handler
    mark = lab.mark()
    try:
        lab.run_ok(workloads.WORKLOAD_BINARIES["vmcall"])
        return lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_HYPERCALL
                            and e.arch.regs.rax == workloads.VMCALL_RAX, mark)
    finally:
        lab.handler = None
        for vcpu in range(lab.vcpus):
            s.control_events(vcpu, abi.KVMI_EVENT_HYPERCALL, False)


def test_vmcall_program_yields_hypercall_with_its_rax(lab):
    code_at_rip: dict[int, bytes] = {}

    def read_code(session: Session, event: Any) -> None:
        # While the vCPU waits, its address space is the workload's: read the code at rip.
        if event.event_id == abi.KVMI_EVENT_HYPERCALL:
            gpa = session.translate_gva(event.vcpu, event.arch.regs.rip)
            if gpa != 2**64 - 1 and (gpa & 0xFFF) <= 4096 - len(workloads.VMCALL_INSN):
                code_at_rip[event.seq] = session.read_physical(gpa, len(workloads.VMCALL_INSN))
        return None

    hit = vmcall_hypercall(lab, read_code)
    regs = hit.arch.regs
    assert (regs.rbx, regs.rcx, regs.rdx, regs.rsi) == (
        workloads.VMCALL_RBX, workloads.VMCALL_RCX, workloads.VMCALL_RDX, workloads.VMCALL_RSI)
    assert hit.arch.sregs.cs.selector & 3 == 3  # executed in user mode
    assert code_at_rip.get(hit.seq) == workloads.VMCALL_INSN  # rip is the vmcall itself


def test_vcpu_stats_count_events_and_the_time_they_waited(lab):
    """VMITRACE_GET_VCPU_STATS: a hypercall whose reply the introspector holds for 50 ms is
    one more event and one more wait on its vCPU, of at least 50 ms; events delivered
    without waiting add no wait. Counters only grow; an absent vCPU is refused."""
    s = lab.session
    before = [s.get_vcpu_stats(vcpu) for vcpu in range(lab.vcpus)]

    def hold_hypercalls(session: Session, event: Any) -> None:
        if event.event_id == abi.KVMI_EVENT_HYPERCALL:
            time.sleep(0.05)
        return None

    hit = vmcall_hypercall(lab, hold_hypercalls)
    held = [s.get_vcpu_stats(vcpu) for vcpu in range(lab.vcpus)]
    old, new = before[hit.vcpu], held[hit.vcpu]
    assert new.events > old.events and new.waits > old.waits
    assert new.wait_us - old.wait_us >= 50_000 and new.max_wait_us >= 50_000
    assert new.event_us - old.event_us >= new.wait_us - old.wait_us
    assert new.timeouts == old.timeouts
    for was, now in zip(before, held):
        assert all(n >= w for n, w in zip(now, was))

    nonblocking_cr3_events(lab)
    after = [s.get_vcpu_stats(vcpu) for vcpu in range(lab.vcpus)]
    assert sum(a.events for a in after) > sum(h.events for h in held)
    assert [a.waits for a in after] == [h.waits for h in held]
    for vcpu in (lab.vcpus, 999):
        with pytest.raises(KvmEINVAL):
            s.get_vcpu_stats(vcpu)


@pytest.mark.parametrize("lab", [("6.12", 2)], ids=["6.12-2vcpu"], indirect=True)
def test_other_vcpus_run_while_one_waits_for_its_reply(lab):
    """Needs a second vCPU, so it runs on the module's 2-vCPU guest only (the same boot)."""
    assert lab.vcpus == 2
    s = lab.session
    target = lab.symbols("do_sys_openat2")["do_sys_openat2"]
    others: list[Any] = []

    def hold_until_others_report(session: Session, event: Any) -> None:
        # This vCPU stays stopped while the pump is here; events the other vCPUs raise
        # meanwhile pile up in the session's queue.
        if event.event_id == abi.KVMI_EVENT_BREAKPOINT and not others:
            deadline = time.monotonic() + EVENT_WAIT
            while time.monotonic() < deadline and session.pending_events() == 0:
                time.sleep(0.05)
            others.append((event.vcpu, session.pending_events()))
        return None

    # Two independent loops: one opens files (and hits the breakpoint), the other only
    # forks and execs, so it has work that does not wait for the stopped one.
    loops = [lab.run_ok("(while true; do ls / > /dev/null; done) > /dev/null 2>&1 & echo $!"),
             lab.run_ok("(while true; do /bin/busybox true; done) > /dev/null 2>&1 & echo $!")]
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_CR, True)
        s.control_cr(vcpu, 3, True)
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    lab.handler = hold_until_others_report
    mark = lab.mark()
    s.set_breakpoint(target)
    try:
        lab.wait_for(lambda e: bool(others), mark)
    finally:
        lab.handler = None
        s.clear_breakpoint(target)
        for vcpu in range(lab.vcpus):
            s.control_cr(vcpu, 3, False)
        lab.run_ok("kill " + " ".join(pid.strip() for pid in loops))
    held_vcpu, queued = others[0]
    assert queued > 0
    later = lab.since(mark)
    assert any(e.vcpu != held_vcpu for e in later)


def test_pause_vcpu_yields_pause_event(lab):
    s = lab.session
    for vcpu in range(lab.vcpus):
        mark = lab.mark()
        s.pause_vcpu(vcpu)
        lab.guest.run("true")  # wake an idle vCPU
        event = lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_PAUSE_VCPU, mark)
        assert event.vcpu == vcpu


def test_busy_vcpus_serve_commands_and_pauses(lab):
    # Once every vCPU has started, a running vCPU looks for queued work only in the blocks
    # holding swapgs, iret, sysret, sysexit or hlt. A guest busy in user space passes them
    # at every timer interrupt, so it still answers GET_REGISTERS and pauses (in the
    # kernel, at one of those blocks).
    s = lab.session
    loops = [lab.run_ok("(while :; do :; done) > /dev/null 2>&1 & echo $!")
             for _ in range(lab.vcpus)]
    try:
        for vcpu in range(lab.vcpus):
            for _ in range(20):
                regs = s.get_registers(vcpu)
                assert regs.mode == 8 and regs.regs.rip >= KERNEL_HALF
            mark = lab.mark()
            s.pause_vcpu(vcpu)
            event = lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_PAUSE_VCPU, mark)
            assert event.vcpu == vcpu
    finally:
        lab.run_ok("kill " + " ".join(pid.strip() for pid in loops))


def test_four_vcpus_are_each_held_at_boot_then_served_busy():
    # The largest lab guest: every vCPU's first block is held for CREATE_VCPU (so each sees
    # the kernel's LSTAR write), and once all have started each one still answers
    # GET_REGISTERS and pauses while busy.
    lab = Lab("6.1", 4)
    try:
        boot = lab.since(0)
        created = sorted(e.vcpu for e in boot if e.event_id == abi.KVMI_EVENT_CREATE_VCPU)
        assert created == [0, 1, 2, 3]
        lstar = {e.vcpu for e in boot if e.event_id == abi.KVMI_EVENT_MSR and e.msr == MSR_LSTAR}
        assert lstar == {0, 1, 2, 3}
        test_busy_vcpus_serve_commands_and_pauses(lab)
    finally:
        lab.close()
    assert not lab.handler_errors, lab.handler_errors


def test_a_vcpu_added_later_is_held_at_its_start_and_served():
    # A vCPU plugged in while the guest runs makes every block check for queued work again
    # until it has started: its first block sends CREATE_VCPU (and is held for the reply),
    # and afterwards it answers GET_REGISTERS and pauses like the others.
    lab = Lab("6.1", 1, max_vcpus=2)
    try:
        mark = lab.mark()
        free = [cpu for cpu in lab.guest.qmp("query-hotpluggable-cpus") if "qom-path" not in cpu]
        lab.guest.qmp("device_add", {"driver": free[0]["type"], "id": "vcpu1",
                                     **free[0]["props"]})
        lab.run_ok("echo 1 > /sys/devices/system/cpu/cpu1/online")
        created = lab.wait_for(lambda e: e.event_id == abi.KVMI_EVENT_CREATE_VCPU, mark)
        assert created.vcpu == 1
        assert created.arch.mode == 2 and not created.arch.sregs.cr0 & 1  # its first block
        assert lab.run_ok("nproc") == "2\n"
        lab.vcpus = 2
        test_busy_vcpus_serve_commands_and_pauses(lab)
    finally:
        lab.close()
    assert not lab.handler_errors, lab.handler_errors


def nonblocking_cr3_events(lab: Lab) -> list[Any]:
    """The CR3 events of running `ls /` with non-blocking delivery."""
    s = lab.session
    s.set_delivery(False)
    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_CR, True)
        s.control_cr(vcpu, 3, True)
    mark = lab.mark()
    try:
        lab.run_ok("ls / > /dev/null")
    finally:
        for vcpu in range(lab.vcpus):
            s.control_cr(vcpu, 3, False)
        s.set_delivery(True)
    return lab.since(mark, abi.KVMI_EVENT_CR)


def test_nonblocking_delivery_needs_no_replies(lab):
    events = nonblocking_cr3_events(lab)
    assert events and not any(e.blocking for e in events)


# -- a vanished or broken introspector never harms the guest -------------------------------

def test_introspector_disconnect_mid_event_leaves_guest_running(lab):
    s = lab.session
    target = lab.symbols("do_sys_openat2")["do_sys_openat2"]

    def vanish(session: Session, event: Any) -> int | None:
        if event.event_id == abi.KVMI_EVENT_BREAKPOINT:
            session.close()  # never replies
            return -1
        return None

    for vcpu in range(lab.vcpus):
        s.control_events(vcpu, abi.KVMI_EVENT_BREAKPOINT, True)
    lab.handler = vanish
    mark = lab.mark()
    s.set_breakpoint(target)
    status, output = lab.guest.run("cat /proc/version")
    assert status == 0 and output.startswith("Linux version")
    assert lab.since(mark, abi.KVMI_EVENT_BREAKPOINT)  # it did stop in an event
    lab.pump_thread.join(10)
    lab.handler = None
    # reconnect=on: the plugin comes back with a clean slate (no breakpoints, no events).
    fresh = lab.attach()
    assert fresh.uuid == lab.guest.uuid
    after = lab.mark()
    lab.run_ok("cat /proc/version")
    assert lab.since(after) == []


def _raw_host(listen_path: str, answer: bytes | None = None) -> socket.socket:
    """Accept one plugin connection on a raw socket and answer its handshake by hand
    (by default correctly: introspector2qemu with the SHA-1 of the shared secret)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen_path)
    os.chmod(listen_path, 0o600)
    server.listen(1)
    server.settimeout(60)
    try:
        conn, _ = server.accept()
    finally:
        server.close()
        os.unlink(listen_path)
    conn.settimeout(30)
    hello = b""
    while len(hello) < 96:
        chunk = conn.recv(96 - len(hello))
        assert chunk
        hello += chunk
    assert struct.unpack_from("<I", hello)[0] == 96
    if answer is None:
        answer = struct.pack("<I20s", 24, hashlib.sha1(SECRET.encode()).digest())
    conn.sendall(answer)
    return conn


def _recv_until_closed(conn: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_malformed_messages_drop_the_connection_and_guest_runs_on(lab):
    # Replace the Listener with a raw socket to send what no real client would.
    lab.session.close()
    lab.pump_thread.join(10)
    lab.listener.close()

    # A wrong cookie hash, or a handshake claiming 4 GiB, is refused at once.
    for answer in (struct.pack("<I20s", 24, bytes(20)), struct.pack("<I", 0xFFFFFFFF)):
        conn = _raw_host(lab.socket_path, answer)
        assert _recv_until_closed(conn) == b""
        conn.close()
        lab.run_ok("true")

    conn = _raw_host(lab.socket_path)
    # A reply to an event nobody waits for is discarded; the connection stays up ...
    conn.sendall(struct.pack("<HHI", abi.KVMI_EVENT_REPLY, 16, 12345)
                 + struct.pack("<HHI", 0, 0, 0) + struct.pack("<BBHI", 0, abi.KVMI_EVENT_CR, 0, 0))
    # ... an unknown command is answered -KVM_EOPNOTSUPP and the connection stays up ...
    conn.sendall(struct.pack("<HHI", 0x1234, 0, 7))
    reply = conn.recv(16)
    assert struct.unpack("<HHIiI", reply) == (0x1234, 8, 7, -95, 0)
    # ... but a header claiming more than the largest message drops it.
    conn.sendall(struct.pack("<HHI", abi.KVMI_GET_VERSION, 0xFFFF, 8))
    _recv_until_closed(conn)
    conn.close()
    lab.run_ok("true")

    conn = _raw_host(lab.socket_path)
    conn.sendall(struct.pack("<HHI", abi.KVMI_READ_PHYSICAL, 16, 9) + b"\1\2\3")  # truncated
    conn.close()
    lab.run_ok("true")

    _fuzz_commands(_raw_host(lab.socket_path), lab.vcpus)
    lab.run_ok("true")

    lab.listener = Listener("unix:" + lab.socket_path, secret=SECRET.encode())
    lab.attach()
    assert lab.session.get_version().version == 1
    lab.run_ok("true")


def _read_message(conn: socket.socket) -> tuple[int, int, bytes]:
    head = b""
    while len(head) < 8:
        chunk = conn.recv(8 - len(head))
        assert chunk, "plugin closed the connection"
        head += chunk
    msg_id, size, seq = struct.unpack("<HHI", head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        assert chunk, "plugin closed the connection"
        body += chunk
    return msg_id, seq, body


def _fuzz_commands(conn: socket.socket, vcpus: int, count: int = 1500) -> None:
    """Random well-framed commands (every id, random payloads): each gets exactly one
    reply, events raised meanwhile are answered, and the connection stays up.
    WRITE_PHYSICAL is left out: a random write that happened to be valid would corrupt
    the guest, which is the introspector's right, not a plugin failure."""
    import random
    rng = random.Random(1234)
    ids = [i for i in range(2, 64) if i != abi.KVMI_WRITE_PHYSICAL] + [
        abi.VMITRACE_SET_BREAKPOINT, abi.VMITRACE_CLEAR_BREAKPOINT, abi.VMITRACE_SET_DELIVERY,
        abi.VMITRACE_SET_BREAKPOINT_EX, abi.VMITRACE_SET_CAPTURE_TABLE,
        abi.VMITRACE_GET_VCPU_STATS, 0x7F7F, 0xFFFF]
    errors: collections.Counter = collections.Counter()
    for seq in range(1000, 1000 + count):
        msg_id = rng.choice(ids)
        size = rng.choice([0, 1, 7, 8, 12, 16, 24, rng.randrange(0, 600)])
        payload = bytearray(rng.randbytes(size))
        if size >= 2 and rng.random() < 0.7:
            struct.pack_into("<H", payload, 0, rng.randrange(vcpus + 1))  # plausible vCPU
            payload[2:8] = bytes(min(6, size - 2))
        conn.sendall(struct.pack("<HHI", msg_id, size, seq) + bytes(payload))
        while True:
            got_id, got_seq, body = _read_message(conn)
            if got_id == abi.KVMI_EVENT:
                vcpu, event_id = struct.unpack_from("<2xHB", body)
                conn.sendall(struct.pack("<HHI", abi.KVMI_EVENT_REPLY, 16, got_seq)
                             + struct.pack("<HHI", vcpu, 0, 0)
                             + struct.pack("<BBHI", abi.KVMI_EVENT_ACTION_CONTINUE, event_id, 0, 0))
                continue
            assert (got_id, got_seq) == (msg_id, seq)
            errors[struct.unpack_from("<i", body)[0]] += 1
            break
    conn.close()  # the plugin forgets whatever the random commands enabled
    assert errors[-22] > 0 and errors[-95] > 0 and errors[0] > 0  # it was really exercised


# -- reply timeout, CRASH and UNHOOK (a guest of its own: it ends here) ------------------------

def test_reply_timeout_then_crash_reply_stops_vm_with_unhook(tmp_path):
    listener = Listener(f"unix:{tmp_path}/kvmi.sock")
    guest = guestlab.Guest("6.1", vcpus=1, plugin_options={
        "socket": f"{tmp_path}/kvmi.sock", "reply_timeout_ms": 300})
    try:
        guest.start()
        session = listener.accept(timeout=120)
        assert session is not None
        guest.wait_ready(guest.boot_timeout)
        status, out = guest.run("grep ' do_sys_openat2$' /proc/kallsyms")
        target = int(out.split()[0], 16)
        session.control_vm_events(abi.KVMI_EVENT_UNHOOK, True)
        session.control_events(0, abi.KVMI_EVENT_BREAKPOINT, True)
        session.set_breakpoint(target)
        # Unanswered events time out with the documented default action: continue.
        status, out = guest.run("cat /proc/version")
        assert status == 0 and out.startswith("Linux version")
        unanswered = session.unanswered()
        assert unanswered and all(e.event_id == abi.KVMI_EVENT_BREAKPOINT for e in unanswered)
        # CRASH stops the VM; on the way out the host sends UNHOOK.
        session.clear_breakpoint(target)
        session.control_events(0, abi.KVMI_EVENT_HYPERCALL, True)
        run = threading.Thread(target=lambda: _ignore_errors(
            guest.run, workloads.WORKLOAD_BINARIES["vmcall"], 30), daemon=True)
        run.start()
        seen = []
        while True:
            try:
                event = session.next_event(EVENT_WAIT)
            except ConnectionClosed:
                break
            assert event is not None, "no event and no disconnect"
            seen.append(event.event_id)
            if event.event_id == abi.KVMI_EVENT_HYPERCALL:
                session.reply(event, abi.KVMI_EVENT_ACTION_CRASH)
            elif event.blocking and event.event_id != abi.KVMI_EVENT_BREAKPOINT:
                session.reply(event)
        assert abi.KVMI_EVENT_HYPERCALL in seen
        assert seen[-1] == abi.KVMI_EVENT_UNHOOK
        assert guest.process.wait(60) is not None  # QEMU is gone
    finally:
        guest.stop()
        listener.close()


def _ignore_errors(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # the VM is stopped under it: that is the point
        pass


# -- a vCPU reading the socket itself: a stalled half message (a guest of its own) -------------

def test_message_cut_off_while_vcpu_waits_drops_connection_and_guest_runs_on(tmp_path):
    """While a vCPU waits for its event reply it reads the socket itself. A message that
    starts and never completes must not hold it: after reply_timeout_ms the plugin drops the
    connection and the guest runs on. (spin_us=0: the sleeping wait path; the module's
    guests use the default busy-poll.)"""
    path = f"{tmp_path}/kvmi.sock"
    guest = guestlab.Guest("6.1", vcpus=1, plugin_options={
        "socket": path, "reply_timeout_ms": 1000, "spin_us": 0, "cookie": SECRET})
    try:
        guest.start()
        conn = _raw_host(path)
        guest.wait_ready(guest.boot_timeout)
        status, out = guest.run("grep ' do_sys_openat2$' /proc/kallsyms")
        assert status == 0
        target = int(out.split()[0], 16)
        conn.sendall(struct.pack("<HHI", abi.KVMI_CONTROL_EVENTS, 16, 1)
                     + struct.pack("<HHI", 0, 0, 0)
                     + struct.pack("<HBBI", abi.KVMI_EVENT_BREAKPOINT, 1, 0, 0))
        conn.sendall(struct.pack("<HHI", abi.VMITRACE_SET_BREAKPOINT, 8, 2)
                     + struct.pack("<Q", target))
        replies = [_read_message(conn)[:2] for _ in range(2)]
        assert replies == [(abi.KVMI_CONTROL_EVENTS, 1), (abi.VMITRACE_SET_BREAKPOINT, 2)]

        result: dict[str, Any] = {}
        run = threading.Thread(target=lambda: result.update(
            zip(("status", "out"), guest.run("cat /proc/version", 120))), daemon=True)
        run.start()
        msg_id, _seq, body = _read_message(conn)
        assert msg_id == abi.KVMI_EVENT and body[4] == abi.KVMI_EVENT_BREAKPOINT
        # Half a GET_VERSION reply's worth of command: the header promises 8 bytes, 3 come.
        conn.sendall(struct.pack("<HHI", abi.KVMI_GET_VERSION, 8, 3) + b"\0\0\0")
        assert _recv_until_closed(conn) == b""  # dropped (after the reply timeout)
        run.join(120)
        assert result.get("status") == 0 and result["out"].startswith("Linux version")
        assert "dropping the connection" in guest.qemu_log.read_text()
        conn.close()
    finally:
        guest.stop()
