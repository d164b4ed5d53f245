"""Collector and monitor pieces without a guest: events are real KVMI wire messages built with
the protocol's own encoder (the guest cannot be made to, e.g., clear CR0.WP on demand), and
guest memory is an image built in the test."""
from __future__ import annotations

import gc
import socket
import struct
import threading
import time
import uuid

import pytest

from sinks.schema import RecordFactory, records_to_batch
from support.kvmi_peer import HostPeer, msr_payload
from test_memory_support import GuestImage
from tracer.collector import MemorySink, RecordPump, TraceOptions, VmTracer, heap_frozen
from tracer.decode import SyscallDecoder, SyscallInfo
from tracer.kvmi import abi
from tracer.kvmi.protocol import build_event, decode_event
from tracer.kvmi.errors import KvmEINVAL
from tracer.kvmi.transport import Session
from tracer.monitors.base import BreakpointRule, FastRegs, Filters, VmContext
from tracer.monitors.integrity import IntegrityMonitor
from tracer.monitors import kernel as k
from tracer.monitors.kernel import kernel_cr3_candidates
from tracer.monitors.syscalls import SetupError, SyscallMonitor, find_call_site


def event(event_id: int, vcpu: int = 0, arch: dict | None = None, seq: int = 1, **fields):
    raw = build_event(seq, vcpu, event_id, arch, **fields)
    return decode_event(raw, len(raw) - 8, seq)


def context(records: list) -> VmContext:
    return VmContext(session=None, mem=GuestImage().mem, factory=RecordFactory(vm_id="vm-1"),
                     emit=records.append, filters=Filters(), clock=lambda: 1_000)


def test_fast_registers_match_the_full_decode():
    arch = {"regs": {"rip": 0xFFFFFFFF81000123, "rsp": 0xFFFFC90000123F58, "rdi": 7},
            "sregs": {"cr3": 0x1234000, "gs": {"base": 0xFFFF888007A00000},
                      "cs": {"selector": 0x33}},
            "msrs": {"shadow_gs": 0xFFFF888007C00000}}
    ev = event(abi.KVMI_EVENT_BREAKPOINT, arch=arch, gpa=0x1000123, insn_len=1)
    regs = FastRegs(ev.raw)
    assert (regs.rip, regs.rsp, regs.rdi) == (ev.arch.regs.rip, ev.arch.regs.rsp, 7)
    assert regs.cr3 == ev.arch.sregs.cr3 and regs.gs_base == ev.arch.sregs.gs.base
    assert regs.cpl == 3 and regs.kernel_gs == 0xFFFF888007C00000  # user mode: the shadow GS


def test_kpti_kernel_half_of_a_user_cr3():
    assert kernel_cr3_candidates(0x1235000 | 0x5) == [0x1235000, 0x1234000]
    assert kernel_cr3_candidates(0x1234000) == [0x1234000]


def test_find_call_site_in_entry_code():
    base = 0xFFFFFFFF81C00080
    target = 0xFFFFFFFF81A43DC0
    code = bytearray(b"\x90" * 0x100)
    site = 0xA1
    rel = target - (base + site + 5)
    code[site:site + 5] = b"\xE8" + struct.pack("<i", rel)
    code[0x10:0x15] = b"\xE8" + struct.pack("<i", 0x1000)  # a call elsewhere: ignored
    assert find_call_site(bytes(code), base, target) == base + site
    assert find_call_site(bytes(code[:site + 3]), base, target) is None  # cut: never found


