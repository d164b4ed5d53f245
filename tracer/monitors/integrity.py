"""The integrity monitor: changes after boot to the syscall entry MSRs and to the CR0/CR4
protection bits, as high-severity records.

A protection bit is "armed" on a vCPU once it has been seen set (boot sets them); clearing an
armed bit is a change, setting it again a restoration. An entry MSR's baseline is the value
the syscall monitor validated against the profile (LSTAR) or the first value seen; any write
of another value is a change, a write back to the baseline a restoration.
"""
from __future__ import annotations

from typing import Any

from sinks.schema import KIND_INTEGRITY
from tracer.kvmi import errors as kerr
from tracer.monitors.base import (MSR_CSTAR, MSR_LSTAR, MSR_NAMES, MSR_STAR, MSR_SYSENTER_EIP,
                                  FastRegs, VmContext)


WATCHED_MSRS = (MSR_LSTAR, MSR_CSTAR, MSR_STAR, MSR_SYSENTER_EIP)
ARMED, CLEARED = "armed", "cleared"
CR_BITS = {0: {16: "CR0.WP"}, 4: {20: "CR4.SMEP", 21: "CR4.SMAP", 11: "CR4.UMIP"}}


class IntegrityMonitor:
    def __init__(self, ctx: VmContext) -> None:
        self.ctx = ctx
        self.state: dict[tuple[int, str], str] = {}  # (vcpu, bit name) -> ARMED | CLEARED
        self.msr_baseline: dict[int, int] = {}
        self.diverged: set[int] = set()  # MSRs reported changed and not yet restored
        self.unsupported: list[str] = []

    def install(self, vcpus: int) -> None:
        session = self.ctx.session
        for vcpu in range(vcpus):
            for cr in CR_BITS:
                try:
                    session.control_cr(vcpu, cr, True)
                except kerr.CommandError as exc:
                    self.unsupported.append(f"CR{cr} on vCPU {vcpu}: {exc}")
            for msr in WATCHED_MSRS:
                try:
                    session.control_msr(vcpu, msr, True)
                except kerr.CommandError as exc:
                    self.unsupported.append(f"MSR {msr:#x} on vCPU {vcpu}: {exc}")

    def set_baseline(self, msr: int, value: int) -> None:
        self.msr_baseline.setdefault(msr, value)

    def seed_cr(self, vcpu: int, cr: int, value: int) -> None:
        for bit, name in CR_BITS.get(cr, {}).items():
            if value >> bit & 1:
                self.state[(vcpu, name)] = ARMED

    def on_cr(self, event: Any) -> None:
        bits = CR_BITS.get(event.cr)
        if not bits:
            return
        for bit, name in bits.items():
            old, new = event.old_value >> bit & 1, event.new_value >> bit & 1
            key = (event.vcpu, name)
            state = self.state.get(key)
            if new:
                self.state[key] = ARMED
                if state == CLEARED:
                    self._record("restored", event, name, event.old_value, event.new_value,
                                 f"{name} set again")
            elif old and state == ARMED:
                self.state[key] = CLEARED
                self._record("changed", event, name, event.old_value, event.new_value,
                             f"{name} cleared after boot")

    def on_msr(self, event: Any) -> None:
        name = MSR_NAMES.get(event.msr, hex(event.msr))
        base = self.msr_baseline.get(event.msr)
        if base is None:
            self.msr_baseline[event.msr] = event.new_value
            return
        if event.new_value == base:
            if event.msr in self.diverged:
                self.diverged.discard(event.msr)
                self._record("restored", event, name, event.old_value, event.new_value,
                             f"{name} written back to its baseline")
            return
        self.diverged.add(event.msr)
        self._record("changed", event, name, event.old_value, event.new_value,
                     f"{name} changed from baseline {base:#x}")

    def _record(self, event_type: str, event: Any, target: str, old: int, new: int,
                detail: str) -> None:
        regs = FastRegs(event.raw)
        self.ctx.record(KIND_INTEGRITY, event_type, vcpu=event.vcpu, action=event_type,
                        target=target, old_value=old, new_value=new, detail=detail,
                        rip=regs.rip, **self.ctx.current_process(regs))
