"""The kvmi-v7 wire ABI: every constant under its C name and every wire struct as a table.

Source of truth: bitdefender/libkvmi (master) ``include/linux/kvmi.h`` and
``include/linux/x86_64/asm/kvmi.h``, Linux ``asm/kvm.h`` for the x86 register blocks, and
libkvmi's ``libkvmi.h`` for the handshake structs. The wire uses the host's byte order; the
dialect is x86-64 only, so everything here is little endian with explicit widths.

Each struct is described once, as a :class:`StructDef` (fields with name, offset, size and
format). The same table drives encoding, decoding, padding/size validation and
``vmitrace kvmi abi --json``. Every ``StructDef`` precompiles one :class:`struct.Struct` for
the whole layout and one for its padding bytes only, so decoding never walks Python field
objects in the hot path.

The vmitrace vendor extension (ids ``0x7f01``-``0x7f05``) lives at the end of this module; it is
described for users in ``docs/kvmi-vendor-extension.md``.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

# --------------------------------------------------------------------------------------------
# Constants (C names)
# --------------------------------------------------------------------------------------------

KVMI_VERSION = 0x00000001

# Message ids (enum in include/linux/kvmi.h). Gaps (30, 40, 45-59, 61, 62) are unassigned.
KVMI_EVENT_REPLY = 0
KVMI_EVENT = 1
KVMI_GET_VERSION = 2
KVMI_CHECK_COMMAND = 3
KVMI_CHECK_EVENT = 4
KVMI_GET_GUEST_INFO = 5
KVMI_GET_VCPU_INFO = 6
KVMI_PAUSE_VCPU = 7
KVMI_CONTROL_VM_EVENTS = 8
KVMI_CONTROL_EVENTS = 9
KVMI_CONTROL_CR = 10
KVMI_CONTROL_MSR = 11
KVMI_CONTROL_VE = 12
KVMI_GET_REGISTERS = 13
KVMI_SET_REGISTERS = 14
KVMI_GET_CPUID = 15
KVMI_GET_XSAVE = 16
KVMI_READ_PHYSICAL = 17
KVMI_WRITE_PHYSICAL = 18
KVMI_INJECT_EXCEPTION = 19
KVMI_GET_PAGE_ACCESS = 20
KVMI_SET_PAGE_ACCESS = 21
KVMI_GET_MAP_TOKEN = 22
KVMI_GET_MTRR_TYPE = 23
KVMI_CONTROL_SPP = 24
KVMI_GET_PAGE_WRITE_BITMAP = 25
KVMI_SET_PAGE_WRITE_BITMAP = 26
KVMI_CONTROL_CMD_RESPONSE = 27
KVMI_SET_VE_INFO_PAGE = 28
KVMI_GET_MAX_GFN = 29
KVMI_GET_NEXT_AVAILABLE_GFN = 31
KVMI_SWITCH_EPT_VIEW = 32
KVMI_DISABLE_VE = 33
KVMI_GET_EPT_VIEW = 34
KVMI_VCPU_TRANSLATE_GVA = 35
KVMI_CONTROL_EPT_VIEW = 36
KVMI_VCPU_GET_XCR = 37
KVMI_VCPU_SET_XSAVE = 38
KVMI_QUERY_PHYSICAL = 39
KVMI_VCPU_ALLOC_GFN = 41
KVMI_VCPU_FREE_GFN = 42
KVMI_CREATE_EPT_VIEW = 43
KVMI_DESTROY_EPT_VIEW = 44
KVMI_VCPU_CHANGE_GFN = 60
KVMI_VCPU_CONTROL_SINGLESTEP = 63
KVM_NUM_MESSAGES = 64

# Event ids
KVMI_EVENT_UNHOOK = 0
KVMI_EVENT_CR = 1
KVMI_EVENT_MSR = 2
KVMI_EVENT_XSETBV = 3
KVMI_EVENT_BREAKPOINT = 4
KVMI_EVENT_HYPERCALL = 5
KVMI_EVENT_PF = 6
KVMI_EVENT_TRAP = 7
KVMI_EVENT_DESCRIPTOR = 8
KVMI_EVENT_CREATE_VCPU = 9
KVMI_EVENT_PAUSE_VCPU = 10
KVMI_EVENT_SINGLESTEP = 11
KVMI_EVENT_CPUID = 13
KVMI_NUM_EVENTS = 14

KVMI_EVENT_ACTION_CONTINUE = 0
KVMI_EVENT_ACTION_RETRY = 1
KVMI_EVENT_ACTION_CRASH = 2

KVMI_PAGE_ACCESS_R = 1 << 0
KVMI_PAGE_ACCESS_W = 1 << 1
KVMI_PAGE_ACCESS_X = 1 << 2
KVMI_PAGE_ACCESS_SVE = 1 << 3

KVMI_DESC_IDTR = 1
KVMI_DESC_GDTR = 2
KVMI_DESC_LDTR = 3
KVMI_DESC_TR = 4

# Error numbers carried (negated) in kvmi_error_code.err.
KVM_EPERM = 1
KVM_ENOENT = 2
KVM_E2BIG = 7
KVM_EAGAIN = 11
KVM_ENOMEM = 12
KVM_EFAULT = 14
KVM_EBUSY = 16
KVM_EINVAL = 22
KVM_EOPNOTSUPP = 95
KVM_ENOSYS = 1000

KVM_ERRNO_NAMES: dict[int, str] = {
    KVM_EPERM: "KVM_EPERM", KVM_ENOENT: "KVM_ENOENT", KVM_E2BIG: "KVM_E2BIG",
    KVM_EAGAIN: "KVM_EAGAIN", KVM_ENOMEM: "KVM_ENOMEM", KVM_EFAULT: "KVM_EFAULT",
    KVM_EBUSY: "KVM_EBUSY", KVM_EINVAL: "KVM_EINVAL", KVM_EOPNOTSUPP: "KVM_EOPNOTSUPP",
    KVM_ENOSYS: "KVM_ENOSYS",
}

KVM_NR_INTERRUPTS = 256

# --------------------------------------------------------------------------------------------
# Struct tables
# --------------------------------------------------------------------------------------------

_SCALARS: dict[str, tuple[str, int]] = {
    "u8": ("B", 1), "u16": ("H", 2), "u32": ("I", 4), "u64": ("Q", 8),
    "s8": ("b", 1), "s16": ("h", 2), "s32": ("i", 4), "s64": ("q", 8),
}


class AbiError(ValueError):
    """A value does not fit the wire layout, or wire bytes violate it (base of protocol errors)."""


class PaddingError(AbiError):
    """A padding field on the wire is not zero."""


class SizeError(AbiError):
    """A buffer does not have the size its struct requires."""


@dataclass(frozen=True)
class Field:
    """One member of a wire struct.

    ``kind`` is ``scalar`` (``ctype`` like ``u32``), ``array`` (``count`` scalars),
    ``bytes`` (a ``u8``/``char`` blob of ``count`` bytes), ``struct`` (nested ``sub``) or
    ``flex`` (a trailing ``[0]`` array of
    ``ctype``/``sub`` elements, size 0 in the struct). Padding fields have ``padding=True``
    and must be zero on the wire.
    """

    name: str
    offset: int
    size: int
    kind: str
    ctype: str
    count: int = 1
    padding: bool = False
    sub: "StructDef | None" = None


class StructDef:
    """A wire struct: ordered fields with offsets, one precompiled codec, padding checks.

    ``decode`` returns an instance of ``self.tuple`` (a namedtuple of the non-padding fields;
    nested structs become nested namedtuples, arrays tuples, blobs bytes) after checking that
    every padding byte is zero. ``encode`` takes the non-padding fields as keywords (missing
    ones are zero) and returns exactly ``size`` bytes.
    """

    def __init__(self, name: str, members: Sequence[tuple[str, Any]], size: int,
                 doc: str = "") -> None:
        self.name = name
        self.doc = doc
        fields: list[Field] = []
        fmt: list[str] = []
        offset = 0
        for mname, mtype in members:
            field, f = _make_field(mname, mtype, offset)
            fields.append(field)
            fmt.append(f)
            offset += field.size
        if offset != size:
            raise AssertionError(f"{name}: fields add up to {offset} bytes, header says {size}")
        self.size = size
        self.fields: tuple[Field, ...] = tuple(fields)
        self.fmt = "".join(fmt)  # no byte-order prefix: callers compose formats
        self.struct = struct.Struct("<" + self.fmt)
        assert self.struct.size == size, (name, self.struct.size, size)
        padfmt_s = _pads_nested(self)
        # Padding-only codec: skips value bytes, yields the padding words (all must be 0).
        self.padding_struct = struct.Struct("<" + padfmt_s) if any(c.isalpha() and c != "x"
                                                          for c in padfmt_s) else None
        self.value_fields = tuple(f for f in fields if not f.padding and f.kind != "flex")
        names = [f.name for f in self.value_fields]
        self.tuple = namedtuple(_camel(name), names)  # type: ignore[misc]
        self.flex = next((f for f in fields if f.kind == "flex"), None)
        self._plan = self._compile_plan()
        self._from_flat = self._compile_from_flat()

    # -- decoding -------------------------------------------------------------------------
    def _compile_plan(self) -> list[tuple[str, int, int, "StructDef | None"]]:
        """Per field: (kind, first flat index, number of flat values, sub) for reassembly."""
        plan = []
        idx = 0
        for f in self.fields:
            if f.kind == "flex":
                continue
            n = _flat_count(f)
            if not f.padding:
                plan.append((f.kind, idx, n, f.sub))
            idx += n
        return plan

    def _build_expr(self, base: int, types: dict[str, Any]) -> str:
        """Source of an expression rebuilding this struct from flat values ``v``."""
        types[f"T{id(self)}"] = self.tuple
        parts = []
        for kind, idx, n, sub in self._plan:
            i = base + idx
            if kind in ("scalar", "bytes"):
                parts.append(f"v[{i}]")
            elif kind == "array":
                parts.append("(" + "".join(f"v[{i + k}], " for k in range(n)) + ")")
            else:
                parts.append(sub._build_expr(i, types))  # type: ignore[union-attr]
        return f"T{id(self)}({', '.join(parts)})"

    def _compile_from_flat(self):  # type: ignore[no-untyped-def]
        """Generate one flat function per struct: no per-field Python work when decoding."""
        types: dict[str, Any] = {}
        expr = self._build_expr(0, types)
        return eval(f"lambda v: {expr}", types)  # source built only from this table

    def check_padding(self, buf: bytes | memoryview, offset: int = 0) -> None:
        """Raise :class:`PaddingError` if any padding byte of the struct at ``offset`` is set."""
        if self.padding_struct is not None and any(self.padding_struct.unpack_from(buf, offset)):
            raise PaddingError(f"{self.name}: non-zero padding")

    def from_flat(self, vals: Sequence[Any]) -> Any:
        """Rebuild the namedtuple from the flat values of ``self.struct`` (no padding check)."""
        return self._from_flat(vals)

    def decode(self, buf: bytes | memoryview, offset: int = 0) -> Any:
        """Decode the struct at ``offset`` (the buffer may be longer); padding must be zero."""
        if len(buf) - offset < self.size:
            raise SizeError(f"{self.name}: need {self.size} bytes, have {len(buf) - offset}")
        self.check_padding(buf, offset)
        return self.from_flat(self.struct.unpack_from(buf, offset))

    def decode_exact(self, buf: bytes | memoryview) -> Any:
        """Decode a buffer that must be exactly ``size`` bytes."""
        if len(buf) != self.size:
            raise SizeError(f"{self.name}: expected {self.size} bytes, got {len(buf)}")
        return self.decode(buf)

    # -- encoding -------------------------------------------------------------------------
    def flatten(self, values: Mapping[str, Any] | Any, out: list[Any]) -> None:
        """Append this struct's flat values (padding as zeros) to ``out``."""
        get = values.get if isinstance(values, Mapping) else (
            lambda k, d=None: getattr(values, k, d))
        known = {f.name for f in self.value_fields}
        if isinstance(values, Mapping):
            unknown = set(values) - known
            if unknown:
                raise AbiError(f"{self.name}: unknown fields {sorted(unknown)}")
        for f in self.fields:
            if f.kind == "flex":
                continue
            if f.padding:
                out.extend([0] * _flat_count(f))
                continue
            v = get(f.name, None)
            if f.kind == "scalar":
                out.append(0 if v is None else v)
            elif f.kind == "bytes":
                out.append(b"" if v is None else bytes(v))
            elif f.kind == "array":
                seq = [0] * f.count if v is None else list(v)
                if len(seq) != f.count:
                    raise AbiError(f"{self.name}.{f.name}: need {f.count} values, got {len(seq)}")
                out.extend(seq)
            else:  # struct
                f.sub.flatten({} if v is None else v, out)  # type: ignore[union-attr]

    def encode(self, values: Mapping[str, Any] | Any = None, **kw: Any) -> bytes:
        """Encode from a mapping/namedtuple and/or keywords; omitted fields are zero."""
        merged: dict[str, Any] = {}
        if values is not None:
            merged.update(values if isinstance(values, Mapping) else values._asdict())
        merged.update(kw)
        flat: list[Any] = []
        self.flatten(merged, flat)
        try:
            return self.struct.pack(*flat)
        except struct.error as exc:
            raise AbiError(f"{self.name}: {exc}") from None

    # -- description ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The JSON description used by ``vmitrace kvmi abi --json``."""
        fields: dict[str, Any] = {}
        for f in self.fields:
            d: dict[str, Any] = {"offset": f.offset, "size": f.size, "type": _type_name(f)}
            if f.padding:
                d["padding"] = True
            if f.kind == "flex":
                d["flexible_array"] = True
            fields[f.name] = d
        return {"size": self.size, "fields": fields}


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.replace(".", "_").split("_"))