def test_ia32_entry_sites_installed_where_the_kernel_has_them():
    """Synthetic entry stubs: int80 and sysenter call their handlers; the 32-bit `syscall`
    stub calls something else (not found: skipped); entry_INT80_compat is absent."""
    from tracer.monitors.kernel import KernelLayout
    base, handlers = 0xFFFFFFFF81C00000, 0xFFFFFFFF81A00000
    symbols = {"entry_SYSCALL_64": base, "do_syscall_64": handlers,
               "asm_int80_emulation": base + 0x1000, "int80_emulation": handlers + 0x100,
               "entry_SYSENTER_compat": base + 0x2000, "do_SYSENTER_32": handlers + 0x200,
               "entry_SYSCALL_compat": base + 0x3000, "do_fast_syscall_32": handlers + 0x300}
    img = GuestImage()
    img.map_new(base, 4)
    calls = {"entry_SYSCALL_64": ("do_syscall_64", 0x70),
             "asm_int80_emulation": ("int80_emulation", 0x21),
             "entry_SYSENTER_compat": ("do_SYSENTER_32", 0x90),
             "entry_SYSCALL_compat": ("do_syscall_64", 0x44)}  # a call, not of its handler
    for stub, (target, offset) in calls.items():
        site = symbols[stub] + offset
        img.write(site, b"\xE8" + struct.pack("<i", symbols[target] - (site + 5)))
    records: list = []
    ctx = VmContext(session=None, mem=img.mem, factory=RecordFactory(vm_id="vm-1"),
                    emit=records.append, filters=Filters(), clock=lambda: 1_000)
    ctx.layout = KernelLayout(banner=None, symbols=symbols, task={}, cred={}, mm={}, path={},
                              current_offset=0, slide=0)
    x64 = SyscallDecoder({39: SyscallInfo(39, "getpid", ())})
    ia32 = SyscallDecoder({20: SyscallInfo(20, "getpid", ())}, compat32=True)
    monitor = SyscallMonitor(ctx, x64, ia32)
    monitor.install(img.cr3)
    int80, sysenter = base + 0x1021, base + 0x2090
    assert monitor.ia32_sites == {"asm_int80_emulation": int80, "entry_SYSENTER_compat": sysenter}
    assert sorted(ctx.breakpoints) == [base + 0x70, base + 0x75, int80, int80 + 5,
                                       sysenter, sysenter + 5]
    assert ctx.breakpoints[int80 + 5] == monitor.on_exit  # one exit handler pairs every ABI
    assert ctx.breakpoints[int80].keywords["abi"].nr == k.R_AX  # the int80 stub's number: ax
    assert ctx.breakpoints[sysenter].keywords["abi"].nr == k.R_ORIG_AX


@pytest.mark.parametrize("stub,stack", [("entry_SYSCALL_compat", k.R_SP),
                                        ("entry_SYSENTER_compat", k.R_BP)])
def test_fast_ia32_entry_takes_arg6_from_the_user_stack_and_ip_from_the_vdso(stub, stack):
    """pt_regs as do_fast_syscall_32 completes them: bp = the u32 at the 32-bit user stack
    pointer (sp for SYSCALL, bp for SYSENTER, whose saved sp is 0), ip = the process's vDSO
    base + int80_landing_pad (mm->context.vdso); read from a real page-table image."""
    from tracer.monitors.kernel import KernelLayout, TaskReader
    from tracer.monitors.syscalls import IA32_ENTRIES
    user_stack, task, mm, vdso = 0x0FFF_E000, 0xFFFF_8880_0100_0000, 0xFFFF_8880_0200_0000, \
        0xF7FC_0000
    img = GuestImage()
    for page in (user_stack, task, mm):
        img.map_new(page)
    img.write(user_stack + 0x10, struct.pack("<I", 7))  # the pushed ebp: the sixth argument
    img.write_u64(task + 0x900, mm)
    img.write_u64(mm + 0x448, vdso)
    ctx = context([])
    ctx.mem = img.mem
    ctx.layout = KernelLayout(banner=None, symbols={}, task={"mm": 0x900}, cred={}, mm={},
                              path={}, current_offset=0, slide=0, vdso={"mm_vdso": 0x448})
    ctx.tasks = TaskReader(ctx.layout, ctx.mem, "vm")
    monitor = SyscallMonitor(ctx, SyscallDecoder({}))
    monitor.landing_pad = 0x578
    assert next(e[3] for e in IA32_ENTRIES if e[0] == stub) == stack
    saved = [0] * 21
    saved[k.R_BX], saved[k.R_BP] = 0x1000, 0x2222
    saved[k.R_IP] = 0 if stub == "entry_SYSENTER_compat" else vdso + 0x576
    saved[stack] = (0xDEAD_0000_0000_0000 | user_stack + 0x10)  # only the low 32 bits count
    pt, error = monitor._fast_entry_regs(tuple(saved), stack, task, img.cr3, img.mem)
    assert error is None and pt[k.R_BP] == 7 and pt[k.R_IP] == vdso + 0x578
    assert pt[k.R_BX] == 0x1000 and pt[k.R_SP] == saved[k.R_SP]
    saved[stack] = 0x1000_0000  # unmapped: the sixth argument is unknown, flagged
    pt, error = monitor._fast_entry_regs(tuple(saved), stack, task, img.cr3, img.mem)
    assert pt[k.R_BP] == 0 and error == "unreadable at 0x10000000"
    # mm NULL: no vDSO base
    pt, _ = monitor._fast_entry_regs(tuple(saved), stack, task + 8, img.cr3, img.mem)
    # SYSCALL saved the address of the `int $0x80` before the landing pad; SYSENTER none
    assert pt[k.R_IP] == (vdso + 0x578 if stub == "entry_SYSCALL_compat" else 0)


