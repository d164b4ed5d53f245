"""Typed KVMI events.

Every event carries ``seq`` (the host's message seq, echoed by the reply), ``vcpu``, ``raw``
(the whole message as received, header included) and ``blocking`` (False when the host
delivered it without waiting: vmitrace's non-blocking delivery). ``arch`` (mode, view, regs,
sregs, msrs, as nested namedtuples of :data:`abi.KVMI_EVENT_ARCH`) is decoded from ``raw`` on
first access, so a monitor that never looks at registers pays nothing for them.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

from . import abi

_ARCH = abi.KVMI_EVENT_ARCH
_ARCH_OFFSET = abi.KVMI_MSG_HDR.size + 8  # header, then size/vcpu/event/flags/padding[2]

_REGS = abi.KVM_REGS.struct
_REGS_TUPLE = abi.KVM_REGS.tuple
_SREGS = abi.KVM_SREGS
_REGS_OFFSET = _ARCH_OFFSET + next(f.offset for f in _ARCH.fields if f.name == "regs")
_SREGS_OFFSET = _ARCH_OFFSET + next(f.offset for f in _ARCH.fields if f.name == "sregs")

#: The decoded ``kvmi_event_arch`` type (fields: mode, view, regs, sregs, msrs).
EventArch = _ARCH.tuple


class Event:
    """Base of all events. ``event_id``/``name`` identify the kind (C id and name)."""

    __slots__ = ("seq", "vcpu", "raw", "blocking", "_arch")
    event_id: ClassVar[int] = -1
    name: ClassVar[str] = "KVMI_EVENT_?"
    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool = True) -> None:
        self.seq = seq
        self.vcpu = vcpu
        self.raw = raw
        self.blocking = blocking
        self._arch: Any = None

    @property
    def arch(self) -> Any:
        """``kvmi_event_arch`` as :data:`EventArch` (decoded once, on first access)."""
        arch = self._arch
        if arch is None:
            arch = self._arch = _ARCH.from_flat(_ARCH.struct.unpack_from(self.raw, _ARCH_OFFSET))
        return arch

    @property
    def regs(self) -> Any:
        """``arch.regs`` (``kvm_regs``: rax ... rip, rflags), decoded alone if arch wasn't."""
        if self._arch is not None:
            return self._arch.regs
        return _REGS_TUPLE._make(_REGS.unpack_from(self.raw, _REGS_OFFSET))

    @property
    def sregs(self) -> Any:
        """``arch.sregs`` (``kvm_sregs``: segments, gdt/idt, cr0-cr8, efer, apic_base)."""
        if self._arch is not None:
            return self._arch.sregs
        return _SREGS.from_flat(_SREGS.struct.unpack_from(self.raw, _SREGS_OFFSET))

    @property
    def mode(self) -> int:
        """``arch.mode``: 2, 4 or 8 (bytes per guest word)."""
        return self.raw[_ARCH_OFFSET]

    def values(self) -> dict[str, Any]:
        """The event-specific fields as a dict."""
        return {f: getattr(self, f) for f in self.fields}

    def __repr__(self) -> str:
        extra = "".join(f" {f}={getattr(self, f):#x}" for f in self.fields)
        return f"<{type(self).__name__} seq={self.seq} vcpu={self.vcpu}{extra}>"


class UnhookEvent(Event):
    """The host is about to unhook (migration/snapshot): undo guest changes, then close."""

    __slots__ = ()
    event_id, name = abi.KVMI_EVENT_UNHOOK, "KVMI_EVENT_UNHOOK"


class CrEvent(Event):
    """A control-register write; reply ``new_val`` decides the value written."""

    __slots__ = ("cr", "old_value", "new_value")
    event_id, name = abi.KVMI_EVENT_CR, "KVMI_EVENT_CR"
    fields = ("cr", "old_value", "new_value")

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool,
                 cr: int, old_value: int, new_value: int) -> None:
        self.seq, self.vcpu, self.raw, self.blocking, self._arch = seq, vcpu, raw, blocking, None
        self.cr, self.old_value, self.new_value = cr, old_value, new_value


class MsrEvent(Event):
    """A model-specific-register write; reply ``new_val`` decides the value written."""

    __slots__ = ("msr", "old_value", "new_value")
    event_id, name = abi.KVMI_EVENT_MSR, "KVMI_EVENT_MSR"
    fields = ("msr", "old_value", "new_value")

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool,
                 msr: int, old_value: int, new_value: int) -> None:
        self.seq, self.vcpu, self.raw, self.blocking, self._arch = seq, vcpu, raw, blocking, None
        self.msr, self.old_value, self.new_value = msr, old_value, new_value


class XsetbvEvent(Event):
    """An XSETBV instruction (no payload in this dialect; read XCR0 with get_xcr)."""

    __slots__ = ()
    event_id, name = abi.KVMI_EVENT_XSETBV, "KVMI_EVENT_XSETBV"


class PointerCapture(NamedTuple):
    """Guest memory a vmitrace host copied at a breakpoint hit from an address held in the
    hit's first capture (VMITRACE_SET_CAPTURE_TABLE): `data` read at `gva`; `faulted`: the
    byte at gva + len(data) could not be read."""

    gva: int
    data: bytes
    faulted: bool


