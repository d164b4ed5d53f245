"""The syscall monitor: decoded system calls, paired entry/exit per task.

Mechanism (Linux x86-64): LSTAR points at `entry_SYSCALL_64`; its slide against the profile
gives KASLR, confirmed by reading `linux_banner`. Inside `entry_SYSCALL_64` the kernel saves
the user registers as `pt_regs` on the task stack, switches CR3 and GS, and calls
`do_syscall_64(regs, nr)`. Two breakpoints:

* at that `call do_syscall_64`: RSP points at pt_regs (orig_ax = number, di/si/dx/r10/r8/r9 =
  arguments, ip = user return address), CR3 is the kernel's (KPTI switch done) and GS is the
  kernel's, so `current` is readable;
* right after it (the call's return address): pt_regs->ax holds the return value, for both the
  SYSRET and the IRET ways out, after signal handling has run.

Entries and exits are paired by task_struct address (not by vCPU: a task may return on another
vCPU). exit/exit_group never return (records of event_type "enter"); a new task's first return
goes through ret_from_fork, not this site (the process monitor sees it); a syscall the kernel
restarts comes back with ip rewound by 2 and ax = its number (recorded as restarted, then seen
again as a fresh entry).

32-bit system calls (ia32 ABI, CONFIG_IA32_EMULATION): any process, 64-bit ones included, can
execute `int $0x80`. Its IDT entry is `asm_int80_emulation`, which saves pt_regs and calls
`int80_emulation(regs)` (both lab kernels, 6.1 by a stable backport; older kernels:
`entry_INT80_compat` -> `do_int80_syscall_32`). The same two breakpoints go at that call and
after it: bx/cx/dx/si/di/bp = arguments, ax = return value at the return. The number is in
eax at the entry (the IDT stub stores -1 as orig_ax; int80_emulation copies eax there), in
orig_ax for the other stubs. The `sysenter` and 32-bit `syscall` stubs
(`entry_SYSENTER_compat` -> `do_SYSENTER_32`, `entry_SYSCALL_compat` -> `do_fast_syscall_32`)
serve 32-bit processes whose libc enters through the vDSO's __kernel_vsyscall (`sysenter` on
Intel, `syscall` on AMD: the lab's qemu64 model is AMD; tests run both). At their call,
pt_regs holds bx/cx/dx/si/di = arguments 1-5 (the SYSCALL stub saves the user's ebp, where
the vDSO copied ecx, as cx), but not the sixth: the vDSO pushed the caller's ebp, and
do_fast_syscall_32 fetches that u32 from the user stack into bp only after the breakpoint.
So the monitor reads it there before the reply, at the 32-bit user stack pointer: pt_regs->bp
for SYSENTER (which loses esp; the vDSO put esp in ebp, do_SYSENTER_32 copies it to sp),
pt_regs->sp for SYSCALL. Unreadable, it is an argument with its error set (the kernel fails
such a call with EFAULT). The C handler also makes the user ip the vDSO's int80_landing_pad
(sysenter saves none): the monitor computes it from mm->context.vdso, so records carry the
return address and a restarted call (ip rewound to the `int $0x80` before the landing pad,
where it enters again through the int80 stub) is recognized. Where the host takes rules,
32-bit hits run on like 64-bit ones (below), pointer captures included (their addresses and
lengths are the registers' low 32 bits, VMITRACE_TABLE_WORDS32, as the kernel reads them);
at the fast stubs' entries the host also copies the sixth argument from the caller's stack
for the calls that have one (where it takes no capture tables, they wait for the collector
to read it), and a call whose other captures would need its value is not captured. A call whose
return the kernel redirected into a signal handler (pt_regs ip no longer the return address
known from its entry) takes its result from the handler's frame (ia32 or x86-64 layout, by
how the handler was installed), read at the exit even where it ran on: the frame stays as
written until the handler returns, and that return waits at its entry. (The captures of
such a 32-bit exit followed the handler's registers: what its decoding reads is read live,
counted, while the caller waits behind the handler.)
Records of 32-bit calls carry extra abi=ia32.

Most of the work is done after the event's reply, while the guest runs (VmContext.defer): at
an entry only the task and the saved registers are read before the vCPU goes on. The call's
user memory cannot change meanwhile, since the caller waits in the kernel, unless another
thread of the process writes it (the same window strace has). Calls that replace or end the
address space (execve, exit) or change the task's credentials or name are decoded before the
reply (DECODED_AT_ENTRY); so are OUT parameters at exit, which the caller may reuse as soon
as it runs. execve's entry reads only its path: its argv and envp are read at its exit, where
the new image's stack holds what the kernel copied (or, after a failure, the caller's memory
still holds them).

Where the host offers it (vmitrace's VMITRACE_SET_BREAKPOINT_EX), the host copies pt_regs
and the current task into both events at the hit (no reads on the way to the reply), and
the 64-bit entry does not wait for a reply at all, except for execve/execveat, the calls
that change credentials or the task's name, and rt_sigreturn for the signal frames above
(`entries_that_wait`; exit/exit_group too unless the process monitor's do_exit
breakpoint, which waits, holds the dying task before its memory goes): the host checks
the number, which `entry_SYSCALL_64` passes to do_syscall_64 in rsi (found by its
`movslq %eax,%rsi`; without it every entry waits), against a bitmap. What the vCPU
changes once it runs on is in those captures: pt_regs (the
kernel rewrites them for rt_sigreturn and for signal delivery on the way out) and the
current task (another may run on that vCPU while the call sleeps). What stays in guest
memory, the call's user buffers, cannot change before the caller runs again, and it does
not run again before its exit is answered: the exit of a call with user buffers blocks
(unless the host copied them, below), and events are handled in order, so the entry is
decoded first.

The exit runs on too when the call's decoding reads no guest memory at all (close, brk, mmap,
getpid, ...: `exits_that_wait`), since then nothing the caller does next can change its
record: the exit's rule has the host compare the captured pt_regs->orig_ax (the number; -1
after rt_sigreturn, which waits) with a bitmap of the calls that must wait. Those are the
calls with IN or OUT memory arguments, and execve. A task's later events, its death
included, arrive after such an exit and are handled in order: after a change of
credentials or name (whose entry waits, so that its record shows the task as it was), they
read the task again.

Where the host also takes pointer-capture tables (VMITRACE_SET_CAPTURE_TABLE), the calls
with memory arguments that bounded captures hold (paths, read/write buffers, socket
addresses passed in, struct stat, wait status, ...: SyscallDecoder.capture_plan) run on at
both sites as well: keyed by orig_ax, the host copies the IN arguments at the entry and the
OUT ones (with the IN ones again, for those the kernel had still to fault in) at the exit,
and the call is decoded from those copies (memory.CapturedMemory). A read they do not hold
goes to live memory and is counted (`read_after_run_on`). Calls with addresses or lengths
held in guest memory (msghdr, accept's sockaddr) still wait at their exit. So does a failed
exec (its argv is read from the caller's memory), but a successful one runs on: its return
is redirected to the new image, which the exit rule's reversed set
(VMITRACE_BLOCK_DIFFER_REVERSED) lets run on, and the host copies the strings at the top of
the new stack, from the argv[0] pointer at sp + 8 (VMITRACE_TABLE_INDIRECT): argv, envp and
the filename (more than the capture holds, 8 KiB, and the exit waits: VMITRACE_TABLE_WAIT_IF_CUT).
The task's kernel state (name, credentials, exe) is read after the reply: only the task's
later events can change it, and those that do wait at their entries.
"""
from __future__ import annotations