def signal_frame_monitor(img: GuestImage) -> SyscallMonitor:
    """A syscall monitor reading the guest image's memory, for its signal-frame walk."""
    ctx = context([])
    ctx.mem = img.mem
    return SyscallMonitor(ctx, SyscallDecoder({}))


def eintr_in(frame: str) -> int:
    """-EINTR as a frame of that layout saved it: a u64 (x86-64) or a u32 (ia32)."""
    return (-4) & (0xFFFF_FFFF_FFFF_FFFF if frame == "x86_64" else 0xFFFF_FFFF)


@pytest.mark.parametrize("frame", ["x86_64", "ia32_rt", "ia32_legacy"])
def test_call_returning_into_a_handler_takes_its_result_from_the_frame(frame):
    """A call whose return the kernel redirected into a signal handler: its ax and ip as the
    kernel saved them in the handler's frame, found by the registers it set for the handler
    (ax 0 and ucontext at dx: x86-64; ax the signal number and ucontext at cx: ia32 rt; cx
    0: the ia32 legacy frame at sp). A frame of another return, or none, changes nothing
    and is counted."""
    stack, handler, return_ip = 0x0FFF_E000, 0x0804_9000, 0xF7FC_0578
    img = GuestImage()
    img.map_new(stack)
    regs = [0] * 21
    regs[k.R_IP], regs[k.R_SP] = handler, stack + 0x100
    if frame == "x86_64":  # uc_mcontext at 40: ax at +104, ip at +128
        regs[k.R_DX] = stack + 0x200
        img.write(stack + 0x200 + 40 + 104, struct.pack("<q", -4))
        img.write_u64(stack + 0x200 + 40 + 128, return_ip)
    else:  # sigcontext_32 (ax at +44, ip at +56) in ucontext_ia32 (at 20) or sigframe_ia32 (at 8)
        regs[k.R_AX] = 14  # SIGALRM
        regs[k.R_CX] = stack + 0x300 if frame == "ia32_rt" else 0
        sigcontext = regs[k.R_CX] + 20 if frame == "ia32_rt" else regs[k.R_SP] + 8
        img.write(sigcontext + 44, struct.pack("<iII", -4, 0, 0))
        img.write(sigcontext + 56, struct.pack("<I", return_ip))
    monitor = signal_frame_monitor(img)
    ctx = monitor.ctx
    pt = monitor._from_signal_frame(img.cr3, tuple(regs), return_ip, return_ip - 2)
    assert (pt[k.R_AX], pt[k.R_IP]) == (eintr_in(frame), return_ip)
    assert pt[k.R_SP] == regs[k.R_SP]
    restarted = monitor._from_signal_frame(img.cr3, tuple(regs), return_ip + 2, return_ip)
    assert restarted[k.R_IP] == return_ip  # the saved ip may be the restart before the return
    assert monitor._from_signal_frame(img.cr3, tuple(regs), return_ip + 8, return_ip + 6) == \
        tuple(regs)  # not this return's frame
    assert ctx.loss.counts["unreadable_signal_frame"] == 1
    regs[k.R_DX] = regs[k.R_CX] = regs[k.R_SP] = 0x7000_0000  # unmapped
    assert monitor._from_signal_frame(img.cr3, tuple(regs), return_ip, return_ip - 2) == \
        tuple(regs)
    assert ctx.loss.counts["unreadable_signal_frame"] == 2


