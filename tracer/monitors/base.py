"""Shared pieces of the monitors: the per-VM context, fast register access, loss counters."""
from __future__ import annotations

import struct
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from sinks.schema import RecordFactory
from tracer.kvmi import abi
from tracer.memory import GuestMemory, UnreadableMemory
from tracer.monitors.kernel import kernel_cr3_candidates


MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSENTER_CS = 0x174
MSR_SYSENTER_ESP = 0x175
MSR_SYSENTER_EIP = 0x176
MSR_NAMES = {MSR_STAR: "STAR", MSR_LSTAR: "LSTAR", MSR_CSTAR: "CSTAR",
             MSR_SYSENTER_CS: "SYSENTER_CS", MSR_SYSENTER_ESP: "SYSENTER_ESP",
             MSR_SYSENTER_EIP: "SYSENTER_EIP"}

# Offsets inside an event message (header + kvmi_event common part, then kvmi_event_arch).
_ARCH = abi.KVMI_MSG_HDR.size + 8


def _arch_offset(path: str) -> int:
    sd = abi.KVMI_EVENT_ARCH
    offset = _ARCH
    for name in path.split("."):
        f = next(f for f in sd.fields if f.name == name)
        offset += f.offset
        sd = f.sub  # type: ignore[assignment]
    return offset


_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
OFF_REGS = _arch_offset("regs")
_REGS = abi.KVM_REGS.struct
_REG_INDEX = {f.name: i for i, f in enumerate(abi.KVM_REGS.fields)}
_I_RIP, _I_RSP, _I_RDI = _REG_INDEX["rip"], _REG_INDEX["rsp"], _REG_INDEX["rdi"]
OFF_CR3 = _arch_offset("sregs.cr3")
OFF_GS_BASE = _arch_offset("sregs.gs.base")
OFF_CS_SEL = _arch_offset("sregs.cs.selector")
OFF_SHADOW_GS = _arch_offset("msrs.shadow_gs")
OFF_LSTAR = _arch_offset("msrs.lstar")


class FastRegs:
    """The few registers the hot path needs, unpacked straight from the event's bytes."""

    __slots__ = ("rip", "rsp", "rdi", "cr3", "gs_base", "cpl", "shadow_gs")

    def __init__(self, raw: bytes) -> None:
        regs = _REGS.unpack_from(raw, OFF_REGS)
        self.rip, self.rsp, self.rdi = regs[_I_RIP], regs[_I_RSP], regs[_I_RDI]
        self.cr3 = _U64.unpack_from(raw, OFF_CR3)[0]
        self.gs_base = _U64.unpack_from(raw, OFF_GS_BASE)[0]
        self.cpl = _U16.unpack_from(raw, OFF_CS_SEL)[0] & 3
        self.shadow_gs = _U64.unpack_from(raw, OFF_SHADOW_GS)[0]

    @property
    def kernel_gs(self) -> int:
        """The per-CPU base: GS base in kernel mode, the shadow (KERNEL_GS_BASE) in user mode."""
        return self.gs_base if self.cpl == 0 else self.shadow_gs


@dataclass(frozen=True)
class BreakpointRule:
    """What a vmitrace host (VMITRACE_SET_BREAKPOINT_EX) adds to a breakpoint's hits:
    `captures`, (base, offset, length) regions of guest memory copied at the hit, and with
    `run_on`, no wait for the reply except where general register `block_reg` (or with
    abi.VMITRACE_BLOCK_FROM_CAPTURE in `block_flags`, word `block_reg` of the first capture)
    holds one of `block_values` (with abi.VMITRACE_BLOCK_BITMAP: a value of that set)."""

    captures: tuple[tuple[int, int, int], ...]
    run_on: bool = False
    block_reg: int = 0
    block_values: tuple[int, ...] = ()
    block_flags: int = 0
    differ_words: tuple[int, int] = (0, 0)  # with abi.VMITRACE_BLOCK_WORDS_DIFFER
    # Pointer captures (abi.VMITRACE_SET_CAPTURE_TABLE): entries selected by word
    # `table_key_word` of the first capture; they arrive as `event.pointer_captures`.
    table: tuple[abi.CaptureTableEntry, ...] = ()
    table_key_word: int = 0

    def uses_later_flags(self) -> bool:
        """Whether the rule needs a host that takes abi.VMITRACE_BLOCK_DIFFER_REVERSED,
        abi.VMITRACE_TABLE_INDIRECT and abi.VMITRACE_TABLE_WAIT_IF_CUT (vmitrace plugins
        since the three were added together)."""
        return bool(self.block_flags & abi.VMITRACE_BLOCK_DIFFER_REVERSED or
                    any(e.indirect is not None or e.wait_if_cut for e in self.table))

    def for_older_host(self) -> "BreakpointRule":
        """This rule for a host that refuses those (`uses_later_flags`): the values of the
        reversed set always wait, and the table has no indirect entries (their hits wait
        instead) nor WAIT_IF_CUT ones."""
        half = abi.VMITRACE_MAX_BLOCK_VALUES
        words = self.block_values
        if self.block_flags & abi.VMITRACE_BLOCK_DIFFER_REVERSED:
            words = tuple(a | b for a, b in zip(words[:half], words[half:]))
        return replace(self, block_values=words,
                       block_flags=self.block_flags & ~abi.VMITRACE_BLOCK_DIFFER_REVERSED,
                       table=tuple(e._replace(wait_if_cut=False) for e in self.table
                                   if e.indirect is None))