def _flat_count(f: Field) -> int:
    if f.kind in ("scalar", "bytes"):
        return 1
    if f.kind == "array":
        return f.count
    if f.kind == "struct":
        return len(f.sub.struct.unpack(bytes(f.sub.size)))  # type: ignore[union-attr]
    return 0


def _type_name(f: Field) -> str:
    if f.kind == "scalar":
        return f.ctype
    if f.kind in ("array", "bytes"):
        return f"{f.ctype}[{f.count}]"
    if f.kind == "struct":
        return f"struct {f.sub.name}"  # type: ignore[union-attr]
    elem = f"struct {f.sub.name}" if f.sub else f.ctype
    return f"{elem}[0]"


def _make_field(name: str, mtype: Any, offset: int) -> tuple[Field, str]:
    """Build one Field plus its struct format."""
    padding = name.startswith("padding") or name == "pad"
    if isinstance(mtype, StructDef):
        return Field(name, offset, mtype.size, "struct", "struct", 1, padding, mtype), mtype.fmt
    if isinstance(mtype, tuple) and mtype[0] == "flex":
        elem = mtype[1]
        if isinstance(elem, StructDef):
            return Field(name, offset, 0, "flex", "struct", 0, False, elem), ""
        return Field(name, offset, 0, "flex", elem, 0, False, None), ""
    if isinstance(mtype, tuple):
        ctype, count = mtype
        if ctype in ("bytes", "char"):
            ct = "u8" if ctype == "bytes" else "char"
            return Field(name, offset, count, "bytes", ct, count, False), f"{count}s"
        code, width = _SCALARS[ctype]
        return Field(name, offset, width * count, "array", ctype, count, padding), code * count
    code, width = _SCALARS[mtype]
    return Field(name, offset, width, "scalar", mtype, 1, padding), code