@pytest.mark.parametrize("frame", ["x86_64", "ia32_rt", "ia32_legacy"])
def test_two_signals_at_one_return_are_walked_to_the_calls_frame(frame):
    """Two signals delivered at one return: the second handler runs first, and its frame
    holds the registers set for the first one's handler (ip = that handler, and where its
    frame is), whose frame holds the call's. A frame pointing at itself ends at the bound,
    counted."""
    stack, handler1, handler2, return_ip = 0x0FFF_E000, 0x0804_9000, 0x0804_9100, 0xF7FC_0578
    img = GuestImage()
    img.map_new(stack)
    second, first = stack + 0x100, stack + 0x400  # each frame's ucontext (or legacy sigframe)

    def write_saved(frame_at: int, ax: int, cx: int, dx: int, sp: int, ip: int) -> None:
        if frame == "x86_64":  # uc_mcontext at 40: dx, ax, cx, sp, ip from +96
            img.write(frame_at + 40 + 96, struct.pack("<QqQQQ", dx, ax, cx, sp, ip))
        else:  # sigcontext_32 at 20 (rt ucontext) or 8 (legacy sigframe): sp at +28 ... ip +56
            sigcontext = frame_at + (20 if frame == "ia32_rt" else 8)
            img.write(sigcontext + 28, struct.pack("<IIIIi8xI", sp, 0, dx, cx, ax, ip))

    def handler_regs(ip: int, frame_at: int) -> tuple[int, int, int, int, int]:
        """(ax, cx, dx, sp, ip) the kernel sets for a handler whose frame is at frame_at."""
        if frame == "x86_64":
            return 0, 0, frame_at, frame_at - 0x40, ip
        if frame == "ia32_rt":
            return 12, frame_at, frame_at - 0x10, frame_at - 0x40, ip
        return 10, 0, 0, frame_at, ip

    ax1, cx1, dx1, sp1, ip1 = handler_regs(handler1, first)
    write_saved(second, ax1, cx1, dx1, sp1, ip1)  # the second frame: the first handler's start
    write_saved(first, -4, 0, 0, 0x0FFF_F000, return_ip)  # the first frame: the call's
    regs = [0] * 21
    regs[k.R_AX], regs[k.R_CX], regs[k.R_DX], regs[k.R_SP], regs[k.R_IP] = \
        handler_regs(handler2, second)
    monitor = signal_frame_monitor(img)
    ctx = monitor.ctx
    pt = monitor._from_signal_frame(img.cr3, tuple(regs), return_ip, return_ip - 2)
    assert (pt[k.R_AX], pt[k.R_IP]) == (eintr_in(frame), return_ip)
    assert pt[k.R_SP] == regs[k.R_SP]
    assert ctx.loss.counts["unreadable_signal_frame"] == 0

    ax2, cx2, dx2, sp2, ip2 = handler_regs(handler2, second)
    write_saved(second, ax2, cx2, dx2, sp2, ip2)  # a frame that leads back to itself
    assert monitor._from_signal_frame(img.cr3, tuple(regs), return_ip, return_ip - 2) == \
        tuple(regs)
    assert ctx.loss.counts["unreadable_signal_frame"] == 1


@pytest.mark.parametrize("cr,bit,name", [(0, 16, "CR0.WP"), (4, 20, "CR4.SMEP"),
                                         (4, 21, "CR4.SMAP"), (4, 11, "CR4.UMIP")])
def test_integrity_protection_bit_cleared_and_restored(cr, bit, name):
    records: list = []
    mon = IntegrityMonitor(context(records))
    on = 1 << bit | 1
    # boot: the bit gets set (arming), other writes keep it: nothing to report
    mon.on_cr(event(abi.KVMI_EVENT_CR, cr=cr, old_value=1, new_value=on))
    mon.on_cr(event(abi.KVMI_EVENT_CR, cr=cr, old_value=on, new_value=on | 2))
    assert records == []
    mon.on_cr(event(abi.KVMI_EVENT_CR, cr=cr, old_value=on, new_value=1))
    mon.on_cr(event(abi.KVMI_EVENT_CR, cr=cr, old_value=1, new_value=on))
    assert [(r["event_type"], r["target"], r["severity_id"]) for r in records] == \
        [("changed", name, 4), ("restored", name, 4)]
    assert records[0]["old_value"] == on and records[0]["new_value"] == 1
    records_to_batch(records)  # schema-valid