@dataclass
class LossCounters:
    """Per-VM counters of what could not be observed or delivered."""

    counts: Counter[str] = field(default_factory=Counter)
    reported: Counter[str] = field(default_factory=Counter)
    interval_start_ns: int = 0

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def deltas(self) -> dict[str, int]:
        out = {k: v - self.reported[k] for k, v in self.counts.items() if v != self.reported[k]}
        self.reported.update(out)
        return out


@dataclass
class Filters:
    pids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    syscalls: frozenset[str] = frozenset()

    def task_selected(self, pid: int, tid: int, comm: str) -> bool:
        if self.pids and pid not in self.pids and tid not in self.pids:
            return False
        return not self.comms or comm in self.comms

    def syscall_selected(self, name: str) -> bool:
        return not self.syscalls or name in self.syscalls


class VmContext:
    """What every monitor of one VM shares: session, memory, kernel layout, record output."""

    def __init__(self, session: Any, mem: GuestMemory, factory: RecordFactory,
                 emit: Callable[[dict[str, Any]], None], filters: Filters,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.session = session
        self.mem = mem
        self.factory = factory
        self.emit = emit
        self.filters = filters
        self.clock = clock
        self.loss = LossCounters(interval_start_ns=clock())
        self.vm_id = factory.vm_id
        self.breakpoints: dict[int, Callable[[Any, FastRegs], None]] = {}
        self.install_queue: list[int] = []
        # Set by the collector: whether the host takes breakpoint rules, and whether hits may
        # run on without a reply (TraceOptions.run_on_syscalls); the rules installed, by gva.
        self.breakpoint_rules_supported = False
        self.capture_tables_supported = False
        self.run_on_allowed = False
        self.breakpoint_rules: dict[int, BreakpointRule] = {}
        self.layout: Any = None   # KernelLayout once the slide is known
        self.tasks: Any = None    # TaskReader once the slide is known
        self.ready_callbacks: list[Callable[[], None]] = []
        self.events = 0
        self.events_run_on = 0  # of which the vCPU did not wait for (BreakpointRule.run_on)
        # Work a handler leaves for after the event's reply, while the guest runs on: what
        # needs no guest state that the vCPU could change once released. Run in order,
        # before the next event is handled.
        self.deferred: list[Callable[[], None]] = []

    def defer(self, work: Callable[[], None]) -> None:
        self.deferred.append(work)

    def add_breakpoint(self, gva: int, handler: Callable[[Any, FastRegs], None],
                       rule: BreakpointRule | None = None) -> None:
        """Route hits at `gva` to `handler`; the host is asked by the collector's installer.

        Setting a breakpoint makes the host flush its translations, which needs every vCPU
        to make progress: the command must never be waited for by the thread that replies
        to events, so it is queued here and sent from another thread.

        With a `rule`, where the host takes rules, hits carry its captures (`event.captured`)
        and, if it says so and `run_on_allowed`, do not wait for the reply (the handler sees
        `event.blocking` False).
        """
        self.breakpoints[gva] = handler
        if rule is not None and self.breakpoint_rules_supported:
            if rule.run_on and not self.run_on_allowed:
                rule = replace(rule, run_on=False)
            if rule.table and not self.capture_tables_supported:
                rule = replace(rule, table=())
            self.breakpoint_rules[gva] = rule
        self.install_queue.append(gva)

    def record(self, kind: str, event_type: str, time_ns: int | None = None,
               **fields: Any) -> dict[str, Any]:
        rec = self.factory.new(kind, event_type, self.clock() if time_ns is None else time_ns,
                               **fields)
        self.emit(rec)
        return rec

    def current_process(self, regs: FastRegs) -> dict[str, Any]:
        """Process columns of the task current on the event's vCPU, from any mode.

        From user mode under KPTI the CR3 is the user half of the pair: kernel data is read
        through the kernel half. Best effort: unreadable -> no columns, counted.
        """
        if self.tasks is None:
            return {}
        for cr3 in kernel_cr3_candidates(regs.cr3)[::-1]:
            try:
                task = self.tasks.current(cr3, regs.kernel_gs)
                return process_fields(self.tasks.info(cr3, task, user_cr3=regs.cr3))
            except UnreadableMemory:
                continue
        self.loss.add("unreadable_task")
        return {}

    def emit_losses(self, final: bool = False) -> None:
        now = self.clock()
        for counter, count in sorted(self.loss.deltas().items()):
            self.emit(self.factory.loss(counter, count, self.loss.interval_start_ns, now,
                                        detail="final" if final else None))
        self.loss.interval_start_ns = now


def process_fields(info: Any) -> dict[str, Any]:
    """Schema columns describing the process of a TaskInfo."""
    return {"pid": info.pid, "tid": info.tid, "ppid": info.ppid, "uid": info.uid,
            "gid": info.gid, "process_uid": info.process_uid, "task_start_ns": info.start_ns,
            "comm": info.comm, "exe": info.exe, "cmdline": info.cmdline}