import logging
import struct
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

from sinks.schema import KIND_PROCESS, KIND_SYSCALL
from tracer.decode import DecodedCall, SyscallDecoder
from tracer.decode.syscalls import RETURN_VALUE, CaptureSpec
from tracer.kvmi.events import PointerCapture
from tracer.memory import CapturedMemory, GuestMemory, UnreadableMemory
from tracer.monitors import kernel as k
from tracer.kvmi.abi import (VMITRACE_BLOCK_BITMAP, VMITRACE_BLOCK_BITMAP_VALUES,
                             VMITRACE_BLOCK_DIFFER_REVERSED, VMITRACE_BLOCK_FROM_CAPTURE,
                             VMITRACE_BLOCK_WORDS_DIFFER, VMITRACE_CAPTURE_GS_BASE,
                             VMITRACE_MAX_POINTER_CAPTURE, VMITRACE_MAX_TABLE_CAPTURES,
                             CaptureTableEntry, block_bitmap)
from tracer.monitors.base import BreakpointRule, FastRegs, VmContext, process_fields

log = logging.getLogger(__name__)

CALL_REL32 = 0xE8
ENTRY_SCAN_BYTES = 512
NO_RETURN = frozenset({"exit", "exit_group"})
EXECS = frozenset({"execve", "execveat"})
# A signal handler's return: the kernel restores what the handler's frame holds.
SIGRETURNS = frozenset({"sigreturn", "rt_sigreturn"})
# Syscalls after which cached task attributes (credentials, name) may be stale.
CHANGES_TASK = frozenset({"setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
                          "setfsuid", "setfsgid", "prctl", "capset", "setgroups",
                          "setuid32", "setgid32", "setreuid32", "setregid32", "setresuid32",
                          "setresgid32", "setfsuid32", "setfsgid32", "setgroups32"})
# Calls decoded before their entry is answered: they replace or end the address space, or
# change what the records show of the task (which must be read as it was before the call).
DECODED_AT_ENTRY = EXECS | NO_RETURN | CHANGES_TASK
# 32-bit entry stubs, the C handler each calls with the pt_regs pointer in rdi (= rsp), where
# the system call number is in pt_regs at that call, and for the vDSO's fast stubs, which
# pt_regs slot holds the user stack pointer where the sixth argument is (None: it is in bp).
# SYSENTER loses esp: the vDSO copied it to ebp, and do_SYSENTER_32 moves bp into sp only
# after our breakpoint; the 32-bit SYSCALL stub saved esp as pt_regs->sp.
IA32_ENTRIES = (("asm_int80_emulation", "int80_emulation", k.R_AX, None),
                ("entry_INT80_compat", "do_int80_syscall_32", k.R_ORIG_AX, None),
                ("entry_SYSENTER_compat", "do_SYSENTER_32", k.R_ORIG_AX, k.R_BP),
                ("entry_SYSCALL_compat", "do_fast_syscall_32", k.R_ORIG_AX, k.R_SP))