class BreakpointEvent(Event):
    """A breakpoint hit: ``gpa`` of the instruction, ``insn_len``; ``arch.regs.rip`` = GVA."""

    __slots__ = ("gpa", "insn_len", "captured", "pointer_captures")
    event_id, name = abi.KVMI_EVENT_BREAKPOINT, "KVMI_EVENT_BREAKPOINT"
    fields = ("gpa", "insn_len")

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool,
                 gpa: int, insn_len: int, captured: tuple[bytes, ...] | None = None,
                 pointer_captures: tuple[PointerCapture, ...] = ()) -> None:
        self.seq, self.vcpu, self.raw, self.blocking, self._arch = seq, vcpu, raw, blocking, None
        self.gpa, self.insn_len = gpa, insn_len
        # vmitrace hosts: guest memory copied at the hit (VMITRACE_SET_BREAKPOINT_EX);
        # an empty capture was unreadable
        self.captured = captured
        self.pointer_captures = pointer_captures  # VMITRACE_SET_CAPTURE_TABLE's, in order


class HypercallEvent(Event):
    """A VMCALL/VMMCALL with the introspection hypercall number (registers in ``arch``)."""

    __slots__ = ()
    event_id, name = abi.KVMI_EVENT_HYPERCALL, "KVMI_EVENT_HYPERCALL"


class PfEvent(Event):
    """An EPT violation on a page whose access was restricted with set_page_access."""

    __slots__ = ("gva", "gpa", "access", "view")
    event_id, name = abi.KVMI_EVENT_PF, "KVMI_EVENT_PF"
    fields = ("gva", "gpa", "access", "view")

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool,
                 gva: int, gpa: int, access: int, view: int) -> None:
        self.seq, self.vcpu, self.raw, self.blocking, self._arch = seq, vcpu, raw, blocking, None
        self.gva, self.gpa, self.access, self.view = gva, gpa, access, view


class TrapEvent(Event):
    """An exception injected with inject_exception was delivered to the guest."""

    __slots__ = ("vector", "error_code", "cr2")
    event_id, name = abi.KVMI_EVENT_TRAP, "KVMI_EVENT_TRAP"
    fields = ("vector", "error_code", "cr2")

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool,
                 vector: int, error_code: int, cr2: int) -> None:
        self.seq, self.vcpu, self.raw, self.blocking, self._arch = seq, vcpu, raw, blocking, None
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


class DescriptorEvent(Event):
    """A descriptor-table register access (``descriptor``: KVMI_DESC_IDTR...)."""

    __slots__ = ("descriptor", "write")
    event_id, name = abi.KVMI_EVENT_DESCRIPTOR, "KVMI_EVENT_DESCRIPTOR"
    fields = ("descriptor", "write")

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool,
                 descriptor: int, write: int) -> None:
        self.seq, self.vcpu, self.raw, self.blocking, self._arch = seq, vcpu, raw, blocking, None
        self.descriptor, self.write = descriptor, write


class CreateVcpuEvent(Event):
    """A vCPU was created (or existed when introspection started)."""

    __slots__ = ()
    event_id, name = abi.KVMI_EVENT_CREATE_VCPU, "KVMI_EVENT_CREATE_VCPU"


class PauseVcpuEvent(Event):
    """The answer of a vCPU to pause_vcpu: it waits in the host until replied."""

    __slots__ = ()
    event_id, name = abi.KVMI_EVENT_PAUSE_VCPU, "KVMI_EVENT_PAUSE_VCPU"


class SingleStepEvent(Event):
    """One instruction was single-stepped (``failed`` != 0 when the step failed)."""

    __slots__ = ("failed",)
    event_id, name = abi.KVMI_EVENT_SINGLESTEP, "KVMI_EVENT_SINGLESTEP"
    fields = ("failed",)

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool, failed: int) -> None:
        self.seq, self.vcpu, self.raw, self.blocking, self._arch = seq, vcpu, raw, blocking, None
        self.failed = failed


class CpuidEvent(Event):
    """A CPUID instruction (``function``, ``index``, ``insn_length``)."""

    __slots__ = ("function", "index", "insn_length")
    event_id, name = abi.KVMI_EVENT_CPUID, "KVMI_EVENT_CPUID"
    fields = ("function", "index", "insn_length")

    def __init__(self, seq: int, vcpu: int, raw: bytes, blocking: bool,
                 function: int, index: int, insn_length: int) -> None:
        self.seq, self.vcpu, self.raw, self.blocking, self._arch = seq, vcpu, raw, blocking, None
        self.function, self.index, self.insn_length = function, index, insn_length


EVENT_CLASSES: dict[int, type[Event]] = {c.event_id: c for c in (
    UnhookEvent, CrEvent, MsrEvent, XsetbvEvent, BreakpointEvent, HypercallEvent, PfEvent,
    TrapEvent, DescriptorEvent, CreateVcpuEvent, PauseVcpuEvent, SingleStepEvent, CpuidEvent)}

# Every class's fields must be the value fields of its payload struct, in wire order.
for _eid, _cls in EVENT_CLASSES.items():
    _payload = abi.EVENTS[_eid][1]
    assert _cls.fields == (tuple(f.name for f in _payload.value_fields) if _payload else ()), _cls
    assert _cls.name == abi.EVENTS[_eid][0]