def test_integrity_bit_clear_before_arming_is_boot_not_attack():
    records: list = []
    mon = IntegrityMonitor(context(records))
    mon.on_cr(event(abi.KVMI_EVENT_CR, vcpu=1, cr=0, old_value=1 << 16, new_value=0))
    assert records == []


def test_integrity_lstar_hook_and_restore():
    records: list = []
    mon = IntegrityMonitor(context(records))
    lstar = 0xFFFFFFFF9E400080
    mon.set_baseline(0xC0000082, lstar)
    mon.on_msr(event(abi.KVMI_EVENT_MSR, msr=0xC0000082, old_value=0, new_value=lstar))
    assert records == []  # another vCPU writing the same entry at bring-up
    mon.on_msr(event(abi.KVMI_EVENT_MSR, msr=0xC0000082, old_value=lstar, new_value=0xDEAD000))
    mon.on_msr(event(abi.KVMI_EVENT_MSR, msr=0xC0000082, old_value=0xDEAD000, new_value=lstar))
    assert [(r["event_type"], r["target"]) for r in records] == \
        [("changed", "LSTAR"), ("restored", "LSTAR")]
    assert records[0]["new_value"] == 0xDEAD000


def test_pump_counts_drops_instead_of_blocking():
    class SlowSink(MemorySink):
        def __init__(self) -> None:
            super().__init__()
            self.gate = threading.Event()

        def write(self, records):
            self.gate.wait(10)
            super().write(records)

    sink = SlowSink()
    pump = RecordPump([sink], queue_size=10, batch_size=1)
    offered = [pump.offer({"n": i}) for i in range(200)]
    started = time.monotonic()
    assert offered.count(False) >= 180  # the queue is full: refused at once
    assert time.monotonic() - started < 5
    sink.gate.set()
    assert pump.sync(10)
    pump.close()
    accepted = offered.count(True)
    assert len(sink.records) == accepted


def test_heap_is_frozen_while_any_vm_is_traced_and_back_in_view_after():
    kept = {"cycle": None}
    kept["cycle"] = kept  # alive, tracked, and a cycle: what a freeze could strand
    assert gc.get_freeze_count() == 0, "a collector of an earlier test still traces"
    with heap_frozen():
        assert gc.get_freeze_count() > 0
        with heap_frozen():  # a second VM starts, then ends first
            pass
        assert gc.get_freeze_count() > 0
        assert not any(obj is kept for obj in gc.get_objects())
    assert gc.get_freeze_count() == 0
    assert any(obj is kept for obj in gc.get_objects())


def test_pump_isolates_a_failing_sink():
    class Broken:
        def write(self, records):
            raise OSError("disk full")

        def flush(self):
            pass

        def close(self):
            return {"written": 0}

    good = MemorySink()
    pump = RecordPump([Broken(), good], batch_size=1)
    pump.offer({"n": 1})
    assert pump.sync(10)
    pump.close()
    assert good.records == [{"n": 1}] and pump.sink_errors >= 1


def test_filters():
    f = Filters(pids=frozenset({7}), comms=frozenset({"wl-file"}))
    assert f.task_selected(7, 7, "wl-file") and f.task_selected(3, 7, "wl-file")
    assert not f.task_selected(7, 7, "sh") and not f.task_selected(8, 8, "wl-file")
    assert Filters(syscalls=frozenset({"openat"})).syscall_selected("openat")
    assert not Filters(syscalls=frozenset({"openat"})).syscall_selected("read")


class NoBreakpointHost:
    """A KVMI session stand-in for a standard host (named as such): it answers CHECK_COMMAND
    for the vendor commands with 'no', as kvmi-v7 kernels do."""

    uuid, name, start_time = "vm-std", "std", 0

    def get_guest_info(self):
        return type("Info", (), {"vcpu_count": 1})()

    def check_command(self, command_id):
        return command_id < abi.VMITRACE_SET_BREAKPOINT


def test_host_without_instrumentation_breakpoints_is_refused_clearly():
    from test_trace_support import lab_profile
    tracer = VmTracer(NoBreakpointHost(), lab_profile("6.1"), RecordPump([MemorySink()]),
                      TraceOptions())
    with pytest.raises(SetupError, match="int3 patching .* not implemented"):
        tracer.start()