IA32_ARGS = (k.R_BX, k.R_CX, k.R_DX, k.R_SI, k.R_DI, k.R_BP)
MOVSLQ_EAX_RSI = bytes.fromhex("4863f0")  # how entry_SYSCALL_64 passes the number (5.11+)
REG_RSI, REG_RSP = 6, 4                   # x86 register numbers
# Signal frames: where the kernel saved the registers of what the handler interrupted (read
# as (dx, ax, cx, sp, ip) by the Structs, from the offset of the first one read), at an
# address it left in pt_regs for the handler:
# * x86-64: struct ucontext at dx: uc_flags, uc_link, stack_t uc_stack (24 bytes), then
#   uc_mcontext = struct sigcontext: r8-r15, di, si, bp, bx, dx, ax, cx, sp, ip, ...
# * ia32: struct sigcontext_32 {u16 gs, fs, es, ds and their pads; u32 di, si, bp, sp, bx, dx,
#   cx, ax, trapno, err, ip, ...}, in struct ucontext_ia32 at cx (u32 uc_flags, uc_link,
#   uc_stack (12 bytes), uc_mcontext) for an rt frame (SA_SIGINFO), else in the legacy
#   struct sigframe_ia32 {u32 pretcode; int sig; struct sigcontext_32 sc; ...} at sp.
UCONTEXT_DX = 8 + 8 + 24 + 12 * 8
SIGCONTEXT_DX_IP = struct.Struct("<QQQQQ")  # dx, ax, cx, sp, ip
SIGCONTEXT32_SP = 16 + 3 * 4
UCONTEXT32_SP = 4 + 4 + 12 + SIGCONTEXT32_SP
SIGFRAME32_SP = 4 + 4 + SIGCONTEXT32_SP
SIGCONTEXT32_SP_IP = struct.Struct("<I4xIII8xI")  # sp, (bx), dx, cx, ax, (trapno, err), ip
# The kernel stacks a frame for each signal it delivers at one return: at most one per
# signal number, since each is blocked while its handler runs, unless SA_NODEFER. A deeper
# stack is counted, not walked.
MAX_SIGNAL_FRAMES = 64
ABI_IA32 = "ia32"


class SetupError(Exception):
    """The syscall monitor cannot be installed on this guest."""


@dataclass(frozen=True, slots=True)
class Abi:
    """One system call convention: how to read a call from the pt_regs its entry saved."""

    name: str                # "x86_64" or ABI_IA32 (the records' extra["abi"])
    decoder: SyscallDecoder
    nr: int                  # pt_regs index of the number at the entry
    args: tuple[int, ...]    # pt_regs indices of the six arguments
    restart_nr: int | None   # restart_syscall's number in this ABI
    arg6_stack: int | None = None  # pt_regs index of the user stack pointer whose first u32
    #                                is the sixth argument (the fast ia32 stubs), if not in args
    stub: str | None = None        # the ia32 entry stub (counted in ia32_hits)
    # with arg6_stack: the numbers (below 512) whose decoding shows a sixth argument
    arg6: frozenset[int] = field(default_factory=frozenset, compare=False)
    # calls decoded from the host's pointer captures at this ABI's sites: their exits run on
    captured: set[int] = field(default_factory=set, compare=False)


@dataclass(slots=True)
class Pending:
    abi: Abi
    name: str
    call: DecodedCall | None  # None: filtered out, paired only to keep the books right
    info: Any
    time_ns: int
    vcpu: int
    user_ip: int
    cr3: int


def find_call_site(text: bytes, text_address: int, target: int) -> int | None:
    """Address of the first `call rel32` in `text` (at `text_address`) that targets `target`."""
    pos = text.find(bytes([CALL_REL32]))
    while 0 <= pos <= len(text) - 5:
        rel = int.from_bytes(text[pos + 1:pos + 5], "little", signed=True)
        if (text_address + pos + 5 + rel) & 0xFFFF_FFFF_FFFF_FFFF == target:
            return text_address + pos
        pos = text.find(bytes([CALL_REL32]), pos + 1)
    return None


def exec_numbers(decoder: SyscallDecoder) -> list[int]:
    """The numbers of execve and execveat in `decoder`'s ABI, in order."""
    return sorted(nr for nr in (decoder.number(name) for name in EXECS) if nr is not None)