def _pads_nested(sd: StructDef) -> str:
    """Padding-only format of a struct including its nested structs' padding."""
    out = []
    for f in sd.fields:
        if f.kind == "struct":
            out.append(_pads_nested(f.sub))  # type: ignore[arg-type]
        elif f.kind == "flex":
            continue
        elif f.padding:
            code, width = _SCALARS[f.ctype]
            out.append(code * f.count)
        else:
            out.append(f"{f.size}x")
    return "".join(out)


STRUCTS: dict[str, StructDef] = {}


def _def(name: str, members: Sequence[tuple[str, Any]], size: int, doc: str = "") -> StructDef:
    sd = StructDef(name, members, size, doc)
    STRUCTS[name] = sd
    return sd


def flex(elem: Any) -> tuple[str, Any]:
    return ("flex", elem)


# -- common ----------------------------------------------------------------------------------
KVMI_MSG_HDR = _def("kvmi_msg_hdr", [("id", "u16"), ("size", "u16"), ("seq", "u32")], 8,
                    "Header of every message; size counts the payload only.")
KVMI_MSG_SIZE = 4096 * 2 - KVMI_MSG_HDR.size  # 8184: largest payload
KVMI_ERROR_CODE = _def("kvmi_error_code", [("err", "s32"), ("padding", "u32")], 8,
                       "First member of every command reply; data follows only if err == 0.")
KVMI_VCPU_HDR = _def("kvmi_vcpu_hdr", [("vcpu", "u16"), ("padding1", "u16"), ("padding2", "u32")],
                     8, "First member of every vCPU command and of every event reply.")

# -- x86 register blocks (Linux arch/x86/include/uapi/asm/kvm.h) ----------------------------
_REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
              "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
KVM_REGS = _def("kvm_regs", [(r, "u64") for r in _REG_NAMES], 144)
KVM_SEGMENT = _def("kvm_segment", [
    ("base", "u64"), ("limit", "u32"), ("selector", "u16"), ("type", "u8"), ("present", "u8"),
    ("dpl", "u8"), ("db", "u8"), ("s", "u8"), ("l", "u8"), ("g", "u8"), ("avl", "u8"),
    ("unusable", "u8"), ("padding", "u8")], 24)