class OlderPluginHost(NoBreakpointHost):
    """A vmitrace host stand-in (named as such) from before VMITRACE_BLOCK_DIFFER_REVERSED
    and VMITRACE_TABLE_INDIRECT: it refuses both with -KVM_EINVAL, as that plugin did, and
    keeps what it accepted."""

    def __init__(self):
        self.rules: dict[int, tuple] = {}
        self.tables: dict[int, list] = {}

    def set_breakpoint_ex(self, gva, run_on=False, block_reg=0, block_values=(), captures=(),
                          block_flags=0, differ_words=(0, 0)):
        if block_flags & abi.VMITRACE_BLOCK_DIFFER_REVERSED:
            raise KvmEINVAL(abi.KVM_EINVAL, "VMITRACE_SET_BREAKPOINT_EX")
        self.rules[gva] = (run_on, tuple(block_values), block_flags)

    def set_capture_table(self, gva, key_word, entries):
        if any(e.indirect is not None for e in entries):
            raise KvmEINVAL(abi.KVM_EINVAL, "VMITRACE_SET_CAPTURE_TABLE")
        self.tables[gva] = list(entries)


def test_rule_for_an_older_plugin_makes_the_reversed_set_wait():
    """A host that refuses the later flags gets the rule without them: the reversed set's
    values join the bitmap (they always wait) and indirect table entries are left out; the
    trace notes it. The rule the monitors see is the one installed."""
    from test_trace_support import lab_profile
    host = OlderPluginHost()
    tracer = VmTracer(host, lab_profile("6.1"), RecordPump([MemorySink()]), TraceOptions())
    plain, indirect = abi.CaptureTableEntry(0, 13, 64), abi.CaptureTableEntry(59, 19, 64,
                                                                            indirect=8)
    flags = abi.VMITRACE_BLOCK_FROM_CAPTURE | abi.VMITRACE_BLOCK_BITMAP | \
        abi.VMITRACE_BLOCK_WORDS_DIFFER
    rule = BreakpointRule(((4, 0, 168),), run_on=True, block_reg=15,
                          block_values=abi.block_bitmap([43]) + abi.block_bitmap([59]),
                          block_flags=flags | abi.VMITRACE_BLOCK_DIFFER_REVERSED,
                          differ_words=(16, 11), table=(plain, indirect), table_key_word=15)
    assert rule.uses_later_flags() and not rule.for_older_host().uses_later_flags()
    tracer.ctx.breakpoint_rules[0x1000] = rule
    tracer.install_breakpoint(0x1000)
    assert host.rules[0x1000] == (True, abi.block_bitmap([43, 59]), flags)
    assert host.tables[0x1000] == [plain]
    assert tracer.ctx.breakpoint_rules[0x1000] == rule.for_older_host()
    assert any("VMITRACE_BLOCK_DIFFER_REVERSED" in note for note in tracer.notes)


def test_exec_args_recovered_when_unreadable_at_entry_or_left_for_the_exit():
    table = {59: SyscallInfo(59, "execve", (("const char *", "filename"),
                                            ("const char *const *", "argv"),
                                            ("const char *const *", "envp")))}
    dec = SyscallDecoder(table)
    img = GuestImage()
    call = dec.decode_entry(img.mem, img.cr3, 59, [0x7000_0000, 0x7000_1000, 0])
    assert call.args[0]["error"] and call.args[1]["error"]
    dec.complete_exec(call, {"path": ("/bin/busybox", False),
                             "argv": (["/bin/busybox", "sh"], False),
                             "envp": (["X=1"], False)})
    assert call.typed["path"] == "/bin/busybox" and call.argv == ["/bin/busybox", "sh"]
    assert call.args[2]["value"] == "NULL"  # NULL envp was decoded fine at entry: kept


def test_string_area_ends_at_trailing_nuls_and_cuts_at_its_bound():
    """argv ["sh", "", "x"] as the kernel lays it on a new stack, with a padding NUL."""
    img = GuestImage()
    img.map_new(0x7000_0000, 1)
    img.write(0x7000_0000, b"sh\0\0x\0\0")
    area = (img.mem, img.cr3, 0x7000_0000, 0x7000_0007)
    assert k.read_string_area(*area) == (["sh", "", "x"], False)
    assert k.read_string_area(*area, limit=5) == (["sh", "", "x"], True)
    assert k.read_string_area(*area, limit=4) == (["sh"], True)
    assert k.read_string_area(img.mem, img.cr3, 0x7000_0000, 0x7000_0000) == ([], False)