class SyscallMonitor:
    def __init__(self, ctx: VmContext, decoder: SyscallDecoder,
                 ia32_decoder: SyscallDecoder | None = None) -> None:
        self.ctx = ctx
        self.decoder = decoder
        self.x86_64 = Abi("x86_64", decoder, k.R_ORIG_AX,
                          (k.R_DI, k.R_SI, k.R_DX, k.R_R10, k.R_R8, k.R_R9),
                          decoder.number("restart_syscall"))
        self.ia32_decoder = ia32_decoder
        self.do_exit_waits = False  # see install
        self.pending: dict[int, Pending] = {}
        self.seen_tasks: set[int] = set()
        self.entry_site: int | None = None
        self.return_site: int | None = None
        self.ia32_sites: dict[str, int] = {}  # entry stub -> its call site
        self.ia32_hits: Counter[str] = Counter()  # entry stub -> entries seen there
        self.landing_pad: int | None = None  # int80_landing_pad's offset in the 32-bit vDSO
        self.calls = 0

    # -- setup ------------------------------------------------------------------------------
    def install(self, kernel_cr3: int, do_exit_waits: bool = False) -> None:
        """Find the do_syscall_64 call site in entry_SYSCALL_64 and break on it and after it.

        `do_exit_waits`: every exiting task stops at a waiting breakpoint in do_exit before
        its memory goes (the process monitor's), so exit/exit_group entries need not wait:
        their records are read while the task is held there at the latest."""
        self.do_exit_waits = do_exit_waits
        layout = self.ctx.layout
        entry = layout.address("entry_SYSCALL_64")
        target = layout.address("do_syscall_64")
        text = self.ctx.mem.read_virtual(kernel_cr3, entry, ENTRY_SCAN_BYTES)
        site = find_call_site(text, entry, target)
        if site is None:
            raise SetupError(f"no `call do_syscall_64` in the first {ENTRY_SCAN_BYTES} bytes of "
                             f"entry_SYSCALL_64 at {entry:#x}")
        self.entry_site, self.return_site = site, site + 5
        captures = ((REG_RSP, 0, k.PT_REGS_SIZE),  # at both sites, rsp points at pt_regs
                    (VMITRACE_CAPTURE_GS_BASE, layout.current_offset, 8))
        entry_rule = BreakpointRule(captures)
        exit_rule = BreakpointRule(captures)
        if MOVSLQ_EAX_RSI in text[:site - entry]:
            entry_waits = self.entries_that_wait()
            entry_table, exit_table = self._capture_tables(self.x86_64, entry_waits)
            entry_rule = BreakpointRule(captures, run_on=True, block_reg=REG_RSI,
                                        block_values=block_bitmap(entry_waits),
                                        block_flags=VMITRACE_BLOCK_BITMAP, table=entry_table,
                                        table_key_word=k.R_ORIG_AX)
            # An exit whose return the kernel redirected (a signal handler's frame, also
            # sigreturn and exec: pt_regs ip no longer equals cx, where SYSCALL saved the
            # same return address) waits: its pt_regs no longer hold the call's arguments,
            # so the table captured the wrong addresses.
            exit_waits = self.exits_that_wait()
            block_values = block_bitmap(exit_waits)
            block_flags = VMITRACE_BLOCK_FROM_CAPTURE | VMITRACE_BLOCK_BITMAP | \
                VMITRACE_BLOCK_WORDS_DIFFER
            if self.capture_tables_usable():
                # A successful exec's return is redirected to the new image: that exit runs
                # on, with the strings at its new stack's top copied, from argv[0] (the
                # pointer at sp + 8) on (`_after_exec`), unless they are longer than a
                # capture holds; a failed one returns to the caller and waits (the rule's
                # reversed set).
                execs = exec_numbers(self.decoder)
                exit_table += tuple(CaptureTableEntry(nr, k.R_SP, VMITRACE_MAX_POINTER_CAPTURE,
                                                      indirect=8, wait_if_cut=True)
                                    for nr in execs)
                block_values = block_bitmap(set(exit_waits).difference(execs)) + \
                    block_bitmap(execs)
                block_flags |= VMITRACE_BLOCK_DIFFER_REVERSED
            exit_rule = BreakpointRule(captures, run_on=True, block_reg=k.R_ORIG_AX,
                                       block_values=block_values, block_flags=block_flags,
                                       differ_words=(k.R_IP, k.R_CX), table=exit_table,
                                       table_key_word=k.R_ORIG_AX)
        self.ctx.add_breakpoint(site, self.on_entry, entry_rule)
        self.ctx.add_breakpoint(site + 5, self.on_exit, exit_rule)
        log.info("syscall breakpoints at %#x (entry) and %#x (return)", site, site + 5)
        if self.ia32_decoder is not None:
            self._install_ia32(kernel_cr3, self.ia32_decoder, captures)

    def entries_that_wait(self, decoder: SyscallDecoder | None = None,
                          arg6_on_stack: bool = False) -> list[int]:
        """Calls (64-bit, or of `decoder`'s ABI) whose entry must wait for its reply when
        entries run on: those DECODED_AT_ENTRY (exit and exit_group aside where
        `do_exit_waits`) and a signal handler's return (SIGRETURNS: until it is answered,
        the frame of a call the handler interrupted is as the kernel wrote it, see
        `_from_signal_frame`); with `arg6_on_stack` (the fast ia32 stubs, on a host that
        does not copy the caller's stack for them: the sixth argument is read from it at
        the entry) also `arg6_calls`."""
        decoder = decoder or self.decoder
        numbers = {decoder.number(name) for name in DECODED_AT_ENTRY | SIGRETURNS
                   if not (self.do_exit_waits and name in NO_RETURN)}
        if arg6_on_stack:
            numbers |= self.arg6_calls(decoder)
        return sorted(n for n in numbers if n is not None and n < VMITRACE_BLOCK_BITMAP_VALUES)

    def exits_that_wait(self, abi: Abi | None = None) -> list[int]:
        """Calls (64-bit, or of `abi`) whose exit must wait for its reply when entries run
        on: those whose decoding reads guest memory (user buffers the caller may reuse once
        it returns; the entry's IN arguments too, since its record is built after the caller
        could run) that the host does not capture (`Abi.captured`), and exec, after which
        the monitors read the new image before it runs. (After credential or name changes
        they only drop what they cached of the task: its next events, handled in order, read
        it again.) Numbers with no entry in the table read nothing and run on."""
        abi = abi or self.x86_64
        decoder = abi.decoder
        execs = exec_numbers(decoder)
        return sorted(nr for nr in decoder.syscalls
                      if nr < VMITRACE_BLOCK_BITMAP_VALUES and nr not in abi.captured and
                      (decoder.reads_memory(nr) or nr in execs))

    def _capture_tables(self, abi: Abi, entry_waits: list[int]
                        ) -> tuple[tuple[CaptureTableEntry, ...], tuple[CaptureTableEntry, ...]]:
        """Pointer-capture tables for an ABI's entry and return sites, keyed by the call's
        number, where the host takes them and hits may run on: every call whose memory
        arguments a bounded capture holds (SyscallDecoder.capture_plan) is decoded from what
        the host copied at its entry and exit, so neither waits. Calls whose entry waits
        (`entry_waits`) are read then instead. At the fast ia32 stubs the sixth argument is
        not in pt_regs at the entry but on the caller's stack: the entry table also copies
        that u32 for every call that has one (`Abi.arg6`), and leaves out captures that
        would need its value. Fills `abi.captured`."""
        if not self.capture_tables_usable():
            return (), ()
        words, decoder = abi.args, abi.decoder
        words32 = abi is not self.x86_64
        special = set(entry_waits)

        def entries(nr: int, specs: list[CaptureSpec]) -> list[CaptureTableEntry]:
            return [CaptureTableEntry(
                nr, words[c.pos], c.max_length, string=c.string,
                length_word=None if c.length_pos is None else
                k.R_AX if c.length_pos == RETURN_VALUE else words[c.length_pos],
                signed_length=c.length_pos == RETURN_VALUE, words32=words32) for c in specs]
        entry_table: list[CaptureTableEntry] = []
        exit_table: list[CaptureTableEntry] = []
        for nr in range(VMITRACE_BLOCK_BITMAP_VALUES):
            if nr in special:
                continue
            stack_word: list[CaptureTableEntry] = []
            if nr in abi.arg6:
                stack_word = [CaptureTableEntry(nr, abi.arg6_stack, 4, words32=True)]
            plan = decoder.capture_plan(nr)
            if plan is None or not decoder.reads_memory(nr) or \
                    (abi.arg6_stack is not None and
                     any(5 in (c.pos, c.length_pos) for c in plan[0] + plan[1])) or \
                    len(stack_word) + len(plan[0]) > VMITRACE_MAX_TABLE_CAPTURES:
                entry_table += stack_word  # memory arguments, if any: read while the exit waits
                continue
            entry_table += stack_word + entries(nr, plan[0])
            exit_table += entries(nr, plan[1])
            abi.captured.add(nr)
        return tuple(entry_table), tuple(exit_table)

    def capture_tables_usable(self) -> bool:
        """Whether the host copies what capture tables name at hits that run on."""
        return self.ctx.capture_tables_supported and self.ctx.run_on_allowed

    def arg6_calls(self, decoder: SyscallDecoder) -> set[int]:
        """Numbers whose decoding shows a sixth argument: six-argument prototypes, and the
        calls without one (raw arguments, all six), known or not."""
        return {nr for nr in range(VMITRACE_BLOCK_BITMAP_VALUES)
                if nr not in decoder.syscalls or decoder.syscalls[nr].prototype is None or
                len(decoder.syscalls[nr].prototype) == 6}

    def _install_ia32(self, kernel_cr3: int, decoder: SyscallDecoder,
                      captures: tuple[tuple[int, int, int], ...]) -> None:
        """Break at each 32-bit entry stub's call of its C handler that this kernel has.

        Where the host takes rules, the hits capture pt_regs and the current task and run
        on like the 64-bit ones (the number: pt_regs word `nr` at the entry, orig_ax at the
        exit), with capture tables: a 32-bit call that reads user memory the host does not
        copy waits at its exit. At the fast stubs' entries, calls with a sixth argument run
        on where the host copies it from the caller's stack (capture tables), else wait."""
        layout = self.ctx.layout
        image, field_at = layout.address("vdso_image_32"), layout.vdso.get("landing_pad")
        if image is not None and field_at is not None:
            try:
                self.landing_pad = self.ctx.mem.read_u64(kernel_cr3, image + field_at)
            except UnreadableMemory as exc:
                log.warning("vdso_image_32 unreadable (%s): 32-bit vDSO calls keep the saved "
                            "rip", exc)
        for stub, handler, nr, arg6_stack in IA32_ENTRIES:
            entry, target = layout.address(stub), layout.address(handler)
            if entry is None or target is None:
                continue
            text = self.ctx.mem.read_virtual(kernel_cr3, entry, ENTRY_SCAN_BYTES)
            site = find_call_site(text, entry, target)
            if site is None:
                log.warning("no `call %s` in %s: its 32-bit system calls are not traced",
                            handler, stub)
                continue
            self.ia32_sites[stub] = site
            abi = Abi(ABI_IA32, decoder, nr, IA32_ARGS, decoder.number("restart_syscall"),
                      arg6_stack, stub, frozenset(self.arg6_calls(decoder))
                      if arg6_stack is not None else frozenset())
            by_number = VMITRACE_BLOCK_FROM_CAPTURE | VMITRACE_BLOCK_BITMAP
            entry_waits = self.entries_that_wait(decoder, arg6_on_stack=arg6_stack is not None
                                                 and not self.capture_tables_usable())
            entry_table, exit_table = self._capture_tables(abi, entry_waits)
            self.ctx.add_breakpoint(site, partial(self.on_entry, abi=abi), BreakpointRule(
                captures, run_on=True, block_reg=nr, block_values=block_bitmap(entry_waits),
                block_flags=by_number, table=entry_table, table_key_word=nr))
            self.ctx.add_breakpoint(site + 5, self.on_exit, BreakpointRule(
                captures, run_on=True, block_reg=k.R_ORIG_AX,
                block_values=block_bitmap(self.exits_that_wait(abi)), block_flags=by_number,
                table=exit_table, table_key_word=k.R_ORIG_AX))
            log.info("32-bit syscall breakpoints in %s at %#x and %#x", stub, site, site + 5)

    # -- events -----------------------------------------------------------------------------
    def on_entry(self, event: Any, regs: FastRegs, abi: Abi | None = None) -> None:
        abi = abi or self.x86_64
        ctx = self.ctx
        now = ctx.clock()
        cr3 = regs.cr3
        state = self._state_at_hit(event, regs)
        if state is None:
            ctx.loss.add("unreadable_entry")
            return
        pt, task = state
        arg6_error = None
        if abi.stub is not None:
            self.ia32_hits[abi.stub] += 1
        if abi.arg6_stack is not None:
            nr = pt[abi.nr] & 0xFFFF_FFFF
            # a sixth argument: copied by the host, or read while the vCPU waits
            stack = CapturedMemory(ctx.mem, event.pointer_captures) \
                if nr >= VMITRACE_BLOCK_BITMAP_VALUES or nr in abi.arg6 else None
            pt, arg6_error = self._fast_entry_regs(pt, abi.arg6_stack, task, cr3, stack)
            if stack is not None:
                self._count_live_reads(stack, waited=event.blocking)
        name = abi.decoder.name(pt[abi.nr])
        if name in DECODED_AT_ENTRY:
            self._enter(abi, task, pt, name, now, event.vcpu, cr3, arg6_error)
        else:
            ctx.defer(partial(self._enter, abi, task, pt, name, now, event.vcpu, cr3, arg6_error,
                              event.pointer_captures))

    def _fast_entry_regs(self, pt: tuple[int, ...], stack: int, task: int, cr3: int,
                         user: GuestMemory | CapturedMemory | None
                         ) -> tuple[tuple[int, ...], str | None]:
        """pt_regs as do_fast_syscall_32 completes them before the call runs: bp = the sixth
        argument, the u32 at the user stack pointer (32 bits) where the vDSO pushed the
        caller's ebp; ip = the vDSO's int80_landing_pad, where the call returns (and 2 bytes
        before which, at its `int $0x80`, a restarted call starts again). Returns them and the
        error of an unreadable sixth argument (bp 0 then; the kernel fails such a call with
        EFAULT). Where the landing pad is unknown: 2 bytes after the saved ip for 32-bit
        SYSCALL (it saved the address of the vDSO's `int $0x80`, which the landing pad
        follows), 0 for SYSENTER (it saves none). `user`: where the caller's stack is read;
        None for a call without a sixth argument (bp stays as saved)."""
        bp, error = pt[k.R_BP], None
        if user is not None:
            try:
                bp = user.read_u32(cr3, pt[stack] & 0xFFFF_FFFF)
            except UnreadableMemory as exc:
                bp, error = 0, f"unreadable at {exc.address:#x}"
        ip = pt[k.R_IP] + 2 if pt[k.R_IP] else 0
        if self.landing_pad is not None:
            try:
                vdso = self.ctx.tasks.vdso_base(cr3, task)
            except UnreadableMemory as exc:
                vdso = None
                log.debug("no vDSO base for a 32-bit call: %s", exc)
            if vdso is not None:
                ip = vdso + self.landing_pad
        regs = list(pt)
        regs[k.R_BP], regs[k.R_IP] = bp, ip
        return tuple(regs), error

    def _state_at_hit(self, event: Any, regs: FastRegs) -> tuple[tuple[int, ...], int] | None:
        """pt_regs and the current task as of the hit: from the host's captures, or read now
        if the vCPU still waits; None if neither is possible."""
        captured = event.captured
        if captured is not None and len(captured[0]) == k.PT_REGS_SIZE and len(captured[1]) == 8:
            return k.PT_REGS.unpack(captured[0]), int.from_bytes(captured[1], "little")
        if not event.blocking:  # the host could not read them, and the vCPU ran on
            return None
        try:
            return (k.read_pt_regs(self.ctx.mem, regs.cr3, regs.rsp),
                    self.ctx.tasks.current(regs.cr3, regs.gs_base))
        except UnreadableMemory as exc:
            log.debug("syscall state unreadable at %#x: %s", regs.rip, exc)
            return None

    def _memory_for(self, abi: Abi, nr: int, captures: Sequence[PointerCapture]
                    ) -> GuestMemory | CapturedMemory:
        """What a call's decoding reads: the host's captures of it, if its exit runs on and
        the event has them (plain breakpoints, which all wait, have none)."""
        if captures and nr in abi.captured:
            return CapturedMemory(self.ctx.mem, captures)
        return self.ctx.mem

    def _count_live_reads(self, mem: GuestMemory | CapturedMemory, waited: bool) -> None:
        """Count reads the captures missed, unless the vCPU still waits (an exit: the
        entry's are made after its reply)."""
        if isinstance(mem, CapturedMemory) and mem.live_reads and not waited:
            self.ctx.loss.add("read_after_run_on", mem.live_reads)

    def _enter(self, abi: Abi, task: int, pt: tuple[int, ...], name: str, now: int, vcpu: int,
               cr3: int, arg6_error: str | None = None,
               captures: Sequence[PointerCapture] = ()) -> None:
        """Decode an entry and keep it for its exit."""
        ctx = self.ctx
        try:
            info = ctx.tasks.info(cr3, task, user_cr3=cr3)
        except UnreadableMemory as exc:
            ctx.loss.add("unreadable_entry")
            log.debug("syscall entry unreadable: %s", exc)
            return
        nr = pt[abi.nr]
        self.seen_tasks.add(task)
        selected = ctx.filters.task_selected(info.pid, info.tid, info.comm) and \
            ctx.filters.syscall_selected(name)
        call = None
        if selected:
            args = tuple(pt[i] for i in abi.args)
            mem = self._memory_for(abi, nr, captures)
            call = abi.decoder.decode_entry(mem, cr3, nr, args,
                                            {5: arg6_error} if arg6_error else None)
            self._count_live_reads(mem, waited=False)
        if name in NO_RETURN:
            if call is not None:  # decoded; the record is built after the reply
                ctx.defer(partial(self._emit, abi, call, info, now, vcpu, pt[k.R_IP], cr3,
                                  event_type="enter"))
            self.pending.pop(task, None)
            return
        old = self.pending.get(task)
        if old is not None:  # the previous entry of this task never came back
            ctx.loss.add("unpaired_entry")
            if old.call is not None:
                self._emit(old.abi, old.call, old.info, old.time_ns, old.vcpu, old.user_ip,
                           old.cr3, event_type="enter")
        self.pending[task] = Pending(abi, name, call, info, now, vcpu, pt[k.R_IP], cr3)

    def on_exit(self, event: Any, regs: FastRegs) -> None:
        ctx = self.ctx
        cr3 = regs.cr3
        state = self._state_at_hit(event, regs)
        if state is None:
            ctx.loss.add("unreadable_exit")
            return
        pt, task = state
        pending = self.pending.pop(task, None)
        if pending is None:
            if task in self.seen_tasks:
                ctx.loss.add("unpaired_exit")
            else:
                ctx.loss.add("inflight_at_attach")  # entered before tracing began: not a loss
            self.seen_tasks.add(task)
            return
        self.calls += 1
        abi, call = pending.abi, pending.call
        restart_ip = (pending.user_ip - 2) & 0xFFFF_FFFF_FFFF_FFFF
        # A return neither to the call's return address nor to its restart before it: the
        # kernel redirected it into a signal handler (exec and sigreturn aside). A user_ip
        # of 0: a sysenter call whose return address is unknown (_fast_entry_regs).
        if pt[k.R_IP] not in (pending.user_ip, restart_ip) and pending.user_ip and \
                pending.name not in EXECS | SIGRETURNS:
            pt = self._from_signal_frame(cr3, pt, pending.user_ip, restart_ip)
        ret = pt[k.R_AX]
        if call is None:  # filtered out; lifecycle and caches still follow it
            if pending.name in EXECS and ret == 0:
                self._after_exec(event, cr3, task, None, None)
            elif pending.name in CHANGES_TASK:
                ctx.tasks.forget(task)
            return
        restarted = pt[k.R_IP] == restart_ip and ret in (call.nr, abi.restart_nr)
        if restarted:
            ctx.loss.add("restarted")  # counted for visibility; the re-entry is traced anew
            ctx.defer(partial(self._emit, abi, call, pending.info, pending.time_ns, pending.vcpu,
                              pending.user_ip, pending.cr3, event_type="call", restarted=True))
            return
        mem = self._memory_for(abi, call.nr, event.pointer_captures)
        abi.decoder.decode_exit(mem, cr3, call, ret)
        self._count_live_reads(mem, waited=event.blocking)
        info = pending.info
        if call.name in EXECS and call.ret == 0:
            self._after_exec(event, cr3, task, call, partial(
                self._emit, abi, call, time_ns=pending.time_ns, vcpu=pending.vcpu,
                user_ip=pending.user_ip, cr3=cr3, event_type="call", exit_vcpu=event.vcpu),
                fallback_info=info)
            return
        if call.name in CHANGES_TASK:
            ctx.tasks.forget(task)
        ctx.defer(partial(self._emit, abi, call, info, pending.time_ns, pending.vcpu,
                          pending.user_ip, pending.cr3, event_type="call",
                          exit_vcpu=event.vcpu))

    def _from_signal_frame(self, cr3: int, pt: tuple[int, ...], return_ip: int,
                           restart_ip: int) -> tuple[int, ...]:
        """pt_regs of a call whose return the kernel redirected into a signal handler, with
        the call's own ax and ip from the handler's frame. Which frame the kernel built shows
        in what it set for the handler: ax 0 for an x86-64 one (ucontext at dx); for an ia32
        one ax = the signal number, and cx the ucontext of an rt frame, or 0 for a legacy
        frame at sp (see UCONTEXT_DX and after).

        Several signals delivered at the same return stack a frame each, the last one's
        handler running first: a frame whose saved ip is not this return's holds the
        registers the kernel had set for the handler of the signal before, which tell where
        that one's frame is. The walk follows them, at most MAX_SIGNAL_FRAMES frames.

        The frames are read now, also where the exit ran on (a 64-bit exit into a handler
        waits, VMITRACE_BLOCK_WORDS_DIFFER on ip and cx; a 32-bit one cannot be told so, no
        pt_regs word holding its return address): each stays as the kernel wrote it until its
        handler returns, and those returns wait at their entries (SIGRETURNS in
        entries_that_wait), after this exit in the event order. Unreadable, or no frame of
        this return within the bound (a handler that left by longjmp and reused the stack),
        pt_regs stay as they are (counted)."""
        handler = pt
        for _ in range(MAX_SIGNAL_FRAMES):
            if handler[k.R_AX] == 0:
                address, layout = handler[k.R_DX] + UCONTEXT_DX, SIGCONTEXT_DX_IP
            elif handler[k.R_CX]:
                address, layout = handler[k.R_CX] + UCONTEXT32_SP, SIGCONTEXT32_SP_IP
            else:
                address, layout = handler[k.R_SP] + SIGFRAME32_SP, SIGCONTEXT32_SP_IP
            try:
                values = layout.unpack(self.ctx.mem.read_virtual(cr3, address, layout.size))
            except UnreadableMemory:
                break
            if layout is SIGCONTEXT_DX_IP:
                dx, ax, cx, sp, ip = values
            else:
                sp, dx, cx, ax, ip = values
            if ip in (return_ip, restart_ip):
                regs = list(pt)
                regs[k.R_AX], regs[k.R_IP] = ax, ip
                return tuple(regs)
            # the registers set for the handler of a signal delivered before this one
            regs = list(handler)
            regs[k.R_AX], regs[k.R_CX], regs[k.R_DX], regs[k.R_SP], regs[k.R_IP] = \
                ax, cx, dx, sp, ip
            handler = tuple(regs)
        self.ctx.loss.add("unreadable_signal_frame")
        return pt

    # -- records ----------------------------------------------------------------------------
    def _emit(self, abi: Abi, call: DecodedCall, info: Any, time_ns: int, vcpu: int,
              user_ip: int, cr3: int, event_type: str, restarted: bool = False,
              exit_vcpu: int | None = None) -> None:
        extra = {}
        if abi is not self.x86_64:
            extra["abi"] = abi.name
        if restarted:
            extra["restarted"] = "true"
        if exit_vcpu is not None and exit_vcpu != vcpu:
            extra["exit_vcpu"] = str(exit_vcpu)
        unreadable = sum(1 for a in call.args if a["error"])
        if unreadable:
            self.ctx.loss.add("unreadable_argument", unreadable)
        truncated = abi.decoder.truncated_values(call)
        if truncated:
            self.ctx.loss.add("truncated_argument", truncated)
        self.ctx.record(
            KIND_SYSCALL, event_type, time_ns, vcpu=vcpu, action=call.name,
            **process_fields(info), cr3=cr3 & 0x000F_FFFF_FFFF_F000, rip=user_ip,
            syscall_nr=call.nr, args=list(call.raw_args), ret=call.ret, errno=call.errno,
            decoded_args=call.args, argv=call.argv, extra=extra or None, **call.typed)

    def _after_exec(self, event: Any, cr3: int, task: int, call: DecodedCall | None,
                    emit_call: Callable[..., None] | None, fallback_info: Any = None) -> None:
        """A task replaced its image. What the new program may overwrite as soon as it runs,
        the filename, argv and envp at its new stack's top, is read from the host's copy of
        that stack where the exit `event` ran on (a read past it is counted), else before
        the reply. After it (deferred), complete the execve's arguments with them, read the
        task's kernel state, which only its later events (handled after this work) can
        change, and emit the exec lifecycle record, then the call's (`emit_call(info=...)`,
        with `fallback_info` if the task is unreadable)."""
        ctx = self.ctx
        now = ctx.clock()
        ctx.tasks.forget(task)
        stack = CapturedMemory(ctx.mem, event.pointer_captures) \
            if event.pointer_captures else None
        try:
            recovered = ctx.tasks.exec_strings(cr3, task, user=stack)
        except UnreadableMemory:
            ctx.loss.add("unreadable_task")
            recovered = {}
        if stack is not None:
            self._count_live_reads(stack, waited=event.blocking)
        ctx.defer(partial(self._exec_records, cr3, task, call, recovered, now, emit_call,
                          fallback_info))

    def _exec_records(self, cr3: int, task: int, call: DecodedCall | None,
                      recovered: dict[str, Any], time_ns: int,
                      emit_call: Callable[..., None] | None, fallback_info: Any) -> None:
        ctx = self.ctx
        if call is not None:  # argv, envp and what was unreadable at entry
            self.decoder.complete_exec(call, recovered)  # by name: either ABI's decoder
        argv = recovered.get("argv", (None, False))[0]
        try:
            info = ctx.tasks.info(cr3, task, user_cr3=cr3, argv=argv)
        except UnreadableMemory:
            ctx.loss.add("unreadable_task")
            info = None
        if info is not None and ctx.filters.task_selected(info.pid, info.tid, info.comm):
            ctx.record(KIND_PROCESS, "exec", time_ns, action="exec", **process_fields(info),
                       argv=info.argv, path=recovered.get("path", (None, False))[0],
                       parent_process_uid=info.parent_process_uid)
        if emit_call is not None:
            emit_call(info=info or fallback_info)