KVM_DTABLE = _def("kvm_dtable", [("base", "u64"), ("limit", "u16"), ("padding", ("u16", 3))], 16)
KVM_SREGS = _def("kvm_sregs", [
    *[(s, KVM_SEGMENT) for s in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
    ("gdt", KVM_DTABLE), ("idt", KVM_DTABLE),
    ("cr0", "u64"), ("cr2", "u64"), ("cr3", "u64"), ("cr4", "u64"), ("cr8", "u64"),
    ("efer", "u64"), ("apic_base", "u64"),
    ("interrupt_bitmap", ("u64", (KVM_NR_INTERRUPTS + 63) // 64))], 312)
KVM_MSR_ENTRY = _def("kvm_msr_entry", [("index", "u32"), ("reserved", "u32"), ("data", "u64")], 16)
KVM_MSRS = _def("kvm_msrs", [("nmsrs", "u32"), ("pad", "u32"), ("entries", flex(KVM_MSR_ENTRY))], 8)

# -- handshake (libkvmi.h) -------------------------------------------------------------------
KVMI_QEMU2INTROSPECTOR = _def("kvmi_qemu2introspector", [
    ("struct_size", "u32"), ("uuid", ("bytes", 16)), ("padding", "u32"), ("start_time", "s64"),
    ("name", ("char", 64))], 96,
    "Sent by the host right after connecting; struct_size may be larger (ignore the tail).")
KVMI_INTROSPECTOR2QEMU = _def("kvmi_introspector2qemu", [
    ("struct_size", "u32"), ("cookie_hash", ("bytes", 20))], 24,
    "The introspector's answer; cookie_hash = SHA-1 of the shared secret (zeros without one).")
HANDSHAKE_MIN_SIZE = 32  # offsetof(kvmi_qemu2introspector, name): libkvmi's lower bound
HANDSHAKE_MAX_SIZE = 64 * 1024  # libkvmi's upper bound

# -- x86 event arch block --------------------------------------------------------------------
KVMI_EVENT_ARCH_MSRS = _def("kvmi_event_arch.msrs", [
    (m, "u64") for m in ("sysenter_cs", "sysenter_esp", "sysenter_eip", "efer", "star",
                         "lstar", "cstar", "pat", "shadow_gs")], 72,
    "The anonymous msrs member of kvmi_event_arch.")
KVMI_EVENT_ARCH = _def("kvmi_event_arch", [
    ("mode", "u8"), ("padding1", "u8"), ("view", "u16"), ("padding2", ("u8", 4)),
    ("regs", KVM_REGS), ("sregs", KVM_SREGS), ("msrs", KVMI_EVENT_ARCH_MSRS)], 536)

# -- messages (kvmi.h) ----------------------------------------------------------------------
KVMI_FEATURES = _def("kvmi_features", [
    ("spp", "u8"), ("vmfunc", "u8"), ("eptp", "u8"), ("ve", "u8"), ("padding", ("u8", 4))], 8)
KVMI_GET_VERSION_REPLY = _def("kvmi_get_version_reply", [
    ("version", "u32"), ("padding", "u32"), ("features", KVMI_FEATURES)], 16)
KVMI_CONTROL_CMD_RESPONSE_ = _def("kvmi_control_cmd_response", [
    ("enable", "u8"), ("now", "u8"), ("padding1", "u16"), ("padding2", "u32")], 8)
KVMI_CHECK_COMMAND_ = _def("kvmi_check_command", [
    ("id", "u16"), ("padding1", "u16"), ("padding2", "u32")], 8)
KVMI_CHECK_EVENT_ = _def("kvmi_check_event", [
    ("id", "u16"), ("padding1", "u16"), ("padding2", "u32")], 8)
KVMI_GET_GUEST_INFO_REPLY = _def("kvmi_get_guest_info_reply", [
    ("vcpu_count", "u32"), ("padding", ("u32", 3))], 16)
KVMI_GET_PAGE_ACCESS_ = _def("kvmi_get_page_access", [
    ("view", "u16"), ("count", "u16"), ("padding", "u32"), ("gpa", flex("u64"))], 8,
    "Not in libkvmi master's header; layout from the kvmi-v7 documentation.")
KVMI_GET_PAGE_ACCESS_REPLY = _def("kvmi_get_page_access_reply", [("access", flex("u8"))], 0)
KVMI_PAGE_ACCESS_ENTRY = _def("kvmi_page_access_entry", [
    ("gpa", "u64"), ("access", "u8"), ("padding1", "u8"), ("padding2", "u16"),
    ("padding3", "u32")], 16)
KVMI_SET_PAGE_ACCESS_ = _def("kvmi_set_page_access", [
    ("view", "u16"), ("count", "u16"), ("padding", "u32"),
    ("entries", flex(KVMI_PAGE_ACCESS_ENTRY))], 8)
KVMI_CONTROL_SPP_ = _def("kvmi_control_spp", [
    ("enable", "u8"), ("padding1", "u8"), ("padding2", "u16"), ("padding3", "u32")], 8)
KVMI_GET_PAGE_WRITE_BITMAP_ = _def("kvmi_get_page_write_bitmap", [
    ("view", "u16"), ("count", "u16"), ("padding", "u32"), ("gpa", flex("u64"))], 8,
    "Not in libkvmi master's header; layout from the kvmi-v7 documentation.")
KVMI_GET_PAGE_WRITE_BITMAP_REPLY = _def("kvmi_get_page_write_bitmap_reply",
                                        [("bitmap", flex("u32"))], 0)
KVMI_PAGE_WRITE_BITMAP_ENTRY = _def("kvmi_page_write_bitmap_entry", [
    ("gpa", "u64"), ("bitmap", "u32"), ("padding", "u32")], 16)
KVMI_SET_PAGE_WRITE_BITMAP_ = _def("kvmi_set_page_write_bitmap", [
    ("view", "u16"), ("count", "u16"), ("padding", "u32"),
    ("entries", flex(KVMI_PAGE_WRITE_BITMAP_ENTRY))], 8)
KVMI_GET_VCPU_INFO_REPLY = _def("kvmi_get_vcpu_info_reply", [("tsc_speed", "u64")], 8)
KVMI_PAUSE_VCPU_ = _def("kvmi_pause_vcpu", [
    ("wait", "u8"), ("padding1", "u8"), ("padding2", "u16"), ("padding3", "u32")], 8)
KVMI_CONTROL_EVENTS_ = _def("kvmi_control_events", [
    ("event_id", "u16"), ("enable", "u8"), ("padding1", "u8"), ("padding2", "u32")], 8)
KVMI_CONTROL_VM_EVENTS_ = _def("kvmi_control_vm_events", [
    ("event_id", "u16"), ("enable", "u8"), ("padding1", "u8"), ("padding2", "u32")], 8)
KVMI_READ_PHYSICAL_ = _def("kvmi_read_physical", [("gpa", "u64"), ("size", "u64")], 16)
KVMI_WRITE_PHYSICAL_ = _def("kvmi_write_physical", [
    ("gpa", "u64"), ("size", "u64"), ("data", flex("u8"))], 16)
KVMI_QUERY_PHYSICAL_ = _def("kvmi_query_physical", [("gfn", "u64")], 8)
KVMI_QUERY_PHYSICAL_REPLY = _def("kvmi_query_physical_reply", [("gfn", "u64"), ("size", "u64")], 16)
KVMI_INJECT_EXCEPTION_ = _def("kvmi_inject_exception", [
    ("nr", "u8"), ("padding1", "u8"), ("padding2", "u16"), ("error_code", "u32"),
    ("address", "u64")], 16)
KVMI_EVENT_ = _def("kvmi_event", [
    ("size", "u16"), ("vcpu", "u16"), ("event", "u8"), ("flags", "u8"), ("padding", ("u8", 2)),
    ("arch", KVMI_EVENT_ARCH)], 544,
    "Common part of every event; the event-specific payload starts at offset `size`. `flags` "
    "is padding in standard KVMI (always 0); vmitrace hosts set VMITRACE_EVENT_NO_REPLY, "
    "VMITRACE_EVENT_CAPTURED and VMITRACE_EVENT_TABLE_CAPTURED there.")
KVMI_EVENT_REPLY_ = _def("kvmi_event_reply", [
    ("action", "u8"), ("event", "u8"), ("padding1", "u16"), ("padding2", "u32")], 8)
KVMI_EVENT_PF_ = _def("kvmi_event_pf", [
    ("gva", "u64"), ("gpa", "u64"), ("access", "u8"), ("padding1", "u8"), ("view", "u16"),
    ("padding2", "u32")], 24)
KVMI_EVENT_PF_REPLY = _def("kvmi_event_pf_reply", [
    ("ctx_addr", "u64"), ("ctx_size", "u32"), ("singlestep", "u8"), ("rep_complete", "u8"),
    ("padding", "u16"), ("ctx_data", ("bytes", 256))], 272)
KVMI_EVENT_BREAKPOINT_ = _def("kvmi_event_breakpoint", [
    ("gpa", "u64"), ("insn_len", "u8"), ("padding", ("u8", 7))], 16)
KVMI_MEM_TOKEN = _def("kvmi_mem_token", [("token", ("u64", 4))], 32)
KVMI_GET_MAX_GFN_REPLY = _def("kvmi_get_max_gfn_reply", [("gfn", "u64")], 8)
KVMI_GET_NEXT_AVAILABLE_GFN_REPLY = _def("kvmi_get_next_available_gfn_reply", [("gfn", "u64")], 8)
KVMI_SET_VE_INFO_PAGE_ = _def("kvmi_set_ve_info_page", [
    ("gpa", "u64"), ("trigger_vmexit", "u8"), ("padding", ("u8", 7))], 16)
KVMI_SET_EPT_PAGE_CONV_REQ = _def("kvmi_set_ept_page_conv_req", [
    ("view", "u16"), ("sve", "u8"), ("padding", ("u8", 5)), ("gpa", "u64")], 16)
KVMI_GET_EPT_PAGE_CONV_REQ = _def("kvmi_get_ept_page_conv_req", [
    ("view", "u16"), ("padding", ("u16", 3)), ("gpa", "u64")], 16)
KVMI_GET_EPT_PAGE_CONV_REPLY = _def("kvmi_get_ept_page_conv_reply", [
    ("sve", "u8"), ("padding", ("u8", 7))], 8)
KVMI_SWITCH_EPT_VIEW_REQ = _def("kvmi_switch_ept_view_req", [
    ("view", "u16"), ("padding", ("u16", 3))], 8)
KVMI_GET_EPT_VIEW_REPLY = _def("kvmi_get_ept_view_reply", [
    ("view", "u16"), ("padding", ("u8", 6))], 8)
KVMI_CONTROL_EPT_VIEW_REQ = _def("kvmi_control_ept_view_req", [
    ("view", "u16"), ("visible", "u8"), ("padding1", "u8"), ("padding2", "u32")], 8)
KVMI_VCPU_GET_XCR_ = _def("kvmi_vcpu_get_xcr", [("xcr", "u8"), ("padding", ("u8", 7))], 8)
KVMI_VCPU_GET_XCR_REPLY = _def("kvmi_vcpu_get_xcr_reply", [("value", "u64")], 8)
KVMI_VCPU_CONTROL_SINGLESTEP_ = _def("kvmi_vcpu_control_singlestep", [
    ("enable", "u8"), ("padding", ("u8", 7))], 8)
KVMI_VCPU_TRANSLATE_GVA_ = _def("kvmi_vcpu_translate_gva", [("gva", "u64")], 8)
KVMI_VCPU_TRANSLATE_GVA_REPLY = _def("kvmi_vcpu_translate_gva_reply", [("gpa", "u64")], 8)
KVMI_VCPU_CHANGE_GFN_ = _def("kvmi_vcpu_change_gfn", [
    ("view", "u16"), ("padding1", "u16"), ("padding2", "u32"), ("old_gfn", "u64"),
    ("new_gfn", "u64")], 24)
KVMI_VCPU_ALLOC_GFN_ = _def("kvmi_vcpu_alloc_gfn", [("gfn", "u64")], 8)
KVMI_VCPU_FREE_GFN_ = _def("kvmi_vcpu_free_gfn", [("gfn", "u64")], 8)
KVMI_CREATE_EPT_VIEW_REPLY = _def("kvmi_create_ept_view_reply", [
    ("view", "u16"), ("pad", ("u16", 3))], 8)
KVMI_DESTROY_EPT_VIEW_ = _def("kvmi_destroy_ept_view", [("view", "u16"), ("pad", ("u16", 3))], 8)

# -- x86 messages (asm/kvmi.h) ---------------------------------------------------------------
KVMI_EVENT_TRAP_ = _def("kvmi_event_trap", [
    ("vector", "u8"), ("padding1", "u8"), ("padding2", "u16"), ("error_code", "u32"),
    ("cr2", "u64")], 16)
KVMI_GET_REGISTERS_ = _def("kvmi_get_registers", [
    ("nmsrs", "u16"), ("padding1", "u16"), ("padding2", "u32"), ("msrs_idx", flex("u32"))], 8)
KVMI_GET_REGISTERS_REPLY = _def("kvmi_get_registers_reply", [
    ("mode", "u32"), ("padding", "u32"), ("regs", KVM_REGS), ("sregs", KVM_SREGS),
    ("msrs", KVM_MSRS)], 472, "Followed by msrs.nmsrs kvm_msr_entry.")
KVMI_GET_CPUID_ = _def("kvmi_get_cpuid", [("function", "u32"), ("index", "u32")], 8)
KVMI_GET_CPUID_REPLY = _def("kvmi_get_cpuid_reply", [
    ("eax", "u32"), ("ebx", "u32"), ("ecx", "u32"), ("edx", "u32")], 16)
KVMI_CONTROL_CR_ = _def("kvmi_control_cr", [
    ("enable", "u8"), ("padding1", "u8"), ("padding2", "u16"), ("cr", "u32")], 8)
KVMI_EVENT_CR_ = _def("kvmi_event_cr", [
    ("cr", "u16"), ("padding", ("u16", 3)), ("old_value", "u64"), ("new_value", "u64")], 24)
KVMI_EVENT_CR_REPLY = _def("kvmi_event_cr_reply", [("new_val", "u64")], 8)
KVMI_CONTROL_MSR_ = _def("kvmi_control_msr", [
    ("enable", "u8"), ("padding1", "u8"), ("padding2", "u16"), ("msr", "u32")], 8)
KVMI_EVENT_MSR_ = _def("kvmi_event_msr", [
    ("msr", "u32"), ("padding", "u32"), ("old_value", "u64"), ("new_value", "u64")], 24)
KVMI_EVENT_MSR_REPLY = _def("kvmi_event_msr_reply", [("new_val", "u64")], 8)
KVMI_GET_XSAVE_REPLY = _def("kvmi_get_xsave_reply", [("region", flex("u32"))], 0)
KVMI_VCPU_SET_XSAVE_ = _def("kvmi_vcpu_set_xsave", [("region", flex("u32"))], 0)
KVMI_GET_MTRR_TYPE_ = _def("kvmi_get_mtrr_type", [("gpa", "u64")], 8)
KVMI_GET_MTRR_TYPE_REPLY = _def("kvmi_get_mtrr_type_reply", [
    ("type", "u8"), ("padding", ("u8", 7))], 8)
KVMI_EVENT_DESCRIPTOR_ = _def("kvmi_event_descriptor", [
    ("descriptor", "u8"), ("write", "u8"), ("padding", ("u8", 6))], 8)
KVMI_EVENT_CPUID_ = _def("kvmi_event_cpuid", [
    ("function", "u32"), ("index", "u32"), ("insn_length", "u8"), ("padding1", ("u8", 3)),
    ("padding2", "u32")], 16)
KVMI_EVENT_SINGLESTEP_ = _def("kvmi_event_singlestep", [
    ("failed", "u8"), ("padding", ("u8", 7))], 8)

# --------------------------------------------------------------------------------------------
# vmitrace vendor extension (answered by vmitrace's QEMU plugin host only)
# --------------------------------------------------------------------------------------------
VMITRACE_SET_BREAKPOINT = 0x7F01
VMITRACE_CLEAR_BREAKPOINT = 0x7F02
VMITRACE_SET_DELIVERY = 0x7F03
VMITRACE_SET_BREAKPOINT_EX = 0x7F04
# kvmi_event.flags
VMITRACE_EVENT_NO_REPLY = 1  # the vCPU did not wait; no reply is expected
VMITRACE_EVENT_CAPTURED = 2  # kvmi_event_breakpoint is followed by vmitrace_captured + data
VMITRACE_MAX_BLOCK_VALUES = 16
# vmitrace_breakpoint_ex.block_flags
VMITRACE_BLOCK_FROM_CAPTURE = 1  # the value: u64 word `block_reg` (0-31) of the first capture
VMITRACE_BLOCK_BITMAP = 2        # block_values (16 words): the set of 0..511 whose bits are set
VMITRACE_BLOCK_WORDS_DIFFER = 4  # also wait where the first capture's words differ_words differ
# with BITMAP and WORDS_DIFFER: 16 more block_values, a second set whose values wait where
# the words are equal instead (and run on where they differ)
VMITRACE_BLOCK_DIFFER_REVERSED = 8
VMITRACE_BLOCK_BITMAP_VALUES = 512
VMITRACE_CAPTURES = 2
VMITRACE_CAPTURE_GS_BASE = 16  # vmitrace_capture.base: GS base (0-15: general registers)
VMITRACE_CAPTURE_NONE = 0xFF
VMITRACE_MAX_CAPTURE = 256
VMITRACE_BREAKPOINT = _def("vmitrace_breakpoint", [("gva", "u64")], 8,
                           "VM-wide (no vcpu header): instrumentation breakpoint at a guest "
                           "virtual instruction address; hits arrive as KVMI_EVENT_BREAKPOINT.")
VMITRACE_CAPTURE = _def("vmitrace_capture", [
    ("base", "u8"), ("padding", "u8"), ("length", "u16"), ("offset", "s32")], 8,
    "Guest memory copied into each hit's event: `length` (1-256) bytes at base + offset, "
    "base = general register 0-15 (x86 encoding) or 16 (GS base); base 0xff: unused.")
VMITRACE_BREAKPOINT_EX = _def("vmitrace_breakpoint_ex", [
    ("gva", "u64"), ("run_on", "u8"), ("block_reg", "u8"), ("count", "u8"),
    ("block_flags", "u8"), ("differ_words", ("u8", 2)), ("padding", ("u8", 2)),
    ("capture0", VMITRACE_CAPTURE), ("capture1", VMITRACE_CAPTURE),
    ("block_values", flex("u32"))], 32,
    "Breakpoint whose hits carry two captures of guest memory taken at the hit; with "
    "run_on=1 they do not wait for a reply, unless the low 32 bits of general register "
    "`block_reg` (x86 encoding: 0 rax, 1 rcx, 2 rdx, 3 rbx, 4 rsp, 5 rbp, 6 rsi, 7 rdi, "
    "8-15 r8-r15) equal one of the `count` (at most 16) block_values. block_flags: "
    "VMITRACE_BLOCK_FROM_CAPTURE takes the value from u64 word `block_reg` of the first "
    "capture instead (unreadable: the hit waits); VMITRACE_BLOCK_BITMAP makes the 16 "
    "block_values a 512-bit set (bit v%32 of word v/32; values from 512 up always wait); "
    "VMITRACE_BLOCK_WORDS_DIFFER also makes hits wait where the first capture's u64 words "
    "differ_words[0] and differ_words[1] differ (0 and 0 without it); "
    "VMITRACE_BLOCK_DIFFER_REVERSED (with both) adds 16 block_values, a second 512-bit set "
    "whose values wait where those words are equal instead, and run on where they differ.")


def block_bitmap(values: Iterable[int]) -> tuple[int, ...]:
    """block_values for VMITRACE_BLOCK_BITMAP: the set `values` (each 0-511) as 16 words."""
    words = [0] * (VMITRACE_BLOCK_BITMAP_VALUES // 32)
    for value in values:
        if not 0 <= value < VMITRACE_BLOCK_BITMAP_VALUES:
            raise ValueError(f"{value} is outside a block bitmap's 0-511")
        words[value // 32] |= 1 << (value % 32)
    return tuple(words)
VMITRACE_CAPTURED = _def("vmitrace_captured", [
    ("length", ("u16", 2)), ("padding", "u32")], 8,
    "After kvmi_event_breakpoint when kvmi_event.flags has VMITRACE_EVENT_CAPTURED: the bytes "
    "of each capture follow (length 0: not configured or unreadable).")
# VMITRACE_SET_CAPTURE_TABLE (docs/kvmi-vendor-extension.md)
VMITRACE_SET_CAPTURE_TABLE = 0x7F05
VMITRACE_GET_VCPU_STATS = 0x7F06
VMITRACE_EVENT_TABLE_CAPTURED = 4  # vmitrace_table_captured + pointer captures follow
VMITRACE_TABLE_STRING = 1          # vmitrace_table_entry.flags: stop after the first NUL
VMITRACE_TABLE_SIGNED_LENGTH = 2   # the length word is signed; negative: capture nothing
VMITRACE_TABLE_WORDS32 = 4         # pointer and length: the words' low 32 bits (ia32 callers)
VMITRACE_TABLE_INDIRECT = 8        # the address: a pointer read at the pointer word + offset
VMITRACE_TABLE_WAIT_IF_CUT = 16    # the hit waits if max_length cut the capture short
VMITRACE_TABLE_NO_LENGTH = 0xFF    # vmitrace_table_entry.length_word: max_length bytes
VMITRACE_MAX_TABLE_ENTRIES = 2048
VMITRACE_MAX_TABLE_CAPTURES = 4    # entries per key, and pointer captures per event
VMITRACE_MAX_POINTER_CAPTURE = 8192
VMITRACE_TABLE_KEYS = 512          # vmitrace_table_entry.key: 0-511
VMITRACE_TABLE_ENTRY = _def("vmitrace_table_entry", [
    ("key", "u16"), ("pointer_word", "u8"), ("length_word", "u8"), ("max_length", "u16"),
    ("flags", "u8"), ("offset", "u8")], 8,
    "At hits whose key word holds `key` (0-511): capture up to `max_length` (1-8192) bytes at "
    "the address in u64 word `pointer_word` (0-31) of the first capture, bounded by word "
    "`length_word` (0xff: none). flags: VMITRACE_TABLE_STRING stops after the first NUL; "
    "VMITRACE_TABLE_SIGNED_LENGTH reads the length word as signed (negative: nothing); "
    "VMITRACE_TABLE_WORDS32 takes the low 32 bits of the pointer and length words; "
    "VMITRACE_TABLE_INDIRECT reads the address from guest memory, a u64 (u32 with WORDS32) "
    "at the pointer word's value + `offset` (0-255; 0 without the flag); "
    "VMITRACE_TABLE_WAIT_IF_CUT makes the hit wait for its reply where max_length stopped "
    "the capture before its end (a fault, the length word's bound, a string's NUL).")
VMITRACE_CAPTURE_TABLE = _def("vmitrace_capture_table", [
    ("gva", "u64"), ("key_word", "u8"), ("padding", ("u8", 3)), ("count", "u32"),
    ("entries", flex(VMITRACE_TABLE_ENTRY))], 16,
    "VM-wide (no vcpu header): the pointer captures of the breakpoint at `gva`, which needs "
    "a first capture. Its hits capture the entries (at most 2048, 4 per key; 0 removes the "
    "table) whose key equals the low 32 bits of u64 word `key_word` (0-31) of the first "
    "capture. Setting the breakpoint again, or clearing it, drops the table.")
VMITRACE_TABLE_CAPTURED = _def("vmitrace_table_captured", [
    ("count", "u8"), ("padding", ("u8", 7))], 8,
    "After the captured bytes when kvmi_event.flags has VMITRACE_EVENT_TABLE_CAPTURED: `count` "
    "(1-4) vmitrace_pointer_capture follow, then the bytes of each, in order.")
VMITRACE_POINTER_CAPTURE = _def("vmitrace_pointer_capture", [
    ("gva", "u64"), ("length", "u16"), ("faulted", "u8"), ("padding", ("u8", 5))], 16,
    "One pointer capture: `length` bytes read at `gva`; faulted=1: the byte at gva + length "
    "could not be read (an address of 0 is a faulted empty capture).")
# Messages of the extension that may exceed KVMI_MSG_SIZE (the header's u16 size holds them):
# a full capture table, and a breakpoint event with both captures and every pointer capture.
VMITRACE_TABLE_MSG_SIZE = VMITRACE_CAPTURE_TABLE.size + \
    VMITRACE_MAX_TABLE_ENTRIES * VMITRACE_TABLE_ENTRY.size
VMITRACE_EVENT_MSG_SIZE = KVMI_EVENT_.size + KVMI_EVENT_BREAKPOINT_.size + \
    VMITRACE_CAPTURED.size + VMITRACE_CAPTURES * VMITRACE_MAX_CAPTURE + \
    VMITRACE_TABLE_CAPTURED.size + \
    VMITRACE_MAX_TABLE_CAPTURES * (VMITRACE_POINTER_CAPTURE.size + VMITRACE_MAX_POINTER_CAPTURE)


def max_payload(msg_id: int) -> int:
    """The largest payload of a message with this id: KVMI_MSG_SIZE, except events (a
    vmitrace host's breakpoint events with pointer captures) and capture tables."""
    if msg_id == KVMI_EVENT:
        return VMITRACE_EVENT_MSG_SIZE
    if msg_id == VMITRACE_SET_CAPTURE_TABLE:
        return VMITRACE_TABLE_MSG_SIZE
    return KVMI_MSG_SIZE


class CaptureTableEntry(NamedTuple):
    """One vmitrace_table_entry: at hits whose key word holds `key`, capture up to
    `max_length` bytes at the address in u64 word `pointer_word` of the first capture,
    bounded by word `length_word` (None: no bound word); `string`: stop after the first NUL;
    `signed_length`: a negative length word captures nothing; `words32`: address and length
    are the words' low 32 bits (a 32-bit caller's registers); `indirect`: the address is
    the pointer in guest memory at the pointer word's value + `indirect` bytes (0-255);
    `wait_if_cut`: the hit waits where `max_length` stopped the capture before its end."""

    key: int
    pointer_word: int
    max_length: int
    length_word: int | None = None
    string: bool = False
    signed_length: bool = False
    words32: bool = False
    indirect: int | None = None
    wait_if_cut: bool = False


VMITRACE_DELIVERY = _def("vmitrace_delivery", [("blocking", "u8"), ("padding", ("u8", 7))], 8,
                         "blocking=0: events are delivered without waiting for replies.")
VMITRACE_GET_VCPU_STATS_ = _def("vmitrace_get_vcpu_stats",
                                [("vcpu", "u16"), ("padding", ("u8", 6))], 8)
VMITRACE_VCPU_STATS = _def("vmitrace_vcpu_stats", [
    ("events", "u64"), ("waits", "u64"), ("timeouts", "u64"), ("event_us", "u64"),
    ("wait_us", "u64"), ("max_wait_us", "u64")], 48,
    "What delivering events has cost a vCPU since QEMU started: events delivered, how many "
    "waited for a reply and how many of those ended without one, the time in delivering "
    "them (waits included) and in waiting, and the longest wait.")

# --------------------------------------------------------------------------------------------
# Message and event tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandSpec:
    """How a command travels: vCPU header or not, request struct, reply struct.

    ``request``/``reply`` are the fixed parts (``None``: no payload); flexible tails
    (``flex`` fields) follow them. ``reply_min`` marks replies that may be shorter than the
    struct (older hosts), currently only GET_VERSION without features.
    """

    name: str
    id: int
    vcpu: bool
    request: StructDef | None
    reply: StructDef | None
    reply_min: int | None = None


def _cmd(name: str, vcpu: bool, request: StructDef | None, reply: StructDef | None,
         reply_min: int | None = None) -> CommandSpec:
    return CommandSpec(name, globals()[name], vcpu, request, reply, reply_min)


COMMANDS: dict[int, CommandSpec] = {c.id: c for c in [
    _cmd("KVMI_GET_VERSION", False, None, KVMI_GET_VERSION_REPLY, reply_min=8),
    _cmd("KVMI_CHECK_COMMAND", False, KVMI_CHECK_COMMAND_, None),
    _cmd("KVMI_CHECK_EVENT", False, KVMI_CHECK_EVENT_, None),
    _cmd("KVMI_GET_GUEST_INFO", False, None, KVMI_GET_GUEST_INFO_REPLY),
    _cmd("KVMI_GET_VCPU_INFO", True, None, KVMI_GET_VCPU_INFO_REPLY),
    _cmd("KVMI_PAUSE_VCPU", True, KVMI_PAUSE_VCPU_, None),
    _cmd("KVMI_CONTROL_VM_EVENTS", False, KVMI_CONTROL_VM_EVENTS_, None),
    _cmd("KVMI_CONTROL_EVENTS", True, KVMI_CONTROL_EVENTS_, None),
    _cmd("KVMI_CONTROL_CR", True, KVMI_CONTROL_CR_, None),
    _cmd("KVMI_CONTROL_MSR", True, KVMI_CONTROL_MSR_, None),
    # CONTROL_VE has an id but no parameter struct in libkvmi master; sent as raw payload.
    _cmd("KVMI_CONTROL_VE", True, None, None),
    _cmd("KVMI_GET_REGISTERS", True, KVMI_GET_REGISTERS_, KVMI_GET_REGISTERS_REPLY),
    _cmd("KVMI_SET_REGISTERS", True, KVM_REGS, None),
    _cmd("KVMI_GET_CPUID", True, KVMI_GET_CPUID_, KVMI_GET_CPUID_REPLY),
    _cmd("KVMI_GET_XSAVE", True, None, KVMI_GET_XSAVE_REPLY),
    _cmd("KVMI_READ_PHYSICAL", False, KVMI_READ_PHYSICAL_, None),
    _cmd("KVMI_WRITE_PHYSICAL", False, KVMI_WRITE_PHYSICAL_, None),
    _cmd("KVMI_INJECT_EXCEPTION", True, KVMI_INJECT_EXCEPTION_, None),
    _cmd("KVMI_GET_PAGE_ACCESS", False, KVMI_GET_PAGE_ACCESS_, KVMI_GET_PAGE_ACCESS_REPLY),
    _cmd("KVMI_SET_PAGE_ACCESS", False, KVMI_SET_PAGE_ACCESS_, None),
    _cmd("KVMI_GET_MAP_TOKEN", False, None, KVMI_MEM_TOKEN),
    _cmd("KVMI_GET_MTRR_TYPE", True, KVMI_GET_MTRR_TYPE_, KVMI_GET_MTRR_TYPE_REPLY),
    _cmd("KVMI_CONTROL_SPP", False, KVMI_CONTROL_SPP_, None),
    _cmd("KVMI_GET_PAGE_WRITE_BITMAP", False, KVMI_GET_PAGE_WRITE_BITMAP_,
         KVMI_GET_PAGE_WRITE_BITMAP_REPLY),
    _cmd("KVMI_SET_PAGE_WRITE_BITMAP", False, KVMI_SET_PAGE_WRITE_BITMAP_, None),
    _cmd("KVMI_CONTROL_CMD_RESPONSE", False, KVMI_CONTROL_CMD_RESPONSE_, None),
    _cmd("KVMI_SET_VE_INFO_PAGE", True, KVMI_SET_VE_INFO_PAGE_, None),
    _cmd("KVMI_GET_MAX_GFN", False, None, KVMI_GET_MAX_GFN_REPLY),
    _cmd("KVMI_GET_NEXT_AVAILABLE_GFN", False, None, KVMI_GET_NEXT_AVAILABLE_GFN_REPLY),
    _cmd("KVMI_SWITCH_EPT_VIEW", True, KVMI_SWITCH_EPT_VIEW_REQ, None),
    _cmd("KVMI_DISABLE_VE", True, None, None),
    _cmd("KVMI_GET_EPT_VIEW", True, None, KVMI_GET_EPT_VIEW_REPLY),
    _cmd("KVMI_VCPU_TRANSLATE_GVA", True, KVMI_VCPU_TRANSLATE_GVA_, KVMI_VCPU_TRANSLATE_GVA_REPLY),
    _cmd("KVMI_CONTROL_EPT_VIEW", True, KVMI_CONTROL_EPT_VIEW_REQ, None),
    _cmd("KVMI_VCPU_GET_XCR", True, KVMI_VCPU_GET_XCR_, KVMI_VCPU_GET_XCR_REPLY),
    _cmd("KVMI_VCPU_SET_XSAVE", True, KVMI_VCPU_SET_XSAVE_, None),
    _cmd("KVMI_QUERY_PHYSICAL", False, KVMI_QUERY_PHYSICAL_, KVMI_QUERY_PHYSICAL_REPLY),
    _cmd("KVMI_VCPU_ALLOC_GFN", True, KVMI_VCPU_ALLOC_GFN_, None),
    _cmd("KVMI_VCPU_FREE_GFN", True, KVMI_VCPU_FREE_GFN_, None),
    _cmd("KVMI_CREATE_EPT_VIEW", False, None, KVMI_CREATE_EPT_VIEW_REPLY),
    _cmd("KVMI_DESTROY_EPT_VIEW", False, KVMI_DESTROY_EPT_VIEW_, None),
    _cmd("KVMI_VCPU_CHANGE_GFN", True, KVMI_VCPU_CHANGE_GFN_, None),
    _cmd("KVMI_VCPU_CONTROL_SINGLESTEP", True, KVMI_VCPU_CONTROL_SINGLESTEP_, None),
    _cmd("VMITRACE_SET_BREAKPOINT", False, VMITRACE_BREAKPOINT, None),
    _cmd("VMITRACE_CLEAR_BREAKPOINT", False, VMITRACE_BREAKPOINT, None),
    _cmd("VMITRACE_SET_DELIVERY", False, VMITRACE_DELIVERY, None),
    _cmd("VMITRACE_SET_BREAKPOINT_EX", False, VMITRACE_BREAKPOINT_EX, None),
    _cmd("VMITRACE_SET_CAPTURE_TABLE", False, VMITRACE_CAPTURE_TABLE, None),
    _cmd("VMITRACE_GET_VCPU_STATS", False, VMITRACE_GET_VCPU_STATS_, VMITRACE_VCPU_STATS),
]}

# Event id -> (C name, payload struct or None, event-specific reply struct or None).
EVENTS: dict[int, tuple[str, StructDef | None, StructDef | None]] = {
    KVMI_EVENT_UNHOOK: ("KVMI_EVENT_UNHOOK", None, None),
    KVMI_EVENT_CR: ("KVMI_EVENT_CR", KVMI_EVENT_CR_, KVMI_EVENT_CR_REPLY),
    KVMI_EVENT_MSR: ("KVMI_EVENT_MSR", KVMI_EVENT_MSR_, KVMI_EVENT_MSR_REPLY),
    KVMI_EVENT_XSETBV: ("KVMI_EVENT_XSETBV", None, None),
    KVMI_EVENT_BREAKPOINT: ("KVMI_EVENT_BREAKPOINT", KVMI_EVENT_BREAKPOINT_, None),
    KVMI_EVENT_HYPERCALL: ("KVMI_EVENT_HYPERCALL", None, None),
    KVMI_EVENT_PF: ("KVMI_EVENT_PF", KVMI_EVENT_PF_, KVMI_EVENT_PF_REPLY),
    KVMI_EVENT_TRAP: ("KVMI_EVENT_TRAP", KVMI_EVENT_TRAP_, None),
    KVMI_EVENT_DESCRIPTOR: ("KVMI_EVENT_DESCRIPTOR", KVMI_EVENT_DESCRIPTOR_, None),
    KVMI_EVENT_CREATE_VCPU: ("KVMI_EVENT_CREATE_VCPU", None, None),
    KVMI_EVENT_PAUSE_VCPU: ("KVMI_EVENT_PAUSE_VCPU", None, None),
    KVMI_EVENT_SINGLESTEP: ("KVMI_EVENT_SINGLESTEP", KVMI_EVENT_SINGLESTEP_, None),
    KVMI_EVENT_CPUID: ("KVMI_EVENT_CPUID", KVMI_EVENT_CPUID_, None),
}

COMMAND_NAMES: dict[int, str] = {KVMI_EVENT_REPLY: "KVMI_EVENT_REPLY", KVMI_EVENT: "KVMI_EVENT",
                                 **{i: c.name for i, c in COMMANDS.items()}}


def constants() -> dict[str, int]:
    """Every integer constant of the ABI under its C name."""
    prefixes = ("KVMI_", "KVM_", "VMITRACE_")
    return {k: v for k, v in globals().items()
            if k.startswith(prefixes) and isinstance(v, int) and not isinstance(v, bool)
            and not k.endswith("_")}


def describe() -> dict[str, Any]:
    """``{"structs": {...}, "constants": {...}, "commands": {...}, "events": {...}}``."""
    return {
        "structs": {name: sd.describe() for name, sd in STRUCTS.items()},
        "constants": constants(),
        "commands": {c.name: {"id": c.id, "vcpu_hdr": c.vcpu,
                              "request": c.request.name if c.request else None,
                              "reply": c.reply.name if c.reply else None}
                     for c in COMMANDS.values()},
        "events": {name: {"id": eid, "payload": p.name if p else None,
                          "reply": r.name if r else None}
                   for eid, (name, p, r) in EVENTS.items()},
    }


def pack_flex(elem: str | StructDef, items: Iterable[Any]) -> bytes:
    """Encode a flexible ``[0]`` array of scalars (``"u32"``...) or structs."""
    if isinstance(elem, StructDef):
        return b"".join(elem.encode(i) for i in items)
    code, _ = _SCALARS[elem]
    seq = list(items)
    try:
        return struct.pack(f"<{len(seq)}{code}", *seq)
    except struct.error as exc:
        raise AbiError(f"{elem}[]: {exc}") from None


def unpack_flex(elem: str, buf: bytes | memoryview, count: int | None = None) -> tuple[int, ...]:
    """Decode a flexible array of scalars; the buffer must hold whole elements."""
    code, width = _SCALARS[elem]
    if len(buf) % width:
        raise SizeError(f"{elem}[]: {len(buf)} bytes is not a multiple of {width}")
    n = len(buf) // width
    if count is not None and n != count:
        raise SizeError(f"{elem}[]: expected {count} elements, got {n}")
    return struct.unpack(f"<{n}{code}", buf)


__all__ = [k for k in list(globals()) if k.isupper() and not k.startswith("_")] + [
    "AbiError", "PaddingError", "SizeError", "Field", "StructDef", "CommandSpec",
    "constants", "describe", "max_payload", "pack_flex", "unpack_flex"]