def test_loss_records_carry_deltas_per_interval():
    records: list = []
    ctx = context(records)
    ctx.loss.add("unpaired_exit", 3)
    ctx.emit_losses()
    ctx.loss.add("unpaired_exit", 2)
    ctx.loss.add("dropped_records")
    ctx.emit_losses(final=True)
    ctx.emit_losses()  # nothing new: nothing emitted
    assert [(r["counter"], r["count"], r.get("detail")) for r in records] == \
        [("unpaired_exit", 3, None), ("dropped_records", 1, "final"), ("unpaired_exit", 2, "final")]
    records_to_batch(records)


def test_raw_hypervisor_event_records_when_asked():
    from test_trace_support import lab_profile
    sink = MemorySink()
    pump = RecordPump([sink])
    tracer = VmTracer(NoBreakpointHost(), lab_profile("6.1"), pump,
                      TraceOptions(hv_events=True, integrity=False))
    tracer.handle(event(abi.KVMI_EVENT_CR, vcpu=1, cr=4, old_value=0x10, new_value=0x30))
    tracer.handle(event(abi.KVMI_EVENT_MSR, msr=0x176, old_value=0, new_value=0xFFFF0000))
    pump.sync()
    pump.close()
    assert [(r["kind"], r["event_type"], r["reg_nr"], r["new_value"]) for r in sink.records] == \
        [("hv_event", "cr", 4, 0x30), ("hv_event", "msr", 0x176, 0xFFFF0000)]
    assert sink.records[0]["reg_name"] == "CR4" and sink.records[0]["vcpu"] == 1
    records_to_batch(sink.records)


def test_events_queued_at_the_stop_are_handled_before_the_session_closes():
    """Hosts whose vCPUs run on past their events leave several queued when tracing stops:
    the tracer switches its events off and handles what was received (a recording of the
    session holds those events, and replays them), before it closes the session."""
    from test_trace_support import lab_profile
    ours, theirs = socket.socketpair()
    peer = HostPeer(theirs)
    peer.send_handshake(uuid.UUID(int=7), "stopping")
    session = Session.from_socket(ours, command_timeout=5)
    peer.read_handshake_answer()
    commands: list[tuple[int, int, bytes]] = []

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        commands.append((msg_id, seq, payload))
        if msg_id != abi.KVMI_EVENT_REPLY:
            p.reply(msg_id, seq, 0)
        return True

    sink = MemorySink()
    pump = RecordPump([sink])
    tracer = VmTracer(session, lab_profile("6.1"), pump,
                      TraceOptions(hv_events=True, integrity=False))
    tracer.enabled_events = [abi.KVMI_EVENT_MSR]
    for seq in range(1, 4):
        peer.send_event(seq, 0, abi.KVMI_EVENT_MSR, msr_payload(0x176, 0, seq))
    deadline = time.monotonic() + 5
    while session.pending_events() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    served = peer.serve(host)
    summary = tracer.close()
    pump.close()
    served.join(timeout=5)  # the host has read everything up to the session's close
    assert summary["events"] == 3
    assert [r["new_value"] for r in sink.records if r["kind"] == "hv_event"] == [1, 2, 3]
    # events off first, then the three events handled and answered
    assert commands[0][::2] == (abi.KVMI_CONTROL_EVENTS,
                                struct.pack("<H6xHB5x", 0, abi.KVMI_EVENT_MSR, 0))
    assert [seq for msg_id, seq, _ in commands if msg_id == abi.KVMI_EVENT_REPLY] == [1, 2, 3]
    assert session.closed and session.error is None


def test_reply_spin_default_is_the_sessions() -> None:
    """`vmitrace trace --reply-spin-us` states the Session's default without importing the
    session module for --help: the number must be the same everywhere."""
    from tracer.collector import TraceOptions
    from tracer.kvmi.transport import DEFAULT_REPLY_SPIN_US
    from tracer.trace_cli import _options, trace

    option = next(p for p in trace.params if p.name == "reply_spin_us")
    assert option.default == DEFAULT_REPLY_SPIN_US == TraceOptions().reply_spin_us
    assert _options((), (), (), False).reply_spin_us == DEFAULT_REPLY_SPIN_US
