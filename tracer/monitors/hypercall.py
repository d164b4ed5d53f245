"""The hypercall monitor: every VMCALL/VMMCALL reported by the host, with registers and the
calling process."""
from __future__ import annotations

from functools import partial
from typing import Any

from sinks.schema import KIND_HYPERCALL
from tracer.monitors.base import FastRegs, VmContext

REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "rip")


class HypercallMonitor:
    def __init__(self, ctx: VmContext) -> None:
        self.ctx = ctx

    def on_hypercall(self, event: Any) -> None:
        """Reads the calling process while the vCPU waits (it may switch tasks once released);
        the record, built from the event's own registers, waits until after the reply."""
        ctx = self.ctx
        fast = FastRegs(event.raw)
        fields = ctx.current_process(fast)
        ctx.defer(partial(self._record, event, fast, fields, ctx.clock()))

    def _record(self, event: Any, fast: FastRegs, fields: dict[str, Any], time_ns: int) -> None:
        regs = event.arch.regs
        self.ctx.record(KIND_HYPERCALL, "hypercall", time_ns, vcpu=event.vcpu,
                        action="hypercall", hypercall_nr=regs.rax, rip=regs.rip,
                        cr3=fast.cr3 & 0x000F_FFFF_FFFF_F000,
                        extra={r: hex(getattr(regs, r)) for r in REGISTERS},
                        message=f"hypercall {regs.rax:#x} from CPL {fast.cpl}", **fields)
